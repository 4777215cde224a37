"""The README's results: VALOR's stages on the phantom world over several seeds, mean +- std on the test split, with
the visual stage's controls (phantom-only): its reward from the phantom expert, from an oracle (the labels our
labeler reads from a report against the study's true findings: the best any expert could judge) and from a null
expert (the phantom expert shown another study's X-ray: no information).

    python bench/phantom_results.py --seeds 0 1 2 --out runs          # ~25 minutes a seed on 2 CPU cores
    python bench/phantom_results.py --seeds 0 1 2 --out runs \\
        --variant "oracle, lr 3e-4=--expert=oracle --lr=3e-4"         # more visual-stage variants: NAME=FLAGS

For each seed: `train.py --stage text` (which builds the phantom world, the phantom expert and the SFT warm start
with that seed), then `--stage visual` from the text checkpoint once per variant (each in runs/seed<S>/<variant>),
then `eval.py` on every checkpoint with that seed's expert; the per-seed JSON lands in runs/seed<S>/eval.json (each
checkpoint evaluated once, later ones merged in) and a results row per checkpoint in runs/results.jsonl. Prints one
markdown table: every metric as mean +- std over the seeds. Existing checkpoints and evaluations are reused (delete a
folder, or its entry in eval.json, to rerun it): seeds may run in parallel processes (`--seeds 0`, `--seeds 1`, ...),
then one call with all of them prints the table. `bench/plot_visual.py runs` draws the visual stage's reward and
hallucination curves.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanovalor.evaluation import METRICS, table  # noqa: E402

VARIANTS = {"+ text + visual (expert)": "", "+ text + visual (oracle)": "--expert=oracle",
            "+ text + visual (null)": "--expert=null"}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--out", default="runs")
parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS: another visual-stage run")
parser.add_argument("--only", action="store_true", help="run the --variant runs only, not the three controls")
args = parser.parse_args()
variants = {} if args.only else dict(VARIANTS)
variants.update(dict(v.split("=", 1) for v in args.variant))


def folder_name(name):
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
names = out / "variants.json"  # run folder -> variant name, for bench/plot_visual.py's legend
known = json.loads(names.read_text()) if names.exists() else {}
names.write_text(json.dumps({**known, **{folder_name(name): name for name in variants}}, indent=1))
runs = {}
for seed in args.seeds:
    folder = out / f"seed{seed}"
    train = [sys.executable, str(ROOT / "train.py"), f"--seed={seed}"]
    if not (folder / "text" / "checkpoint").exists():
        subprocess.run(train + ["--stage=text", f"--out={folder}"], check=True)
    models = {"SFT": folder / "sft" / "checkpoint", "+ text": folder / "text" / "checkpoint"}
    for name, flags in variants.items():
        run = folder / folder_name(name)
        if not (run / "visual" / "checkpoint").exists():
            subprocess.run(train + ["--stage=visual", f"--out={run}", f"--model={models['+ text']}",
                                    f"--data={folder / 'phantoms' / 'annotation.json'}",
                                    f"--expert={folder / 'expert' / 'checkpoint'}", *flags.split()], check=True)
        models[name] = run / "visual" / "checkpoint"
    evaluated, fresh = folder / "eval.json", folder / "eval.new.json"  # every checkpoint evaluated so far, the new
    record = json.loads(evaluated.read_text()) if evaluated.exists() else {"models": {}}
    missing = [m for m in models.values() if str(m) not in record["models"]]
    if missing:
        subprocess.run([sys.executable, str(ROOT / "eval.py"), *[f"--model={m}" for m in missing],
                        "--split=test", f"--data={folder / 'phantoms' / 'annotation.json'}",
                        f"--json={fresh}", f"--results={out / 'results.jsonl'}"], check=True)
        new = json.loads(fresh.read_text())
        record = dict(new, models={**record["models"], **new["models"]})
        evaluated.write_text(json.dumps(record, indent=1))
        fresh.unlink()
    for name, model in models.items():
        runs.setdefault(name, []).append(record["models"][str(model)]["metrics"])

cells = {}  # stage -> {metric every seed has: "mean ± std"}
for stage, ms in runs.items():
    cells[stage] = {key: f"{np.mean([m[key] for m in ms]):.3f} ± {np.std([m[key] for m in ms]):.3f}"
                    for _, key in METRICS if all(key in m for m in ms)}
print(f"phantom world, test split, seeds {args.seeds}: mean +- std")
print(table(cells, "stage"))
