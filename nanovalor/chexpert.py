"""Clinical metrics of chest X-ray reports: a rule-based CheXpert-14 labeler, clinical F1 and the clinical reward.
(CheXbert, the BERT labeler, is in bert.py and labels with the same values.)

The labeler follows the CheXpert labeler's pipeline (Irvin et al. 2019, github.com/stanfordmlgroup/chexpert-labeler):
mention phrases per observation, negation and uncertainty rules, then the CheXpert aggregation. CheXpert classifies
mentions with a dependency parser (NegBio); we use NegEx-style rules on clause scopes instead (Chapman et al. 2001),
weight-free and fast (thousands of reports per second on one core):

- a report is split into clauses at . ; ! ? and at "but", "however", "which", ... ("2.5 cm" keeps its point);
- a negation or uncertainty cue before a mention ("no", "without", "possible", "cannot exclude") reaches it through
  lists ("no effusion, consolidation or pneumothorax") but not past a verb ("no effusion is seen and ...");
- cues after a mention ("pneumothorax is not seen", "effusion has resolved", "pneumonia cannot be excluded");
- anatomical mentions (heart, heart size, cardiac silhouette, mediastinum, cardiomediastinal contours) state
  nothing by themselves: "enlarged" makes them positive, "normal"/"within normal limits"/"unremarkable" negative,
  "borderline"/"top normal"/"upper limits of normal"/"prominent" uncertain;
- "no change in the effusion" is not a negation; common typos ("pnuemothorax") and abbreviations (ptx, chf, ett,
  pna, wnl, w/o, r/o) are read; de-identification tokens ("XXXX") are ordinary words.

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
import re
import sys
from functools import lru_cache

import numpy as np

from nanovalor.checkpoint import write_atomic
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
CARDIOMEGALY, SUPPORT_DEVICES, NO_FINDING, OTHER = 1, 12, 13, 14  # OTHER: findings outside the 14

# Mention phrases (regex fragments, lower case, " " = any whitespace), after CheXpert's phrases/mention lists
# with radiologists' synonyms, typos and abbreviations added. Index = position in CHEXPERT_LABELS.
_FINDINGS = {
    0: [r"mediastinal (?:widening|enlargement)", r"enlarged cardiomediastinum"],
    1: [r"cardiomegal\w*", r"cardiomeg[ae]ly", r"cardiac enlargement", r"cardiomyopathy"],
    2: [r"opaci\w*", r"opactiy", r"opacites", r"infiltrat\w*", r"air[- ]?space (?:disease|process|abnormalit\w*)",
        r"increased densit\w*", r"decreased translucency", r"interstitial (?:marking|pattern|prominence|"
        r"abnormalit\w*|lung disease|disease|thickening)s?", r"reticula\w*", r"reticulonodular\w*", r"reticulation",
        r"(?:parenchymal )?scar(?:s|ring)?", r"peribronchial (?:thickening|cuffing)", r"ground[- ]glass",
        r"haziness", r"hazy"],
    3: [r"mass(?:es)?", r"nodul(?:e|es|ar|arity)", r"nodular (?:densit\w*|opacit\w*|opacification)", r"lump",
        r"lesions?", r"carcinoma", r"neoplasm\w*", r"tumou?rs?", r"malignan\w*", r"cavitary lesion", r"cavitation"],
    4: [r"o?edema\w*", r"edmea", r"vascular (?:congestion|engorgement|prominence)", r"(?:pulmonary )?congestion",
        r"congestive", r"indistinct\w*", r"fluid overload", r"kerley(?: b)? lines?"],
    5: [r"consolidat\w*", r"consolidaton", r"consolodation", r"consoldation"],
    6: [r"pneumonias?", r"bronchopneumonia", r"pneumonitis", r"pnuemonia", r"pneumona", r"pnemonia", r"pna",
        r"infection", r"infectious(?: process)?"],
    7: [r"atelecta\w*", r"atelactasis", r"atelectsis", r"atlectasis", r"ateletasis", r"atx", r"collapsed?"],
    8: [r"(?:hydro)?pneumothora(?:x|ces)", r"pnuemothorax", r"pneumothroax", r"pneumothorx", r"pnemothorax",
        r"ptx"],
    9: [r"effusions?", r"effusoin", r"efusion", r"effussion", r"pleural fluid", r"hydrothorax"],
    10: [r"pleural (?:thickening|scar\w*|plaques?|fibrosis|reaction)", r"pleuro-?parenchymal scar\w*",
         r"pleuro-?pericardial scar\w*", r"fibrothorax", r"fibrosis"],
    11: [r"fractures?", r"fractured", r"fracure", r"fractue", r"fx"],
    12: [r"pacers?", r"pacemakers?", r"lines?", r"picc", r"tubes?", r"valves?", r"catheters?", r"hardware",
         r"arthroplast\w*", r"icd", r"defibrillator", r"devices?", r"drains?", r"plates?", r"screws?", r"cannula",
         r"apparatus", r"coils?", r"(?:sternotomy |sternal |surgical )?wires?", r"clips?", r"stents?", r"leads",
         r"generator", r"mediport", r"port-a-cath", r"ports?", r"ett", r"ngt", r"endotracheal", r"nasogastric",
         r"orogastric", r"swan[- ]ganz"],
    # Other findings: they make No Finding blank (CheXpert's phrases/mention/no_finding.txt), nothing else.
    OTHER: [r"emphysema\w*", r"hyperinfla\w*", r"hyperexpan\w*", r"granulom\w*", r"calcifi\w*", r"scoliosis",
         r"kyphosis", r"kyphotic", r"degenerat\w*", r"osteopeni\w*", r"osteophyt\w*", r"spondylosis", r"hernia",
         r"copd", r"bronchiectasis", r"plaques?", r"atheroscler\w*", r"thickening", r"cephalization", r"aspiration",
         r"bullae?", r"bullous", r"contusions?", r"metasta\w*", r"pneumomediastinum", r"pneumoperitoneum",
         r"inflam\w*", r"elevat\w*", r"eventration", r"blunt\w*", r"densit(?:y|ies)", r"volume loss",
         r"deformit\w*", r"hemorrhage", r"hematoma", r"hypertension", r"bronchitis", r"bronchiolitis",
         r"airways? disease", r"osteodystrophy", r"arthropathy", r"tracheostomy", r"thoracentesis", r"bullet"],
}
# Anatomical mentions (0: mediastinum, 1: heart): labelled only through a size qualifier.
_ANATOMY = {
    0: [r"cardiomediastin\w*(?: (?:silhouette|contours?|shadow|width|structures))?",
        r"mediastinum", r"mediastinal (?:contours?|silhouette|width|configuration|shadow|structures)",
        r"(?:hilar and )?mediastinal and hilar (?:contours?|silhouettes?|structures)",
        r"hilar and mediastinal (?:contours?|silhouettes?|structures)",
        r"pericardial silhouette"],
    1: [r"heart size", r"heart", r"cardiac (?:silhouette|size|shadow|contours?)", r"cardiac(?= and mediastinal)"],
}
# Cues, in priority order where they start at the same word ("no change" before "no").
_CUES = {
    "skip": [r"(?:behind|over|overlying|projecting over|through|beyond|obscur\w*|along|left of|right of|near|"
             r"adjacent to|at) the heart", r"(?:left |right )?heart borders?", r"cardiac borders?",
             r"pericardial effusions?", r"pleural line", r"calcified (?:nodul\w*|lymph nodes?)", r"massive",
             r"(?:lytic|sclerotic|blastic|osseous|bony|skin) lesions?", r"plate-?like"],
    "pseudo": [r"no (?:significant |appreciable |substantial |interval |definite |other )*(?:change|increase|decrease|"
               r"progression|worsening|improvement)", r"not (?:significantly )?changed", r"without (?:significant |"
               r"interval )?change", r"not only", r"gram negative"],
    "uncneg": [r"(?:cannot|can not|can't|could not|not|unable to) (?:be )?(?:entirely |completely |definitely )?"
               r"(?:excluded?|ruled? out)", r"difficult to (?:exclude|rule out)",
               r"not well (?:seen|visualized|assessed|evaluated)", r"poorly (?:seen|visualized)"],
    "negpost": [r"not (?:definitely |clearly |convincingly )?(?:seen|identified|present|evident|appreciated|"
                r"demonstrated|visualized|noted|detected|visible|apparent)", r"no longer (?:seen|present|"
                r"visualized|evident|identified|apparent|visible)", r"absent", r"(?:has |have )?(?:resolved|cleared)",
                r"(?:has |have )?been removed", r"removed"],
    "uncpost": [r"(?:is|are|was|were) (?:also |again )?(?:possible|likely|suspected|questioned|questionable|"
                r"a consideration|not excluded)", r"(?:may|might|could) (?:also )?be (?:present|seen)"],
    "versus": [r"versus", r"vs\.?"],  # "atelectasis versus pneumonia": both uncertain
    "neg": [r"no (?:suspicious|concerning|worrisome)", r"no", r"not", r"without", r"w/o", r"negative for",
            r"free of", r"absence of", r"resolution of", r"clear of", r"rather than", r"never", r"none", r"neither",
            r"nor", r"lack of", r"removal of"],
    "uncweak": [r"(?:to )?suggest\w*", r"(?:to )?indicat\w*", r"to represent"],
    "unc": [r"possible", r"possibly", r"probable", r"probably", r"likely", r"may", r"might", r"could", r"perhaps",
            r"questionabl[ey]", r"question of", r"suspicious", r"suspect\w*", r"concern\w*", r"worrisome",
            r"differential", r"consider\w*", r"presum\w*", r"indeterminate", r"equivocal", r"uncertain",
            r"evaluat\w* for", r"assess\w* for", r"rule out", r"r/o", r"borderline"],
    "borderline": [r"top[- ]normal", r"upper[- ](?:limits? (?:of )?)?normal", r"high[- ]normal", r"prominen\w*"],
    "normal": [r"within normal limits", r"wnl", r"normal", r"unremarkable"],
    "abnormal": [r"enlarg\w*", r"widen\w*", r"increased in size", r"large", r"big"],
    "copula": [r"is", r"are", r"was", r"were", r"remains?", r"appears?", r"seems?", r"has been", r"have been",
               r"there"],
    "affirm": [r"present", r"seen", r"noted", r"identified", r"demonstrated", r"visualized", r"evident",
               r"appreciated", r"observed", r"visible", r"detected"],
    "stopword": [r"but", r"however", r"although", r"though", r"except", r"aside from", r"apart from", r"which",
                 r"whereas", r"while", r"where", r"following", r"after", r"status post", r"s/p"],
}


def _compile():
    """One regex finds every mention and cue of a report in one scan, each as a named group. At a given word the
    first group that matches wins, so skips ("pericardial effusion") and longer cues ("no change", "cannot be
    excluded") come before the shorter ones they contain."""
    def group(name, fragments):
        return f"(?P<{name}>" + "|".join(f.replace(" ", r"\s+") for f in fragments) + ")"
    words = [group(kind, frags) for kind, frags in _CUES.items() if kind in ("skip", "pseudo", "uncneg")]
    words += [group("hf", [r"heart failure", r"chf"])]  # edema, and an uncertain Cardiomegaly (CheXpert rule)
    words += [group(kind, frags) for kind, frags in _CUES.items() if kind not in ("skip", "pseudo", "uncneg")]
    words += [group(f"m{i}", frags) for i, frags in _FINDINGS.items()]
    words += [group(f"a{i}", frags) for i, frags in _ANATOMY.items()]
    return re.compile(r"(?P<stop>(?<!\d)\.|\.(?!\d)|[;!?]|\n\s*\n)|(?P<qmark>(?<![\w?])\?(?=[a-z]))"
                      r"|\b(?:" + "|".join(words) + r")(?!\w)")


_EVENTS = _compile()
_KIND = {"qmark": "unc"}  # group name -> cue kind where they differ ("?pneumonia" is uncertain)
_MENTIONS = {"hf"} | {f"m{i}" for i in _FINDINGS} | {f"a{i}" for i in _ANATOMY}


# Cues reach at most this many events (mentions and cues) away: long lists still fit, and a 100,000-character
# "clause" without punctuation stays linear in time.
_WINDOW = 24


def _pre_cue(kinds, i):
    """Label from the cues before position i of a clause, walking back until a verb: 0, -1 or None."""
    for j in range(i - 1, max(-1, i - 1 - _WINDOW), -1):
        k = kinds[j]
        if k in ("copula", "affirm", "negpost"):
            return None
        if k == "neg":
            return 0.0
        if k in ("unc", "uncneg", "versus"):
            return -1.0
        if k == "uncweak":  # "no consolidation to suggest pneumonia": negated; "suggestive of pneumonia": uncertain
            return 0.0 if "neg" in kinds[max(0, j - _WINDOW):j] else -1.0
    return None


def _post_cue(kinds, i):
    """Label from the cues after a finding mention ("is not seen", "cannot be excluded"): 0, -1 or None."""
    seen_verb = seen_mention = False
    for k in kinds[i + 1:i + 1 + _WINDOW]:
        if k == "negpost":
            return 0.0
        if k in ("uncpost", "uncneg") or (k == "versus" and not seen_mention):  # "X versus Y": X and Y only
            return -1.0
        if k == "affirm":
            return None
        if k == "copula":
            seen_verb = True
        elif k in _MENTIONS:
            if seen_verb:  # a new subject after the verb: its own predicate follows
                return None
            seen_mention = True
    return None


def _anatomy_label(kinds, i):
    """An anatomical mention: labelled by the first size qualifier after it (or the one right before it)."""
    seen_verb, q, unsure = False, None, False
    for j in range(i + 1, min(len(kinds), i + 1 + _WINDOW)):
        k = kinds[j]
        if k in ("normal", "abnormal", "borderline"):
            q = j
            break
        unsure |= k == "unc"
        if k == "copula":
            seen_verb = True
        elif k in _MENTIONS and seen_verb:
            break
    if q is None and unsure:  # "the heart is borderline in size"
        return -1.0
    if q is None:  # "normal heart size", "enlarged cardiac silhouette", "normal heart size and mediastinal contours"
        q = i - 1
        while q >= 0 and kinds[q] in ("a0", "a1"):
            q -= 1
        if q < 0 or kinds[q] not in ("normal", "abnormal", "borderline"):
            return None
        between, before = (), q
    else:
        between, before = kinds[i + 1:q], i
    if kinds[q] == "normal":
        return 0.0
    if "neg" in between or "negpost" in between:  # "the heart is not enlarged"
        return 0.0
    if "unc" in between:  # "the heart may be enlarged"
        return -1.0
    pre = _pre_cue(kinds, before)
    if pre is not None:
        return pre
    return -1.0 if kinds[q] == "borderline" else 1.0


def _label_clause(names, found):
    kinds = [_KIND.get(n, n) for n in names]
    for i, name in enumerate(names):
        if name not in _MENTIONS:
            continue
        if name[0] == "m" or name == "hf":
            label = _post_cue(kinds, i)
            if label is None:
                label = _pre_cue(kinds, i)
            label = 1.0 if label is None else label
            obs = 4 if name == "hf" else int(name[1:])
            found.setdefault(obs, []).append(label)
            if name == "hf" and label != 0.0:
                found.setdefault(CARDIOMEGALY, []).append(-1.0)
        else:  # anatomy
            label = _anatomy_label(kinds, i)
            if label is not None:
                found.setdefault(int(name[1:]), []).append(label)


@lru_cache(maxsize=65536)
def label_report(text: str) -> tuple:
    """The 14 CheXpert labels of one report, in CHEXPERT_LABELS order: 1.0, 0.0, -1.0 or None (blank).

    Cached: a GRPO group repeats texts, and the same references are labelled at every step and every evaluation.
    """
    found, clause = {}, []
    for m in _EVENTS.finditer(str(text).lower()):
        name = m.lastgroup
        if name in ("stop", "stopword"):
            if clause:
                _label_clause(clause, found)
            clause = []
        elif name not in ("skip", "pseudo"):
            clause.append(name)
    if clause:
        _label_clause(clause, found)
    labels = [None] * 14
    for obs, values in found.items():
        if obs < 14:  # positive beats uncertain beats negative
            labels[obs] = 1.0 if 1.0 in values else -1.0 if -1.0 in values else 0.0
    findings = [v for obs, v in found.items() if obs not in (SUPPORT_DEVICES, NO_FINDING)]
    if not any(1.0 in v or -1.0 in v for v in findings):
        labels[NO_FINDING] = 1.0
    return tuple(labels)


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
