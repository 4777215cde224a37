"""Reward throughput: our per-sample BLEU-4 + ROUGE-L + CIDEr-D vs pycocoevalcap's, and the CheXpert labeler.

    python bench/rewards.py                      # 512 references x G=8 samples = 4096 pairs, best of 3
    python bench/rewards.py --groups 128 --repeats 1

The pairs imitate one GRPO step: each reference report (4-8 sentences drawn from tests/data's hand-labelled
sentences) has G samples that shuffle, drop, repeat or replace its sentences. Both sides score the same
clean_report tokens; pycocoevalcap's CIDEr-D takes its document frequencies from the pairs' references, so ours
is built from the same list (and the build is timed). Timings are the best of --repeats runs, side by side in one
process, on one core (everything here is single-threaded Python).
"""
import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanovalor.nlg import CiderD, bleu, clean_report, ngram_counts, rouge_l  # noqa: E402
from nanovalor.chexpert import label_report  # noqa: E402
from nanovalor.rewards import parse_weights, text_reward  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--groups", type=int, default=512)
parser.add_argument("--group-size", type=int, default=8)
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

rng = random.Random(0)
bank = [line.split("\t")[0] for line in (ROOT / "tests/data/chexpert_sentences.tsv").read_text().splitlines()
        if line.strip() and not line.startswith("#")]
raw_refs, raw_hyps = [], []
for _ in range(args.groups):
    ref = rng.sample(bank, rng.randint(4, 8))
    for _ in range(args.group_size):
        hyp = [s for s in ref if rng.random() < 0.8] + rng.sample(bank, rng.randint(0, 2))
        rng.shuffle(hyp) if rng.random() < 0.3 else None
        raw_hyps.append(" ".join(hyp))
        raw_refs.append(" ".join(ref))
hyps, refs = [clean_report(h) for h in raw_hyps], [clean_report(r) for r in raw_refs]
n = len(hyps)
gts, res = {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}


def pycoco():
    b = np.array(Bleu(4).compute_score(gts, res, verbose=0)[1][3])
    return b, Rouge().compute_score(gts, res)[1], Cider().compute_score(gts, res)[1]


def ours():
    counts = [ngram_counts(h) for h in hyps]  # shared by BLEU and CIDEr-D
    return bleu(hyps, refs, hyp_counts=counts)[1][:, 3], rouge_l(hyps, refs)[1], CiderD(refs)(hyps, refs, counts)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


weights = parse_weights("bleu4=0.25,rougeL=0.25,cider=0.1,clinical=0.4")
cider = CiderD(refs)


def mix():
    label_report.cache_clear()  # every repeat labels its reports anew, as a step with new samples does
    return text_reward(raw_hyps, raw_refs, weights, cider=cider)


runs = {"ref": pycoco, "ours": ours, "mix": mix,
        "label": lambda: [label_report.__wrapped__(h) for h in raw_hyps]}  # every report labelled, no cache
best, outputs = {k: math.inf for k in runs}, {}
for _ in range(args.repeats):  # interleaved, so that both sides see the same load on a shared machine
    for name, fn in runs.items():
        seconds, outputs[name] = timed(fn)
        best[name] = min(best[name], seconds)
t_ref, t_ours, t_mix, t_label = best["ref"], best["ours"], best["mix"], best["label"]
diff = max(np.abs(a - b).max() for a, b in zip(outputs["ours"], outputs["ref"]))

print(f"{n} report pairs ({args.groups} references x G={args.group_size}), "
      f"{np.mean([len(h.split()) for h in hyps]):.0f} words per sample, best of {args.repeats}, one core")
print(f"{'':46} {'seconds':>8} {'pairs/s':>9} {'speed-up':>8}")
print(f"{'BLEU-4 + ROUGE-L + CIDEr-D, pycocoevalcap 1.2':46} {t_ref:8.3f} {n / t_ref:9.0f} {1.0:8.1f}")
print(f"{'BLEU-4 + ROUGE-L + CIDEr-D, nanovalor':46} {t_ours:8.3f} {n / t_ours:9.0f} {t_ref / t_ours:8.1f}")
print(f"{'  max |ours - pycocoevalcap| per sample':46} {diff:8.1e}")
print(f"{'text_reward (clean + 3 NLG + clinical)':46} {t_mix:8.3f} {n / t_mix:9.0f}")
print(f"{'CheXpert labeler (reports/s)':46} {t_label:8.3f} {n / t_label:9.0f}")
