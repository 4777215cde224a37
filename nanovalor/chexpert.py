"""Clinical metrics of chest X-ray reports: a rule-based CheXpert-14 labeler, clinical F1, the clinical reward,
and CheXbert (the BERT labeler) when its weights are given.

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
observations and all 14); clinical_reward is a per-sample agreement in (0, 1] (formula in its docstring);
load_chexbert reads `chexbert.pth` and labels with the same 1.0 / 0.0 / -1.0 / None values.

    python -m nanovalor.rewards label reports.txt --out labels.csv
"""
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn

from nanovalor.chexpert_rules import NO_FINDING, label_text  # noqa: F401 (NO_FINDING: part of this module's API)

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

def _positive(labels):
    """(N, 14) 0/1 array: positive or uncertain counts as present (f1chexbert's convention), blank/negative not."""
    return np.array([[v in (1.0, -1.0) for v in row] for row in labels], dtype=np.int64).reshape(-1, 14)


def clinical_f1(hyp_labels, ref_labels) -> dict:
    """Micro and macro F1 of hypothesis labels against reference labels, over the 5 competition observations and
    all 14, uncertain counted as positive (f1chexbert, RadEval), an observation without any positive on either
    side scoring F1 = 0 in the macro mean (sklearn's zero_division=0). Also each observation's F1."""
    hyp, ref = _positive(hyp_labels), _positive(ref_labels)
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


# ------------------------------------------------------------------------------------------------------- CheXbert

class CheXbert(nn.Module):
    """CheXbert (Smit et al. 2020, github.com/stanfordmlgroup/CheXbert): BERT-base, then on the [CLS] vector 13
    linear heads with 4 classes (blank, positive, negative, uncertain) and one with 2 (blank, positive) for
    No Finding. Parameter names follow the released chexbert.pth (bert.*, linear_heads.N.*)."""

    CLASS_TO_LABEL = (None, 1.0, 0.0, -1.0)  # CheXbert's class index -> our label value

    def __init__(self, cfg):
        super().__init__()
        from nanovalor.expert import Bert  # lazily: expert.py imports data.py, which imports this module
        self.bert = Bert(cfg)
        h = cfg.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(h, 4) for _ in range(13)] + [nn.Linear(h, 2)])
        self.tokenizer = None

    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> list of 14 logit tensors, (B, 4) x 13 and (B, 2)."""
        cls = self.bert(input_ids, attention_mask)[:, 0]  # (B, H)
        return [head(cls) for head in self.linear_heads]

    @torch.no_grad()
    def label(self, texts, batch_size=32) -> list:
        """14-label tuples (1.0 / 0.0 / -1.0 / None) for each text; reports longer than 512 tokens are truncated."""
        from nanovalor.expert import tokenize
        if self.tokenizer is None:
            raise ValueError("CheXbert.label: no tokenizer (load the model with load_chexbert)")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [" ".join(str(t).split()) for t in texts[start:start + batch_size]]  # CheXbert's cleaning
            ids, mask = tokenize(self.tokenizer, chunk)
            classes = torch.stack([x.argmax(-1) for x in self(ids.to(device), mask.to(device))], 1)  # (b, 14)
            out += [tuple(self.CLASS_TO_LABEL[c] for c in row) for row in classes.tolist()]
        return out


def load_chexbert(checkpoint, tokenizer_folder, device="cpu") -> CheXbert:
    """CheXbert from `chexbert.pth` (a dict with `model_state_dict`, keys prefixed `module.`), loaded with
    torch.load(weights_only=True), and the bert-base-uncased WordPiece tokenizer in `tokenizer_folder`
    (tokenizer.json or vocab.txt). The BERT shape is read from the weights (heads = hidden / 64, as BERT-base)."""
    from nanovalor.expert import bert_config_from_state, load_bert_tokenizer
    from nanovalor.policy import read_weights
    state = {k.removeprefix("module."): v for k, v in read_weights(checkpoint, key="model_state_dict").items()}
    state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.") and not k.endswith("position_ids")}
    try:
        cfg = bert_config_from_state(state, "bert.")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{checkpoint}: not a CheXbert checkpoint (missing or odd BERT weights: {e})") from None
    model = CheXbert(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: CheXbert weights do not match: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tokenizer = load_bert_tokenizer(tokenizer_folder, max_length=512)
    return model.to(device).eval()
