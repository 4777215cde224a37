"""The visual stage's curves, from the metrics.jsonl of bench/phantom_results.py's runs: per variant (expert, oracle,
null, ...), the stage's reward, the clinical reward, hallucination and omission of its sampled reports against their
references (every step), and the held-out validation hallucination (every eval_every steps); mean over seeds, one
line each.

    python bench/plot_visual.py runs --out docs/visual_stage.png [--only expert oracle null "strict oracle"]

matplotlib is a bench-only dependency (requirements-dev.txt).
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", help="the --out folder of bench/phantom_results.py")
parser.add_argument("--out", default="docs/visual_stage.png")
parser.add_argument("--smooth", type=int, default=5, help="moving average over this many steps")
parser.add_argument("--only", nargs="+", help="the variants to draw, e.g. expert oracle null (default: all)")
args = parser.parse_args()

curves = defaultdict(lambda: defaultdict(list))  # variant -> series -> [per-seed arrays]
names = Path(args.runs) / "variants.json"  # run folder -> variant name (bench/phantom_results.py writes it)
names = json.loads(names.read_text()) if names.exists() else {}
for log in sorted(Path(args.runs).glob("seed*/*/visual/metrics.jsonl")):
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    val = [r for r in rows if "val" in r]
    folder = log.parent.parent.name
    variant = names.get(folder, folder).removeprefix("+ text + visual (").removesuffix(")")
    if args.only and variant not in args.only:
        continue
    for key in ("reward", "clinical", "hallucination", "omission"):
        curves[variant][key].append(np.array([r[key] for r in steps]))
    if val:
        curves[variant]["val hallucination"].append(np.array([[r["step"], r["val"]["hallucination"]] for r in val]))
if not curves:
    raise SystemExit(f"{args.runs}: no seed*/*/visual/metrics.jsonl (run bench/phantom_results.py first)")


def smooth(x, k):
    return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) >= k > 1 else x


panels = ["reward", "clinical", "hallucination", "omission", "val hallucination"]
fig, axes = plt.subplots(2, 3, figsize=(13, 7))
axes = axes.flatten()
for ax, key in zip(axes, panels):
    for variant, series in sorted(curves.items()):
        if not series[key]:
            continue
        if key == "val hallucination":
            runs = series[key]
            ax.plot(runs[0][:, 0], np.mean([r[:, 1] for r in runs], 0), marker="o", label=variant)
        else:
            n = min(len(x) for x in series[key])
            mean = smooth(np.mean([x[:n] for x in series[key]], 0), args.smooth)
            ax.plot(np.arange(len(mean)) + args.smooth, mean, label=variant)
    ax.set_title({"reward": "reward (each variant's own judge)", "clinical": "clinical reward (vs reference)",
                  "val hallucination": "validation hallucination (greedy)"}.get(key, key + " (samples vs reference)"),
                 fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
axes[-1].axis("off")  # the sixth place holds the legend
axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", title="the visual stage's judge")
fig.suptitle(f"visual stage on the phantom world, mean over {max(len(s['reward']) for s in curves.values())} seeds "
             f"({args.smooth}-step moving average)", fontsize=10)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"-> {args.out}")
