"""Evaluate generated chest X-ray reports: the metric table of radiology report generation papers.

    python eval.py --hyps generated.txt --refs references.txt [--json scores.json] [--style coco|r2gen]

One report per line in each file (UTF-8, same number of lines; an empty line is an empty report). Prints corpus
BLEU-1..4, ROUGE-L, METEOR, CIDEr-D (pycocoevalcap's numbers on clean_report tokens; METEOR with exact + stem
matching only) and clinical F1 (CheXpert-14 rule labeler, uncertain = positive, micro / macro over the 5
competition observations and all 14); --json also writes every sample's values and labels.
"""
import argparse
import json

from nanovalor.rewards import corpus_metrics, read_lines, write_atomic

ROWS = [("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("BLEU-3", "bleu3"), ("BLEU-4", "bleu4"), ("ROUGE-L", "rougeL"),
        ("METEOR (exact+stem)", "meteor"), ("CIDEr-D", "cider"), ("F1-5 micro", "f1_micro_5"),
        ("F1-5 macro", "f1_macro_5"), ("F1-14 micro", "f1_micro_14"), ("F1-14 macro", "f1_macro_14")]

parser = argparse.ArgumentParser(description="metric table of generated reports against references")
parser.add_argument("--hyps", required=True, help="generated reports, one per line")
parser.add_argument("--refs", required=True, help="reference reports, one per line")
parser.add_argument("--json", help="write corpus and per-sample values here")
parser.add_argument("--style", default="coco", choices=["coco", "r2gen"],
                    help="text normalisation before the NLG metrics (r2gen: periods are tokens)")
args = parser.parse_args()

hyps, refs = read_lines(args.hyps), read_lines(args.refs)
if len(hyps) != len(refs):
    raise SystemExit(f"error: {args.hyps} has {len(hyps)} lines but {args.refs} has {len(refs)}: "
                     "expected one report per line in both, in the same order")
if not hyps:
    raise SystemExit(f"error: {args.hyps} is empty: expected one report per line")

metrics = corpus_metrics(hyps, refs, style=args.style)
print(f"{len(hyps)} reports, {args.hyps} vs {args.refs} (style {args.style})")
print(f"{'metric':<20} {'value':>8}")
for name, key in ROWS:
    print(f"{name:<20} {metrics[key]:>8.4f}")

if args.json:
    record = dict(hyps=args.hyps, refs=args.refs, style=args.style, n=len(hyps), **metrics)
    write_atomic(args.json, lambda f: json.dump(record, f, indent=1))
    print(f"per-sample values -> {args.json}")
