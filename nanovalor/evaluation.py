"""Held-out evaluation of a policy: greedy reports for a split, then the metric table of radiology report
generation (BLEU-1..4, ROUGE-L, METEOR, CIDEr-D, clinical F1) and VALOR's grounding measures (expert similarity,
hallucination and omission rates).

    metrics, reports = evaluate(policy, tokenizer, studies, expert=expert)
    print(table({"sft": metrics}))

train.py calls it before and after a stage and every eval_every steps; eval.py compares checkpoints with it.
"""
import json
from pathlib import Path

import numpy as np
import torch

from nanovalor import dist
from nanovalor.data import DEFAULT_PROMPT, load_image, preprocess, read_preprocessor_config
from nanovalor.generate import decode_completions, encode_prompts, sample
from nanovalor.chexpert import NO_FINDING, positive
from nanovalor.rewards import corpus_metrics

# (name in the table, key, format); the direction each is better in goes in the README.
METRICS = [("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("BLEU-3", "bleu3"), ("BLEU-4", "bleu4"), ("ROUGE-L", "rougeL"),
           ("METEOR", "meteor"), ("CIDEr-D", "cider"), ("F1-5 micro", "f1_micro_5"), ("F1-5 macro", "f1_macro_5"),
           ("F1-14 micro", "f1_micro_14"), ("F1-14 macro", "f1_macro_14"), ("clinical reward", "clinical"),
           ("expert sim", "expert_sim"), ("hallucination", "hallucination"), ("omission", "omission"),
           ("normal share", "normal_share"), ("words", "words"), ("distinct", "distinct"),
           ("CheXbert F1-5 micro", "chexbert_f1_micro_5"), ("CheXbert F1-14 micro", "chexbert_f1_micro_14")]


def training_config(folder):
    """The train.py config a checkpoint was trained with (train_config.json beside its weights), {} if absent:
    generation_settings reads the training prompt from it, eval.py the config difference of a results row."""
    path = Path(folder) / "train_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None


def generation_settings(trained, prompt="", max_new_tokens=0):
    """(prompt, max_new_tokens) to sample from a checkpoint with: those given, else those it was trained with
    (`trained`: its training_config), else data.DEFAULT_PROMPT and 128. One rule for sample.py, eval.py, bench/."""
    return prompt or trained.get("prompt", DEFAULT_PROMPT), max_new_tokens or trained.get("max_new_tokens", 128)


def images_of(policy, studies):
    """The policy's pixels (n, 3, S, S), or data.PackedImages (Qwen2.5-VL), for the first view of each study."""
    processing = read_preprocessor_config(policy.preprocessor_config or {})
    return preprocess([load_image(study.images[0]) for study in studies], processing)


@torch.no_grad()
def greedy_reports(policy, tokenizer, studies, prompt=DEFAULT_PROMPT, batch_size=32, max_new_tokens=128):
    """One greedy report per study (first view), batched."""
    was_training, reports = policy.training, []
    policy.eval()
    device = policy.lm_head.weight.device
    for i in range(0, len(studies), batch_size):
        chunk = studies[i:i + batch_size]
        images = images_of(policy, chunk)
        ids, mask = encode_prompts(tokenizer, policy.cfg, [prompt] * len(chunk), images)
        out = sample(policy, ids.to(device), mask.to(device), images.to(device), max_new_tokens=max_new_tokens,
                     temperature=0.0)
        reports += decode_completions(tokenizer, out)
    policy.train(was_training)
    return reports


def normal_share(labels) -> float:
    """The share of label vectors (14-tuples of chexpert's labels) with No Finding = 1.0; 0.0 for none."""
    return float(np.mean([row[NO_FINDING] == 1.0 for row in labels])) if labels else 0.0


def finding_rates(hyp_labels, ref_labels):
    """(hallucination, omission, normal share) over the 13 findings (positive or uncertain = stated):
    hallucination = stated findings the reference does not have / all stated findings; omission = reference
    findings the report does not state / all reference findings; normal share = reports labelled No Finding."""
    stated, truth = positive(hyp_labels)[:, :13].astype(bool), positive(ref_labels)[:, :13].astype(bool)  # (N, 13)
    hallucination = (stated & ~truth).sum() / max(1, stated.sum())
    omission = (truth & ~stated).sum() / max(1, truth.sum())
    return float(hallucination), float(omission), normal_share(hyp_labels)


def report_metrics(reports, studies, expert=None, chexbert=None):
    """Every metric of METRICS for generated reports against the studies' references (with an expert, the mean
    cosine similarity between each X-ray and its generated report; with CheXbert, its clinical F1s too)."""
    m = corpus_metrics(reports, [study.report for study in studies], chexbert=chexbert)
    per = m.pop("per_sample")
    m["clinical"] = float(np.mean(per["clinical"]))
    m["hallucination"], m["omission"], m["normal_share"] = finding_rates(per["labels_hyp"], per["labels_ref"])
    m["words"] = float(np.mean([len(r.split()) for r in reports]))
    m["distinct"] = len(set(reports)) / max(1, len(reports))
    if expert is not None:
        m["expert_sim"] = float(expert.similarity([s.images[0] for s in studies], [[r] for r in reports]).mean())
    return m


def evaluate(policy, tokenizer, studies, expert=None, prompt=DEFAULT_PROMPT, batch_size=32, max_new_tokens=128,
             chexbert=None):
    """Greedy reports for `studies` and their metrics: (metrics dict, reports)."""
    reports = greedy_reports(policy, tokenizer, studies, prompt, batch_size, max_new_tokens)
    return report_metrics(reports, studies, expert, chexbert), reports


def evaluate_sharded(name, policy, tokenizer, studies, prompt, max_new_tokens, expert=None, chexbert=None,
                     wrapped=None, fsdp=False):
    """train.py's held-out evaluation: greedy reports with each rank a shard of `studies` (FSDP: the weights of
    `wrapped` gathered once), the metrics and their table on rank 0 (None on the other ranks)."""
    rank, world = dist.rank_and_world()
    with dist.gathered(wrapped, fsdp):
        mine = greedy_reports(policy, tokenizer, studies[rank::world], prompt, max_new_tokens=max_new_tokens)
    shards = dist.gather_objects(mine)
    if rank != 0:
        return None
    reports = [shards[i % world][i // world] for i in range(len(studies))]  # back in the studies' order
    metrics = report_metrics(reports, studies, expert, chexbert)
    print(f"{name} ({len(studies)} studies):\n{table({name: metrics})}", flush=True)
    return metrics


def table(rows, first="run"):
    """{run name: metrics} -> a markdown table, one column per metric present in every row. A value that is a
    string is written as it is (bench/phantom_results.py's "mean ± std"); `first` heads the runs' column."""
    keys = [(name, key) for name, key in METRICS if all(key in m for m in rows.values())]
    lines = [f"| {first} | " + " | ".join(name for name, _ in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    cell = lambda v, key: v if isinstance(v, str) else f"{v:.4f}" if key != "words" else f"{v:.1f}"
    for run, m in rows.items():
        lines.append(f"| {run} | " + " | ".join(cell(m[key], key) for _, key in keys) + " |")
    return "\n".join(lines)
