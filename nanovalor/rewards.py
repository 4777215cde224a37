"""Rewards and metrics for chest X-ray reports: the text reward of GRPO stage `text` and the evaluation metrics.

The metrics themselves live elsewhere: nlg.py (clean_report, BLEU-1..4, ROUGE-L, METEOR, CIDEr-D, numerically
pycocoevalcap's), chexpert.py (the CheXpert-14 rule labeler, clinical F1, the clinical reward) and bert.py
(CheXbert). This file mixes them: R_text = sum_k w_k * m_k over the components named in the weights, every
component returned.

    from nanovalor.nlg import CiderD
    from nanovalor.rewards import parse_weights, text_reward
    cider = CiderD(train_reports)                       # document frequencies, once
    rewards, parts = text_reward(samples, refs, parse_weights("bleu4=0.25,rougeL=0.25,clinical=0.5"), cider)
"""
import math

import numpy as np

from nanovalor.chexpert import clinical_f1, clinical_reward, label_reports
from nanovalor.nlg import CiderD, as_ref_lists, bleu, cider_d, clean_report, meteor, ngram_counts, rouge_l

# Components a text reward can mix. cider is CIDEr-D on its own scale (x10: about 0..10, mostly below 3), the
# others lie in [0, 1]; clinical is clinical_reward on the rule labeler's labels, chexbert the same on CheXbert's.
COMPONENTS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "meteor", "cider", "clinical", "chexbert")


def parse_weights(spec: str) -> dict:
    """"bleu4=0.25,rougeL=0.25,clinical=0.5" -> {"bleu4": 0.25, ...}. A zero weight logs a component unrewarded."""
    weights = {}
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        name, eq, value = (x.strip() for x in item.partition("="))
        if name not in COMPONENTS:
            raise ValueError(f"reward weights {spec!r}: unknown component {name!r}; valid: {', '.join(COMPONENTS)}")
        try:
            weight = float(value) if eq else math.nan
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"reward weights {spec!r}: {item!r} needs a finite number, as in {name}=0.5")
        if name in weights:
            raise ValueError(f"reward weights {spec!r}: {name!r} given twice")
        weights[name] = weight
    if not weights:
        raise ValueError(f"reward weights {spec!r}: empty; expected e.g. bleu4=0.25,rougeL=0.25,clinical=0.5")
    return weights


def _clinical(hyp_labels, ref_labels):
    return np.array([clinical_reward(h, r) for h, r in zip(hyp_labels, ref_labels)])


def text_reward(samples, references, weights, cider=None, style="coco", chexbert=None):
    """One reward per sample and every weighted component by name, each a float32 array of shape (N,).

    samples: N generated reports; references: N reference reports (a GRPO group repeats its reference; it is
    processed once). Text is normalised with clean_report(style) for the NLG metrics and labelled raw for the
    clinical ones. cider: a CiderD built once from the training references; without one, the document
    frequencies come from this batch's references. chexbert: a loaded CheXbert, needed for the "chexbert" weight.
    """
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"text_reward: unknown components {sorted(unknown)}; valid: {', '.join(COMPONENTS)}")
    if len(samples) != len(references):
        raise ValueError(f"text_reward: {len(samples)} samples but {len(references)} references")
    hyps = [clean_report(s, style) for s in samples]
    cleaned = {r: clean_report(r, style) for r in set(references)}  # B distinct references among the B*G
    refs = [cleaned[r] for r in references]
    parts = {}
    counts = [ngram_counts(h) for h in hyps] if {"bleu1", "bleu2", "bleu3", "bleu4", "cider"} & set(weights) else None
    if any(k.startswith("bleu") for k in weights):
        per_sample = bleu(hyps, refs, hyp_counts=counts)[1]  # (N, 4)
        parts.update({f"bleu{n}": per_sample[:, n - 1] for n in range(1, 5) if f"bleu{n}" in weights})
    if "rougeL" in weights:
        parts["rougeL"] = rouge_l(hyps, refs)[1]
    if "meteor" in weights:
        parts["meteor"] = meteor(hyps, refs)[1]
    if "cider" in weights:
        parts["cider"] = (cider or CiderD(sorted(set(refs))))(hyps, refs, hyp_counts=counts)
    if "clinical" in weights:
        parts["clinical"] = _clinical(label_reports(samples), label_reports(references))
    if "chexbert" in weights:
        if chexbert is None:
            raise ValueError("text_reward: the 'chexbert' weight needs a CheXbert model (load_chexbert)")
        parts["chexbert"] = _clinical(chexbert.label(list(samples)), chexbert.label(list(references)))
    parts = {k: np.asarray(parts[k], dtype=np.float32) for k in weights}
    total = np.zeros(len(samples), dtype=np.float32)
    for k, w in weights.items():
        total += np.float32(w) * parts[k]
    return total, parts


def corpus_metrics(hyps, refs, style="coco", chexbert=None) -> dict:
    """The evaluation table: corpus BLEU-1..4, ROUGE-L, METEOR, CIDEr-D (document frequencies from these refs, as
    pycocoevalcap), clinical F1 micro/macro over 5 and 14 observations (rule labeler; also CheXbert's when a model
    is given), and under "per_sample" each sample's values and labels. refs: one str or a list per sample (the
    clinical metrics use the first)."""
    if len(hyps) != len(refs):
        raise ValueError(f"corpus_metrics: {len(hyps)} hypotheses but {len(refs)} references")
    ref_lists = as_ref_lists(refs)
    h = [clean_report(x, style) for x in hyps]
    r = [[clean_report(x, style) for x in rl] for rl in ref_lists]
    out, per = {}, {}
    corpus_bleu, per_bleu = bleu(h, r)
    for n in range(4):
        out[f"bleu{n + 1}"], per[f"bleu{n + 1}"] = corpus_bleu[n], per_bleu[:, n].tolist()
    for name, fn in (("rougeL", rouge_l), ("meteor", meteor), ("cider", cider_d)):
        score, scores = fn(h, r)
        out[name], per[name] = float(score), scores.tolist()
    hyp_labels, ref_labels = label_reports(hyps), label_reports([rl[0] for rl in ref_lists])
    out.update({k: v for k, v in clinical_f1(hyp_labels, ref_labels).items() if k != "f1_per_label"})
    per["clinical"] = _clinical(hyp_labels, ref_labels).tolist()
    per["labels_hyp"], per["labels_ref"] = hyp_labels, ref_labels
    if chexbert is not None:
        hyp_cb, ref_cb = chexbert.label(list(hyps)), chexbert.label([rl[0] for rl in ref_lists])
        out.update({"chexbert_" + k: v for k, v in clinical_f1(hyp_cb, ref_cb).items() if k != "f1_per_label"})
        per["chexbert_labels_hyp"], per["chexbert_labels_ref"] = hyp_cb, ref_cb
    out["per_sample"] = per
    return out
