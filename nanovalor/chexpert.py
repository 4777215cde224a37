"""Clinical metrics of chest X-ray reports: a rule-based CheXpert-14 labeler, clinical F1 and the clinical reward.
(CheXbert, the BERT labeler, is in bert.py and labels with the same values.)

The labeler follows the CheXpert labeler's pipeline (Irvin et al. 2019, github.com/stanfordmlgroup/chexpert-labeler):
mention phrases per observation, negation and uncertainty rules, then the CheXpert aggregation. CheXpert classifies
mentions with a dependency parser (NegBio); chexpert_rules.py holds our weight-free rules instead (NegEx-style cue
scopes, Chapman et al. 2001), thousands of reports per second on one core. Measured on real radiologists' reports
(Open-i, against the NLM annotators' MeSH tags; nanovalor/openi.py, bench/labeler_iu.py, tests/test_labeler_iu.py).

Labels per observation: 1.0 positive, 0.0 negative, -1.0 uncertain, None blank. Aggregation (CheXpert): positive
beats uncertain beats negative; "chf"/"heart failure" positive or uncertain adds an uncertain Cardiomegaly;
No Finding is 1.0 when no observation other than Support Devices (and no other finding such as emphysema,
granuloma or scoliosis) is positive or uncertain, and blank otherwise.

clinical_f1 scores label vectors as f1chexbert does (uncertain = positive; micro / macro F1 over the 5 competition
observations and all 14); clinical_reward is a per-sample agreement in (0, 1] (formula in its docstring).

    python -m nanovalor.chexpert label reports.txt --out labels.csv    # chexpert-labeler's CSV format
"""
import argparse
import csv
import io
import sys
from functools import lru_cache

import numpy as np

from nanovalor.checkpoint import write_atomic
from nanovalor.chexpert_rules import NO_FINDING, label_text  # noqa: F401 (NO_FINDING: part of this module's API)
from nanovalor.nlg import read_reports

# The 14 CheXpert observations, in the order CheXpert, CheXbert and f1chexbert use (stanfordmlgroup/CheXbert
# src/constants.py). Label vectors throughout nanovalor follow this order.
CHEXPERT_LABELS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
# The five "competition" observations of CheXpert, used for F1-5.
COMPETITION_LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")


@lru_cache(maxsize=65536)
def label_report(text: str) -> tuple:
    """The 14 CheXpert labels of one report, in CHEXPERT_LABELS order: 1.0, 0.0, -1.0 or None (blank); the rules
    are in chexpert_rules.py.

    Cached: a GRPO group repeats texts, and the same references are labelled at every step and every evaluation.
    """
    return label_text(text)


def label_reports(texts) -> list:
    """label_report for each text (cached there: identical texts are labelled once)."""
    return [label_report(t) for t in texts]


# ---------------------------------------------------------------------------------------------------- clinical F1

def positive(labels):
    """(N, 14) 0/1 array: positive or uncertain counts as present (f1chexbert's convention), blank/negative not."""
    return np.array([[v in (1.0, -1.0) for v in row] for row in labels], dtype=np.int64).reshape(-1, 14)


def clinical_f1(hyp_labels, ref_labels) -> dict:
    """Micro and macro F1 of hypothesis labels against reference labels, over the 5 competition observations and
    all 14, uncertain counted as positive (f1chexbert, RadEval), an observation without any positive on either
    side scoring F1 = 0 in the macro mean (sklearn's zero_division=0). Also each observation's F1."""
    hyp, ref = positive(hyp_labels), positive(ref_labels)
    tp = (hyp & ref).sum(0)  # (14,)
    fp, fn = (hyp & (1 - ref)).sum(0), ((1 - hyp) & ref).sum(0)
    per_label = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    out = {}
    for name, idx in (("5", [CHEXPERT_LABELS.index(c) for c in COMPETITION_LABELS]), ("14", list(range(14)))):
        t, p, n = tp[idx].sum(), fp[idx].sum(), fn[idx].sum()
        out[f"f1_micro_{name}"] = float(2 * t / (2 * t + p + n)) if 2 * t + p + n > 0 else 0.0
        out[f"f1_macro_{name}"] = float(per_label[idx].mean())
    out["f1_per_label"] = {label: float(f) for label, f in zip(CHEXPERT_LABELS, per_label)}
    return out


def clinical_reward(hyp_labels, ref_labels) -> float:
    """Agreement of one sample's findings with its reference's, in (0, 1].

    Over the 13 observations other than No Finding, a finding weighs p = 1 when positive, 0.5 when uncertain and
    0 when negative or not mentioned, in the hypothesis (h) and in the reference (r):

        R = (1 + sum_k min(h_k, r_k)) / (1 + sum_k max(h_k, r_k))

    a Jaccard index of the stated findings with one added agreement, so that it is defined for normal reports:
    normal vs normal = 1; every finding the sample states and the reference lacks (a hallucination) and every one
    it misses grows the denominator only: one hallucination on a normal study gives 1/2, two give 1/3; a correct
    finding plus a hallucination gives 2/3; stating as uncertain what the reference states as positive gives 3/4.
    """
    weight = {1.0: 1.0, -1.0: 0.5}
    both = [(weight.get(h, 0.0), weight.get(r, 0.0)) for h, r in zip(hyp_labels[:13], ref_labels[:13])]
    return (1.0 + sum(min(h, r) for h, r in both)) / (1.0 + sum(max(h, r) for h, r in both))


# -----------------------------------------------------------------------------
# The labeler as a command: one report per line in, chexpert-labeler's CSV out.

# chexpert-labeler's CSV columns (stanfordmlgroup/chexpert-labeler constants.py): No Finding first.
CSV_COLUMNS = ("Reports", "No Finding") + CHEXPERT_LABELS[:13]


def write_label_csv(path, reports, labels):
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(CSV_COLUMNS)
    for report, row in zip(reports, labels):
        by_name = dict(zip(CHEXPERT_LABELS, row))
        w.writerow([report] + ["" if by_name[c] is None else f"{by_name[c]:.1f}" for c in CSV_COLUMNS[1:]])
    write_atomic(path, text.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanovalor.chexpert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    label = sub.add_parser("label", help="label one report per line with the 14 CheXpert observations")
    label.add_argument("reports", help="text file, one report per line (UTF-8; lines end at \\n or \\r\\n)")
    label.add_argument("--out", required=True, help="CSV to write: Reports + 14 columns of 1.0 / 0.0 / -1.0 / empty")
    args = parser.parse_args(argv)
    reports = read_reports(args.reports)
    write_label_csv(args.out, reports, label_reports(reports))
    print(f"labelled {len(reports)} reports -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
