"""The phantom world's image-text expert: its training, a judge of any expert, and two control experts.

VALOR's stage `visual` rewards each sampled report by a frozen CLIP-style expert's similarity with the X-ray. On the
phantom world that expert is ours, so we can ask how good a judge it is and what an ideal and a useless one would do:

  - train(world, out): phantoms.tiny_expert trained with CLIP's contrastive loss (Radford et al. 2021, arXiv
    2103.00020) plus, for every X-ray, `negatives` hard negative reports in the softmax: reports of the same study
    written by the report writer with one finding removed, added or swapped (NegCLIP's idea, Yuksekgonul et al.
    2022, arXiv 2210.01936: captions that differ from the true one in one detail teach the model that detail).
  - judge(scorer, studies): how well `scorer.similarity` ranks, for each held-out study, its own report and 7 near
    misses (within-group Spearman with clinical correctness; the true report first), and retrieves each X-ray's own
    report among 200. bench/expert_judge.py prints it for an expert folder.
  - Oracle / Null: PHANTOM-ONLY controls with Expert.similarity's interface. Oracle scores a report by the agreement
    of its labels (our labeler's) with the study's true labels: the best any expert could judge. Null scores each
    group against another study's X-ray: an expert's text preferences with no information about the image.

    python -m nanovalor.phantom_expert --world out/phantoms --out out/expert/checkpoint   # train (default recipe)
    python bench/expert_judge.py --expert out/expert/checkpoint                           # judge it

Tests: `python -m pytest -q tests/test_phantom_expert.py`.
"""
import argparse
import hashlib
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nanovalor import phantoms
from nanovalor.chexpert import CHEXPERT_LABELS, label_reports
from nanovalor.data import load_image, preprocess, read_dataset
from nanovalor.expert import save
from nanovalor.phantom_reports import write_report

LUNG_OPACITY, EDEMA, CONSOLIDATION, PNEUMONIA, ATELECTASIS = (CHEXPERT_LABELS.index(name) for name in (
    "Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Atelectasis"))

# ----------------------------------------------------------------------------------------------------------------
# near misses and clinical correctness


def near_miss(findings: dict, rng) -> dict:
    """`findings` with one finding removed, one added, or one swapped for another: what the report writer writes
    for a near miss. The change is drawn evenly among those the study allows; added findings are drawn without
    priors."""
    present = list(findings)
    absent = [name for name in phantoms.FINDINGS if name not in findings]
    allowed = np.array([bool(present), bool(absent), bool(present and absent)], float)
    op = ("remove", "add", "swap")[rng.choice(3, p=allowed / allowed.sum())]
    out = dict(findings)
    if op in ("remove", "swap"):
        del out[present[rng.integers(len(present))]]
    if op in ("add", "swap"):
        name = absent[rng.integers(len(absent))]
        out[name] = phantoms.sample_finding(name, rng)
    return out


def observations(labels) -> set:
    """The findings a 14-label vector states, one CheXpert observation each (indices into CHEXPERT_LABELS, No
    Finding left out). The writer, as radiologists do, states a consolidation as Consolidation, Lung Opacity and / or
    Pneumonia (positive or uncertain), and edema or atelectasis sometimes with Lung Opacity too: those count as one
    finding, Consolidation (Lung Opacity alone beside edema or atelectasis counts as theirs)."""
    positive = {k for k in range(13) if labels[k] == 1.0}
    if (LUNG_OPACITY in positive and not positive & {EDEMA, ATELECTASIS}) or labels[PNEUMONIA] in (1.0, -1.0):
        positive.add(CONSOLIDATION)
    return positive - {LUNG_OPACITY, PNEUMONIA}


def correctness(truth, labels, synonyms=True, false_weight=1) -> float:
    """(|P & P'| + 1) / (|P | P'| + 1): P the findings of the study's true labels, P' those of a report's (14-label
    vectors). 1 for the same findings (normal included), 1/2 for one finding missed or added to a normal study.
    synonyms=True reads findings with observations(); False takes the positive labels among the 13 as they are
    (a consolidation written as an opacity then differs from one written as a consolidation). false_weight: each
    stated finding the study lacks counts this many times in the denominator (2: 1/3 for one added to a normal
    study, still 1/2 for one missed), a judge stricter about hallucinations than about omissions."""
    read = observations if synonyms else (lambda v: {k for k in range(13) if v[k] == 1.0})
    p, q = read(truth), read(labels)
    return (len(p & q) + 1) / (len(p | q) + (false_weight - 1) * len(q - p) + 1)


# ----------------------------------------------------------------------------------------------------------------
# the phantom world's studies, with the findings they were drawn with


def load_studies(annotation, split, world_seed=0, n=None) -> list[dict]:
    """The first n studies of `split` of a phantom world (phantoms.generate's annotation.json) as dicts: image
    (grayscale uint8 array), report, labels (14), findings (the parameters they were drawn with, recomputed with
    phantoms.make_report: the world's seed is world_seed, checked against the stored reports)."""
    studies = read_dataset(annotation, split)[:n]
    out = []
    for s in studies:
        split_name, index = s.id.split("-")[1:]
        made = phantoms.make_report(world_seed, split_name, int(index))
        if made["report"] != s.report:
            raise ValueError(f"{annotation}: study {s.id} is not phantoms.make_report(seed={world_seed}): give the "
                             "seed the world was generated with (train.py uses 0)")
        with Image.open(s.images[0]) as image:
            pixels = np.asarray(image.convert("L"))  # (S, S) uint8
        out.append({"id": s.id, "image": pixels, "report": s.report, "labels": s.labels, "findings": made["findings"]})
    return out


def pixel_table(processing) -> torch.Tensor:
    """(3, 256) float32: each 8-bit level normalised per channel with data.preprocess's arithmetic (x / 255 in
    float64, then (x - mean) / std in float32). Phantoms are already S x S, so preprocess's resize leaves them as
    they are, and indexing this table gives its pixels exactly, without PIL."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)  # (256,)
    mean, std = (np.asarray(v, np.float32)[:, None] for v in (processing.mean, processing.std))  # (3, 1)
    return torch.from_numpy((x[None] - mean) / std)  # (3, 256)


def to_pixels(images, table) -> torch.Tensor:
    """(B, S, S) uint8 -> (B, 3, S, S) float32, the expert's normalised input."""
    return table[:, images.long()].transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------------
# training


# The default recipe: what `python train.py` runs on a fresh clone, measured to fit its time budget (see README)
STEPS, BATCH_SIZE, LR, WARMUP, NEGATIVES = 900, 32, 1e-3, 50, 3


def contrastive_loss(expert, pixels, ids, mask, keys):
    """CLIP's symmetric InfoNCE with hard negatives in the image -> text direction (NegCLIP).

    pixels (B, 3, S, S); ids, mask (B + B*K, T): the B studies' own reports, then K near misses per study. Each
    image's softmax runs over all B + B*K reports; each report's over the B images. keys (B + B*K, hashable): the
    findings each report states; every report of the same findings as an image's own is a positive too (the target
    spread evenly over them), not a false negative (as MedCLIP, Wang et al. 2022, arXiv 2210.10163)."""
    B = len(pixels)
    images = expert.encode_images(pixels)  # (B, E)
    texts = encode_texts(expert, ids, mask)  # (B + B*K, E)
    logits = expert.logit_scale.exp().clamp(max=100) * images @ texts.T  # (B, B + B*K); CLIP caps the scale
    target = torch.tensor([[float(a == b) for b in keys] for a in keys[:B]])  # (B, B + B*K)
    to_text = target / target.sum(1, keepdim=True)
    to_image = target[:, :B].T / target[:, :B].sum(0)[:, None]  # (B, B)
    return (F.cross_entropy(logits, to_text) + F.cross_entropy(logits[:, :B].T, to_image)) / 2


def encode_texts(expert, ids, mask, chunks=4):
    """expert.encode_texts, differentiable, on `chunks` groups of reports of similar length, each cut to its own
    longest: reports run from ~10 to ~90 tokens, and padding them all to the longest would double the text tower's
    work. ids, mask (N, T) -> (N, E)."""
    lengths = mask.sum(1)  # (N,)
    order = lengths.argsort()
    parts = [expert.encode_texts(ids[rows, :int(lengths[rows].max())], mask[rows, :int(lengths[rows].max())])
             for rows in order.chunk(chunks)]
    return torch.cat(parts)[order.argsort()]  # back in the original order


def train(world, out, steps=STEPS, batch_size=BATCH_SIZE, lr=LR, warmup=WARMUP, negatives=NEGATIVES,
          weight_decay=0.05, seed=0, world_seed=0, log_every=100, n=None, expert=None, conv_stem=()):
    """Train phantoms.tiny_expert on the training split of the phantom world in folder `world` (its first n
    studies; all by default), save it to `out` (expert.save, atomic) and return it. AdamW with a linear warmup and
    a cosine decay; each step a batch of studies, each with `negatives` hard negative reports drawn afresh.
    conv_stem: early convolutions in the expert's ViT (phantoms.tiny_expert): a better judge, not a policy's ViT."""
    world = Path(world)
    t0 = time.time()
    studies = load_studies(world / "annotation.json", "train", world_seed, n)
    if len(studies) < batch_size:
        raise ValueError(f"{world}: {len(studies)} training studies do not fill a batch of {batch_size}")
    images = torch.from_numpy(np.stack([s["image"] for s in studies]))  # (N, S, S) uint8, all in memory
    print(f"expert: {len(studies)} training studies loaded in {time.time() - t0:.1f}s", flush=True)
    torch.manual_seed(seed)
    expert = (expert or phantoms.tiny_expert(world, conv_stem)).train()
    table = pixel_table(expert.processing)
    decay = [p for p in expert.parameters() if p.dim() >= 2]  # matrices decay; norms, biases, the scale do not
    rest = [p for p in expert.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=lr)
    per_epoch = len(studies) // batch_size
    t0 = time.time()
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        if k == 0:
            order = np.random.default_rng([seed, epoch]).permutation(len(studies))
        rng = np.random.default_rng([seed, step, 1])  # this step's near misses
        batch = order[k * batch_size:(k + 1) * batch_size]
        findings = [studies[i]["findings"] for i in batch]
        findings += [near_miss(f, rng) for f in findings for _ in range(negatives)]
        texts = [studies[i]["report"] for i in batch] + [write_report(f, rng)[0] for f in findings[len(batch):]]
        keys = [tuple(sorted(phantoms.describe(f))) for f in findings]  # what each report states
        ids, mask = expert.tokenize(texts)  # (B + B*K, T)
        rate = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * max(0, step - warmup)
                                                                        / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = rate
        loss = contrastive_loss(expert, to_pixels(images[batch], table), ids, mask, keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expert.parameters(), 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            spent = time.time() - t0
            print(f"expert step {step + 1}/{steps} | loss {loss.item():.4f} | scale {expert.logit_scale.exp():.1f} | "
                  f"lr {rate:.2e} | {spent / (step + 1) * 1000:.0f} ms/step | eta "
                  f"{spent / (step + 1) * (steps - step - 1) / 60:.1f}m", flush=True)
    expert.eval()
    save(expert, out)
    print(f"expert -> {out}", flush=True)
    return expert


# ----------------------------------------------------------------------------------------------------------------
# the judge


def _ranks(x):
    """(N, G) -> (N, G) 0-based ranks in ascending order, ties given their average rank (Spearman's ranks)."""
    below = (x.unsqueeze(2) > x.unsqueeze(1)).sum(2)  # (N, G): how many are strictly smaller
    ties = (x.unsqueeze(2) == x.unsqueeze(1)).sum(2)  # (N, G): how many are equal, itself included
    return below + (ties - 1) / 2


def _first(scores, target):
    """(N, C) scores, (N,) index of the right column -> (N,) 1 where it alone scores highest, 1/k where it ties
    with k - 1 others at the top (a constant scorer gets chance, 1/C), else 0."""
    top = scores == scores.max(1, keepdim=True).values  # (N, C)
    return top[torch.arange(len(scores)), target] / top.sum(1)


@torch.no_grad()
def judge(scorer, studies, seed=0, group_size=8, pool=200) -> dict:
    """How well `scorer.similarity(images, reports)` judges reports, on studies from load_studies (held out).

    Each study's group is its own report and group_size - 1 near misses written afresh for its findings with one
    removed, added or swapped (near_miss). spearman: the within-group Spearman correlation of the scores with
    correctness() against the study's true labels, averaged over groups where correctness varies (a group the
    scorer leaves all tied counts 0); spearman_labels: the same with correctness(synonyms=False); true_first: how
    often the own report scores highest (ties share); top1_200: how often, among the first `pool` studies, an
    X-ray's own report scores highest of their `pool` reports. Chance levels and the ceiling of top1 (reports of the
    same findings are interchangeable: a perfect judge picks among them at random) come with them. Deterministic
    given seed."""
    rng = np.random.default_rng(seed)
    groups, correct = [], []
    for s in studies:
        misses = [write_report(near_miss(s["findings"], rng), rng) for _ in range(group_size - 1)]
        groups.append([s["report"]] + [report for report, _ in misses])
        correct.append([[1.0] + [correctness(s["labels"], labels, synonyms) for _, labels in misses]
                        for synonyms in (True, False)])
    images = [_image(s["image"]) for s in studies]
    scores, correct = scorer.similarity(images, groups), torch.tensor(correct)  # (N, G), (N, 2, G)
    result = agreement(scores, correct[:, 0])
    result["spearman_labels"] = agreement(scores, correct[:, 1])["spearman"]
    n = min(pool, len(studies))
    matrix = _score_matrix(scorer, images[:n], [s["report"] for s in studies[:n]])  # (n, n)
    same = [tuple(sorted(phantoms.describe(s["findings"]))) for s in studies[:n]]  # the findings a report states
    return result | {f"top1_{n}": float(_first(matrix, torch.arange(n)).mean()),
                     "chance": {"spearman": 0.0, "true_first": 1 / group_size, f"top1_{n}": 1 / n},
                     "ceiling": {f"top1_{n}": float(np.mean([1 / same.count(key) for key in same]))}}


def agreement(scores, correct) -> dict:
    """scores, correct (N, G), column 0 the true report -> spearman: the mean within-group Spearman correlation
    over the groups where correctness varies (a group whose scores are all tied counts 0), groups: how many;
    true_first: how often column 0 scores highest (ties share)."""
    scores, correct = scores.double(), correct.double()
    rs, rc = _ranks(scores), _ranks(correct)
    rs, rc = rs - rs.mean(1, keepdim=True), rc - rc.mean(1, keepdim=True)
    rho = (rs * rc).sum(1) / (rs.norm(dim=1) * rc.norm(dim=1)).clamp(min=1e-12)  # (N,) Pearson of the ranks
    varies = correct.std(1) > 0  # (N,)
    first = _first(scores, torch.zeros(len(scores), dtype=torch.long))
    return {"spearman": float(rho[varies].mean()) if varies.any() else 0.0, "groups": int(varies.sum()),
            "true_first": float(first.mean())}


def _image(pixels):
    return Image.fromarray(pixels).convert("RGB") if isinstance(pixels, np.ndarray) else pixels


def _score_matrix(scorer, images, reports):
    """(n, n) scores of every image against every report: an Expert encodes each once; any other scorer is asked
    for n groups of all n reports."""
    if hasattr(scorer, "encode_texts"):
        scorer.eval()
        pixels = preprocess(images, scorer.processing)
        texts = torch.cat([scorer.encode_texts(*scorer.tokenize(reports[i:i + 256]))
                           for i in range(0, len(reports), 256)])  # (n, E)
        return (scorer.encode_images(pixels) @ texts.T).double()
    return scorer.similarity(images, [list(reports)] * len(images)).double()


# ----------------------------------------------------------------------------------------------------------------
# controls for the visual stage (PHANTOM-ONLY): Expert.similarity's interface, so train.py, evaluation and the
# judge take them where they take an expert


def _digest(image) -> bytes:
    """A key for an X-ray's pixels (a path, a PIL image or a uint8 array; gray, or RGB with equal channels)."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    pixels = np.asarray(image.convert("L") if isinstance(image, Image.Image) else image)
    pixels = pixels[..., 0] if pixels.ndim == 3 else pixels  # (S, S)
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


class Oracle:
    """PHANTOM-ONLY control: the best any expert could judge. A report's score is correctness() of the labels our
    labeler reads from it against the true labels of the study whose X-ray it is scored with. The phantom world's
    X-rays are all distinct, so the true labels are looked up by the image's pixels.

    studies: data.Study list (their first image and labels), e.g. every split of the world. false_weight:
    correctness()'s (2: the strict oracle, "oracle_strict")."""

    def __init__(self, studies, false_weight=1):
        self.false_weight = false_weight
        self.labels = {_digest(s.images[0]): s.labels for s in studies}
        if any(labels is None for labels in self.labels.values()):
            raise ValueError("Oracle: every study needs its true labels (a phantom world's annotation.json)")

    def similarity(self, images, reports):
        """B X-rays (paths, PIL images or uint8 arrays), B lists of G reports -> (B, G) float32 in (0, 1]."""
        truth = []
        for image in images:
            key = _digest(image)
            if key not in self.labels:
                raise KeyError("Oracle: an X-ray that is not among its studies (the oracle knows only the phantom "
                               "world it was built from)")
            truth.append(self.labels[key])
        read = label_reports([r for group in reports for r in group])
        G = len(reports[0]) if reports else 0
        return torch.tensor([[correctness(t, read[b * G + g], false_weight=self.false_weight) for g in range(G)]
                             for b, t in enumerate(truth)], dtype=torch.float32).view(len(reports), G)


class Null:
    """PHANTOM-ONLY control: no information about the X-ray. Each group of reports is scored by `expert` against
    the X-ray of another study drawn from `pool` (paths or images, e.g. the training split's), chosen by a hash of
    (seed, the group's reports): deterministic, stateless (the same after a resume), and independent of the
    group's own X-ray (which is skipped should the draw hit it). What is left is the expert's preference among the
    texts themselves: the part of its reward a policy could earn without looking."""

    def __init__(self, expert, pool, seed=0):
        self.expert, self.seed = expert, seed
        self.pool = [s.images[0] if hasattr(s, "images") else s for s in pool]
        if len(self.pool) < 2:
            raise ValueError("Null: the pool needs at least two X-rays")

    def similarity(self, images, reports):
        """B X-rays, B lists of G reports -> (B, G): the expert's scores against other studies' X-rays."""
        others = []
        for image, group in zip(images, reports):
            text = f"{self.seed}\0" + "\0".join(group)
            k = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % len(self.pool)
            other = self.pool[k]
            if _digest(other) == _digest(image):
                other = self.pool[(k + 1) % len(self.pool)]
            others.append(_image(other) if isinstance(other, np.ndarray) else other)
        return self.expert.similarity(others, reports)


ORACLES = {"oracle": 1, "oracle_strict": 2}  # --expert value -> the Oracle's false_weight
CONTROLS = (*ORACLES, "null")  # the --expert values that are phantom-only controls


def judge_and_expert(spec, data, studies, seed=0, device="cpu"):
    """train.py's (judge, expert): the visual stage's reward and the expert of evaluation's similarity column (and of
    the phantom SFT policy's ViT). spec: an expert folder or hub id (both are that expert), "" (no expert), or a
    PHANTOM-ONLY control: "oracle" (Oracle over every split of the world in `data`), "oracle_strict" (the same with
    false_weight 2) or "null" (Null over `studies`, the training split), each beside the phantom expert in
    <out>/expert/checkpoint (the world is <out>/phantoms)."""
    from nanovalor.config import checked
    from nanovalor.expert import load
    if spec not in CONTROLS:
        expert = checked(load, spec, device) if spec else None
        return expert, expert
    phantom = Path(data).parent.parent / "expert" / "checkpoint"
    expert = checked(load, phantom, device) if phantom.exists() else None
    if spec in ORACLES:
        every = [s for split in ("train", "val", "test") for s in read_dataset(data, split)]
        return Oracle(every, ORACLES[spec]), expert
    if expert is None:
        raise SystemExit(f"error: --expert=null scores with the phantom expert, and {phantom} is missing")
    return Null(expert, studies, seed), expert


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the phantom world's expert (phantom_expert.train).")
    p.add_argument("--world", default="out/phantoms", help="a phantom world folder (phantoms.generate)")
    p.add_argument("--out", default="out/expert/checkpoint")
    for name, default in (("steps", STEPS), ("batch_size", BATCH_SIZE), ("lr", LR), ("warmup", WARMUP),
                          ("negatives", NEGATIVES), ("weight_decay", 0.05), ("seed", 0), ("world_seed", 0),
                          ("log_every", 100)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--conv_stem", default="", help="channel widths of early convolutions in the ViT, e.g. 24,48,96 "
                   "(a better judge; its ViT cannot seed the llava-hf policy)")
    args = vars(p.parse_args(argv))
    args["conv_stem"] = tuple(int(c) for c in args["conv_stem"].split(",") if c.strip())
    train(args.pop("world"), args.pop("out"), **args)


if __name__ == "__main__":
    main()
