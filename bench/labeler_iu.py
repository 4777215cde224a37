"""The rule-based CheXpert labeler (nanovalor/chexpert.py) on real radiologists' reports: Open-i's development set
(odd-numbered reports, FINDINGS + IMPRESSION) against the NLM annotators' MeSH tags (nanovalor/openi.py).

    python bench/labeler_iu.py                 # fetches the torchxrayvision wheel into the cache the first time
    python bench/labeler_iu.py --errors 8      # more error categories per observation

Prints the per-observation table (support, precision, recall, F1; uncertain counted as positive, as clinical_f1
counts it), macro-F1 over the observations with >= 15 positives on the whole development set and on its two halves
(N = 1 mod 4, on which the rules were tuned, and N = 3 mod 4, kept to check that they generalise), labelling speed
on one core, and the largest error categories: false positives by the mention that fired, apart for positive and
uncertain labels (MeSH tags seldom code a hedged finding), false negatives by MeSH tag. No report text is printed.
"""
import argparse
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nanovalor import chexpert_rules, openi  # noqa: E402
from nanovalor.chexpert import CHEXPERT_LABELS, NO_FINDING, label_report  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--errors", type=int, default=3, help="error categories shown per observation")
parser.add_argument("--repeats", type=int, default=3, help="timing: best of this many passes")
args = parser.parse_args()

studies = openi.read_dev()
reference = [s.labels for s in studies]
label_report.cache_clear()
predicted = [label_report(s.text) for s in studies]
whole = openi.score(predicted, reference)
scored = whole["scored"]


def macro(rows):
    return openi.score([p for p, s in rows], [s.labels for p, s in rows], scored=scored)["macro"]


pairs = list(zip(predicted, studies))
halves = {r: [(p, s) for p, s in pairs if s.number % 4 == r] for r in (1, 3)}

print(f"Open-i development set: {len(studies)} reports (odd N with FINDINGS and IMPRESSION)")
print(f"{'observation':<22}{'support':>8}{'precision':>10}{'recall':>8}{'F1':>7}")
for name in CHEXPERT_LABELS:
    r = whole["per_label"][name]
    if r["support"]:
        mark = "" if name in scored else "   (not in the macro: < 15 positives)"
        print(f"{name:<22}{r['support']:>8}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}{mark}")
print(f"macro-F1 over {len(scored)}: {whole['macro']:.3f}   N = 1 mod 4 (tuned on, {len(halves[1])} reports): "
      f"{macro(halves[1]):.3f}   N = 3 mod 4 (held out, {len(halves[3])}): {macro(halves[3]):.3f}")

texts = [s.text for s in studies]
best = float("inf")
for _ in range(args.repeats):
    start = time.perf_counter()
    for t in texts:
        chexpert_rules.label_text(t)  # uncached
    best = min(best, time.perf_counter() - start)
print(f"speed: {len(texts) / best:,.0f} reports/s on one core ({len(texts)} reports, best of {args.repeats})")


def fired(text, k, values):
    """The mention phrases of observation k in the sentences of `text` that alone carry one of `values`; for No
    Finding missed, the findings that blanked it."""
    out = []
    for sentence in re.split(r"(?<=[.;])\s+", text):
        labels = chexpert_rules.label_text(sentence)
        if k == NO_FINDING and labels[k] is None:
            out += [" ".join(m.group().split()) for m in chexpert_rules.EVENTS.finditer(sentence.lower())
                    if m.lastgroup[0] == "m" and m.lastgroup != "m12"]
        elif k != NO_FINDING and labels[k] in values:
            out += [" ".join(m.group().split()) for m in chexpert_rules.EVENTS.finditer(sentence.lower())
                    if m.lastgroup in (f"m{k}", f"a{k}", "hf" if k in (1, 4) else "")]
    return out or ["(across sentences)"]


def tags_of(study, name):
    """For a missed observation, its MeSH tags; for No Finding stated where the annotators saw more, all tags."""
    prefixes = openi.TAG_MAP.get(name, ("",))
    return {"/".join(tag.split("/")[:1 if name else 2]) for tag in study.tags if tag.startswith(prefixes)}


print("\nlargest error categories (reports):")
categories = []
for k, name in enumerate(CHEXPERT_LABELS):
    if name not in scored:
        continue
    for kind, values in (("FP positive", (1.0,)), ("FP uncertain", (-1.0,))):
        wrong = [s for p, s in pairs if p[k] in values and s.labels[k] != 1.0]
        if wrong and k == NO_FINDING:  # what the annotators tagged instead of "normal"
            categories.append((len(wrong), name, "FP (MeSH tags)", Counter(t for s in wrong for t in tags_of(s, ""))))
        elif wrong:
            words = Counter(w for s in wrong for w in set(fired(s.text, k, values)))
            categories.append((len(wrong), name, kind, words))
    missed = [s for p, s in pairs if p[k] not in (1.0, -1.0) and s.labels[k] == 1.0]
    if missed and k == NO_FINDING:  # the findings that blanked No Finding
        categories.append((len(missed), name, "FN (findings read)",
                           Counter(w for s in missed for w in set(fired(s.text, k, ())))))
    elif missed:
        categories.append((len(missed), name, "FN (MeSH tags)", Counter(t for s in missed for t in tags_of(s, name))))
for n, name, kind, words in sorted(categories, key=lambda c: -c[0]):
    top = ", ".join(f"{w} {c}" for w, c in words.most_common(args.errors))
    print(f"{n:5d}  {name} {kind}: {top}")
