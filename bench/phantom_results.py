"""The README's results: VALOR's stages on the phantom world over several seeds, mean +- std on the test split.

    python bench/phantom_results.py --seeds 0 1 2 --out runs      # ~12 minutes a seed on 2 CPU cores

For each seed: `train.py --stage text` (which builds the phantom world, the phantom expert and the SFT warm start
with that seed), then `--stage visual`, then `eval.py` on the three checkpoints (SFT, + text, + text + visual) with
that seed's expert; the per-seed JSON lands in runs/seed<S>/eval.json and a results row per checkpoint in
runs/results.jsonl. Prints one markdown table: every metric as mean +- std over the seeds. Existing checkpoints are
reused (delete a seed's folder to rerun it).
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

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--out", default="runs")
args = parser.parse_args()

out = Path(args.out)
runs = {}
for seed in args.seeds:
    folder = out / f"seed{seed}"
    for stage in ("text", "visual"):
        if not (folder / stage / "checkpoint").exists():
            subprocess.run([sys.executable, str(ROOT / "train.py"), f"--stage={stage}", f"--seed={seed}",
                            f"--out={folder}"], check=True)
    models = [str(folder / stage / "checkpoint") for stage in ("sft", "text", "visual")]
    subprocess.run([sys.executable, str(ROOT / "eval.py"), *[f"--model={m}" for m in models], "--split=test",
                    f"--data={folder / 'phantoms' / 'annotation.json'}", f"--json={folder / 'eval.json'}",
                    f"--results={out / 'results.jsonl'}"], check=True)
    record = json.loads((folder / "eval.json").read_text())
    for name, stage in zip(models, ("SFT", "+ text", "+ text + visual")):
        runs.setdefault(stage, []).append(record["models"][name]["metrics"])

cells = {}  # stage -> {metric every seed has: "mean ± std"}
for stage, ms in runs.items():
    cells[stage] = {key: f"{np.mean([m[key] for m in ms]):.3f} ± {np.std([m[key] for m in ms]):.3f}"
                    for _, key in METRICS if all(key in m for m in ms)}
print(f"phantom world, test split, seeds {args.seeds}: mean +- std")
print(table(cells, "stage"))
