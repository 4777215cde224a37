"""Datasets, image loading and preprocessing, and batching.

Readers (both return a list of Study, and check every study before training starts):
  read_annotation(path, split)   R2Gen annotation.json: {"train": [{"id", "report", "image_path": [...]}], "val":
                                 ..., "test": ...}, image paths relative to an image root; the layout IU-Xray and
                                 MIMIC-CXR have in report-generation code (R2Gen, R2GenCMN, EditGRPO ...)
  read_jsonl(path)               one {"image": "a.png" or [...], "report": "..."} object per line
  read_dataset(path, split)      either, by file suffix
  Optional per study: "labels", the 14 CheXpert observations in CHEXPERT_LABELS order (a list of 14 values
  1 / 0 / -1 / null, or a dict {observation: value}, absent = not mentioned).

Images: load_image(path) -> RGB PIL image; preprocess(images, ImageProcessing) -> (B, 3, S, S) float32, matching
transformers' PIL image processors (CLIP, SigLIP) bit for bit; read_preprocessor_config reads their
preprocessor_config.json. Qwen2-VL's processor (QwenImageProcessing, which Qwen2.5-VL uses) keeps each image at its
own size: preprocess then returns PackedImages (rows of patches and each image's grid), also bit for bit.

Batching: Batches(studies, batch_size, seed, rank, world_size) is a plain iterator (no torch DataLoader, no worker
processes: chest X-rays are decoded in the training process, a few ms per batch at the sizes we train), with a
position (epoch, index) that state_dict() saves and load_state_dict() restores exactly. collate() makes pixels,
prompts, reference reports and labels.
"""
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nanovalor.chexpert import CHEXPERT_LABELS
from nanovalor.nlg import clean_report

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the findings of the chest X-ray."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """Bad input data: the message names the file, the study or line, and what was expected."""


@dataclass
class Study:
    id: str
    images: list[str]  # paths of the views used (first view only unless views="all")
    report: str
    labels: tuple | None = None  # 14 x (1.0 positive / 0.0 negative / -1.0 uncertain / None not mentioned)


# ----------------------------------------------------------------------------------------------------------------
# readers

def read_dataset(path, split="train", image_root=None, views="first", skip_bad=False, clean=None) -> list[Study]:
    """Read `path` as R2Gen annotation.json (.json) or JSONL (.jsonl); see read_annotation for the arguments."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path, image_root, views, skip_bad, clean)
    return read_annotation(path, split, image_root, views, skip_bad, clean)


def read_annotation(path, split="train", image_root=None, views="first", skip_bad=False, clean=None) -> list[Study]:
    """Studies of one split of an R2Gen annotation.json.

    image_root: folder the image paths are relative to; default `images/` beside the file if it exists, else the
    file's own folder. views: "first" (the frontal view in R2Gen's IU-Xray files) or "all". skip_bad: skip missing
    or unreadable images (and studies left without one) instead of failing. clean: a style of
    nanovalor.nlg.clean_report to apply to the reports (None keeps them as written).
    """
    path = Path(path)
    try:
        data = json.loads(_read_text(path, "annotation file"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict) or split not in data or not isinstance(data[split], list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected an object with a list under {split!r}; found {found}")
    if image_root is None:
        image_root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    entries = []
    for i, item in enumerate(data[split]):
        where = f"{path}: {split}[{i}]"
        _require(item, ("id", "report", "image_path"), where)
        where += f" (id {item['id']!r})"
        entries.append((where, str(item["id"]), item["image_path"], item["report"], item.get("labels")))
    return _studies(entries, str(path), image_root, views, skip_bad, clean)


def read_jsonl(path, image_root=None, views="first", skip_bad=False, clean=None) -> list[Study]:
    """Studies of a JSONL file: {"image": path or [paths], "report": str, "id"?: str, "labels"?: ...} per line.

    Image paths are relative to image_root (default: the file's folder); the id defaults to the line number.
    Other arguments as in read_annotation.
    """
    path = Path(path)
    lines = _read_text(path, "JSONL file").split("\n")  # "\n" only: splitlines() also splits inside a report
    entries = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object (column {e.colno}: {e.msg})") from None
        _require(item, ("image", "report"), where)
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        entries.append((where, str(item.get("id", lineno)), images, item["report"], item.get("labels")))
    return _studies(entries, str(path), image_root if image_root is not None else path.parent, views, skip_bad,
                    clean)


def _read_text(path, kind):
    """A UTF-8 text file's contents, or one DataError naming the file (missing, a folder, not UTF-8: with the line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such {kind}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, expected the {kind} itself") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = 1 + data[:e.start].count(b"\n")
        raise DataError(f"{path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _require(item, keys, where):
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with fields {list(keys)}, got {type(item).__name__}")
    missing = [k for k in keys if k not in item]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


def _studies(entries, source, image_root, views, skip_bad, clean) -> list[Study]:
    """Validate parsed entries (where, id, image paths, report, labels) and check their images."""
    if views not in ("first", "all"):
        raise ValueError(f"views must be 'first' or 'all', got {views!r}")
    root = os.path.abspath(image_root)
    seen, studies, bad = {}, [], []
    for where, study_id, images, report, labels in entries:
        if study_id in seen:
            raise DataError(f"{where}: duplicated id {study_id!r} (first seen at {seen[study_id]})")
        seen[study_id] = where
        if not isinstance(report, str):
            raise DataError(f"{where}: field 'report' is {type(report).__name__} {report!r}, expected text")
        try:
            report.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes
            raise DataError(f"{where}: field 'report' holds {report[e.start]!r} at character {e.start}, a lone "
                            "surrogate (not text)") from None
        if clean is not None:
            report = clean_report(report, style=clean)
        if not report.strip():
            raise DataError(f"{where}: empty report (expected non-empty text)")
        if not isinstance(images, list) or not images:
            raise DataError(f"{where}: expected at least one image path, got {images!r}")
        paths, labels = [_inside(root, rel, where) for rel in images], _labels(labels, where)
        problems = [(p, _image_problem(p)) for p in (paths[:1] if views == "first" else paths)]
        bad += [(p, why) for p, why in problems if why]
        paths = [p for p, why in problems if not why]
        if paths:  # with skip_bad, a study that lost all its views is dropped
            studies.append(Study(study_id, paths, report, labels))
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:5])
        if not skip_bad:
            raise DataError(f"{source}: {len(bad)} image(s) missing or unreadable, e.g. {listed}. "
                            "Fix them, or ask to skip them (skip_bad=True / --skip_bad)")
        log.warning("%s: skipped %d missing or unreadable image(s) and %d study(ies) left without an image, "
                    "e.g. %s", source, len(bad), len(entries) - len(studies), listed)
    return studies


def _inside(root, rel, where) -> str:
    """root/rel, refusing paths that leave root (absolute, or climbing out with ..); checked on the text of the
    path, so symlinked image folders keep working."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{where}: image path {rel!r} is not a non-empty string")
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise DataError(f"{where}: image path {rel!r} escapes the image root {root}")
    return path


def _image_problem(path) -> str | None:
    """None if the file decodes as an image, else why not. Decoded whole, so that a truncated file is found when the
    dataset is read, not at step 5,000 (a JPEG at 1/8 scale: its whole stream is still read)."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (image.width // 8, image.height // 8))  # JPEG only; other formats ignore it
            image.load()
            return None
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        return "a folder"
    except Image.DecompressionBombError as e:
        return f"refused: {e}"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return "unreadable"


def _labels(value, where) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(CHEXPERT_LABELS))
        if unknown:
            raise DataError(f"{where}: field 'labels' has unknown observation(s) {unknown}; expected names of "
                            "CHEXPERT_LABELS")
        value = [value.get(name) for name in CHEXPERT_LABELS]
    if not isinstance(value, list) or len(value) != len(CHEXPERT_LABELS):
        raise DataError(f"{where}: field 'labels' must be a list of 14 values or an object; got {value!r}")
    out = []
    for v in value:
        if v is not None and (isinstance(v, bool) or v not in (1, 0, -1)):
            raise DataError(f"{where}: field 'labels' holds {v!r}; expected 1, 0, -1 or null")
        out.append(None if v is None else float(v))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------
# images

def load_image(path) -> Image.Image:
    """An image file as an 8-bit RGB PIL image; one clear error for a missing or corrupt file."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit and other high-depth X-rays are scaled to 0..255 by their own min..max (not clipped:
    a 12-bit image in a 16-bit PNG would otherwise come out almost black); transparency is composited onto white,
    as transformers' convert_to_rgb does, so that our pixels equal the reference processors'. An RGB image without
    transparency comes back as it is (load_image has converted it already; convert would only copy it)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        lo, hi = pixels.min(), pixels.max()
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        image = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessing:
    """How a model wants its pixels. mode: "crop" resizes the shortest edge to resize_to (default size) and
    centre-crops size x size (CLIP, BiomedCLIP); "pad" first pads to a square with the mean colour (LLaVA-1.5's
    image_aspect_ratio="pad"), then does "crop"; "resize" resizes both edges to resize_to, ignoring the aspect
    ratio (SigLIP), then centre-crops size x size."""
    size: int = 224
    mode: str = "crop"
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    resize_to: int | None = None

    def __post_init__(self):
        if self.mode not in ("crop", "pad", "resize"):
            raise ValueError(f"ImageProcessing.mode must be 'crop', 'pad' or 'resize', got {self.mode!r}")
        if self.resize_to is not None and self.resize_to < self.size:
            raise ValueError(f"ImageProcessing.resize_to={self.resize_to} is smaller than the crop size={self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("ImageProcessing.mean and .std need 3 values (R, G, B)")


def read_preprocessor_config(source, pad=None):
    """ImageProcessing from a Hugging Face preprocessor_config.json (a path, its folder, or the dict), as
    CLIPImageProcessor and SiglipImageProcessor read it (QwenImageProcessing for Qwen2VLImageProcessor's). pad=True:
    LLaVA's image_aspect_ratio="pad"; by default the config's own "do_pad" (policy.load writes it for LLaVA
    checkpoints that pad)."""
    where = "preprocessor config"
    if not isinstance(source, dict):
        path = Path(source)
        path = path / "preprocessor_config.json" if path.is_dir() else path
        where = str(path)
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: cannot read a preprocessor config ({e})") from None
    cfg = source
    kind = str(cfg.get("image_processor_type", ""))
    if cfg.get("do_rescale", True) is False or abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise DataError(f"{where}: only rescaling by 1/255 is supported (do_rescale, rescale_factor)")
    if kind.startswith("Qwen2VLImageProcessor") or "temporal_patch_size" in cfg:
        return qwen_image_processing(cfg, where)
    crop = cfg.get("crop_size")
    do_crop = bool(cfg.get("do_center_crop", crop is not None)) and crop is not None
    size = cfg.get("size", crop if crop is not None else 224)
    if isinstance(size, int):  # old configs: an int is the shortest edge when a crop follows, else the square side
        size = {"shortest_edge": size} if do_crop else {"height": size, "width": size}
    if "shortest_edge" in size:
        mode, resize_to = "crop", size["shortest_edge"]
        if not do_crop:
            raise DataError(f"{where}: size {size} without a centre crop gives non-square images; expected "
                            "do_center_crop with crop_size")
    elif "height" in size and "width" in size and size["height"] == size["width"]:
        mode, resize_to = "resize", size["height"]
    else:
        raise DataError(f"{where}: field 'size' = {size}; expected {{'shortest_edge': n}} or a square "
                        "{'height': n, 'width': n}")
    side = resize_to
    if do_crop:
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        if crop.get("height") != crop.get("width"):
            raise DataError(f"{where}: field 'crop_size' = {crop}; expected a square crop")
        side = crop["height"]
    default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if "Siglip" in kind else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    mean, std = tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    if cfg.get("do_normalize", True) is False:
        mean, std = (0.0,) * 3, (1.0,) * 3
    pad = bool(cfg.get("do_pad", False)) if pad is None else pad
    return ImageProcessing(size=side, mode="pad" if pad else mode, mean=mean, std=std,
                           resample=int(cfg.get("resample", Image.Resampling.BICUBIC)),
                           resize_to=resize_to if resize_to != side else None)


def preprocess(images: list[Image.Image], proc):
    """PIL images -> (B, 3, S, S) float32, normalised (proc: ImageProcessing), or PackedImages (proc:
    QwenImageProcessing). Resampling is PIL's on 8-bit pixels, then x/255 in float64, then (x - mean) / std in
    float32: the order of transformers' PIL processors, so the values are identical."""
    if isinstance(proc, QwenImageProcessing):
        return qwen_patches(images, proc)
    pixels = np.stack([np.asarray(_fit(to_rgb(image), proc)) for image in images])  # (B, S, S, 3) uint8
    return torch.from_numpy(np.ascontiguousarray(normalise(pixels, proc).transpose(0, 3, 1, 2)))  # (B, 3, S, S)


def normalise(pixels, proc):
    """8-bit pixels (..., 3) -> float32 (x / 255 - mean) / std, in transformers' order of operations."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32)


def _fit(image: Image.Image, proc: ImageProcessing) -> Image.Image:
    """Resize and centre-crop one RGB image to proc.size x proc.size."""
    target = proc.resize_to or proc.size
    if proc.mode == "pad":  # LLaVA's expand2square: pad the short side, the image centred, with the mean colour
        w, h = image.size
        if w != h:
            square = Image.new("RGB", (max(w, h),) * 2, tuple(int(m * 255) for m in proc.mean))
            square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            image = square
    if proc.mode == "resize":
        new_w = new_h = target
    else:  # shortest edge to `target`, the long edge truncated as transformers (and torchvision) do
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = target, int(target * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), resample=proc.resample)
    top, left = (new_h - proc.size) // 2, (new_w - proc.size) // 2
    return image.crop((left, top, left + proc.size, top + proc.size))


# ----------------------------------------------------------------------------------------------------------------
# Qwen2-VL's images (Qwen2.5-VL uses the same processor): each image at its own size, cut into rows of patches

@dataclass
class QwenImageProcessing:
    """Qwen2VLImageProcessor's settings (its preprocessor_config.json). An image is resized (PIL, `resample`) so
    that each side is a multiple of patch_size * merge_size (28 px) near its own, keeping the aspect ratio and the
    area within [min_pixels, max_pixels] (smart_resize), normalised, and cut into patch_size-px patches, each
    repeated temporal_patch_size times (a still image is a video of one frame pair)."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC


def qwen_image_processing(cfg, where) -> QwenImageProcessing:
    """QwenImageProcessing from Qwen2VLImageProcessor's preprocessor_config.json dict (min_pixels / max_pixels, or
    transformers 5's size {shortest_edge, longest_edge}, which are pixel counts too)."""
    size, d = cfg.get("size") or {}, QwenImageProcessing()
    lo = cfg.get("min_pixels", size.get("shortest_edge", d.min_pixels))
    hi = cfg.get("max_pixels", size.get("longest_edge", d.max_pixels))
    if not 0 < lo <= hi:
        raise DataError(f"{where}: min_pixels {lo}, max_pixels {hi}: expected 0 < min_pixels <= max_pixels")
    mean, std = tuple(cfg.get("image_mean", d.mean)), tuple(cfg.get("image_std", d.std))
    if cfg.get("do_normalize", True) is False:
        mean, std = (0.0,) * 3, (1.0,) * 3
    return QwenImageProcessing(lo, hi, cfg.get("patch_size", 14), cfg.get("temporal_patch_size", 2),
                               cfg.get("merge_size", 2), mean, std, int(cfg.get("resample", d.resample)))


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
    """(height, width) -> the size Qwen2-VL resizes to: both sides multiples of `factor`, the aspect ratio kept
    as closely as possible, the area within [min_pixels, max_pixels] (Qwen2-VL, arXiv 2409.12191: "naive dynamic
    resolution"; transformers' smart_resize, Python's round included)."""
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"an image of {width} x {height} px: Qwen2-VL takes aspect ratios up to 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (max(factor, math.floor(side / beta / factor) * factor) for side in (height, width))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = (math.ceil(side * beta / factor) * factor for side in (height, width))
    return h, w


@dataclass
class PackedImages:
    """Images of different sizes as one batch, as Qwen2-VL's vision tower takes them: `data` (N, d) holds the rows
    of image 0, then those of image 1, ...; `grid` (n, 3) long gives each image's (t, h, w) in patches, and an
    image has t * h * w // per_row rows (per_row 1: patches; merge_size ** 2: merged tokens). Where the trainer
    treats pixels as a tensor of n images it acts as one: len(), [index] (a slice, list or LongTensor of images:
    another PackedImages), .to(device or dtype; the grid only moves)."""
    data: torch.Tensor
    grid: torch.Tensor
    per_row: int = 1

    def rows(self):  # (n,) rows of each image
        return self.grid.prod(1) // self.per_row

    def __len__(self):
        return len(self.grid)

    def __getitem__(self, index):
        chosen = torch.arange(len(self.grid), device=self.grid.device)[index].reshape(-1)  # (m,) image numbers
        rows = self.rows()
        starts = (rows.cumsum(0) - rows)[chosen].tolist()
        take = [torch.arange(s, s + n) for s, n in zip(starts, rows[chosen].tolist())]
        take = torch.cat(take) if take else torch.zeros(0, dtype=torch.long)
        return PackedImages(self.data[take.to(self.data.device)], self.grid[chosen], self.per_row)

    def to(self, *args, **kwargs):
        data = self.data.to(*args, **kwargs)
        return PackedImages(data, self.grid.to(data.device), self.per_row)


def qwen_patches(images: list[Image.Image], proc: QwenImageProcessing) -> PackedImages:
    """PIL images -> PackedImages of (t * h * w, 3 * T * p * p) float32 rows each, t = 1: Qwen2VLImageProcessor's
    pixel_values and image_grid_thw. Rows go merge block by merge block (the m x m patches that the merger joins
    into one token are consecutive), row-major over the blocks; each row is (channel, frame, y, x) flattened."""
    p, m, T = proc.patch_size, proc.merge_size, proc.temporal_patch_size
    rows, grids = [], []
    for image in images:
        image = to_rgb(image)
        h, w = smart_resize(image.height, image.width, p * m, proc.min_pixels, proc.max_pixels)
        x = normalise(np.asarray(image.resize((w, h), resample=proc.resample)), proc)  # (h, w, 3) float32
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, h, w)
        x = x.reshape(3, h // (p * m), m, p, w // (p * m), m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (H, W, m, m, 3, p, p)
        x = x[:, :, :, :, :, None].expand(*x.shape[:5], T, p, p)  # the frame repeated T times
        rows.append(x.reshape(-1, 3 * T * p * p))
        grids.append([1, h // p, w // p])
    return PackedImages(torch.cat(rows), torch.tensor(grids, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# batching

@dataclass
class Batches:
    """Batches of studies for one rank: a fresh permutation every epoch from (seed, epoch), sharded so that global
    batch k (world_size x batch_size studies) is the same set of studies for any world_size.

    drop_last=True (training): every rank gets the same number of full batches; the remainder of each epoch's
    permutation (< world_size * batch_size studies, a different set each epoch) is left out. drop_last=False
    (evaluation): the ranks' shards are disjoint and cover the split; last batches may be short.
    Iterating runs from the saved position to the end of the current epoch, then moves to the next epoch.
    """
    studies: list
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    drop_last: bool = True
    epoch: int = 0
    index: int = 0  # the next batch of the epoch to hand out
    _cache: tuple = field(default=(None, None), init=False, repr=False, compare=False)

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size or self.batch_size < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1, got rank={self.rank}, "
                             f"world_size={self.world_size}, batch_size={self.batch_size}")
        if self.drop_last and len(self.studies) < self.world_size * self.batch_size:
            raise ValueError(f"{len(self.studies)} studies do not fill one batch of {self.batch_size} on each of "
                             f"{self.world_size} rank(s)")

    def epoch_batches(self, epoch) -> list[list[int]]:
        """This rank's batches (lists of study indices) in one epoch."""
        if self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.studies)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        per_step = self.world_size * self.batch_size
        if self.drop_last:
            order = order[: n // per_step * per_step]
        # Position p goes to rank p % world_size; global batch k is order[k*per_step : (k+1)*per_step].
        mine = order[self.rank:: self.world_size].tolist()
        batches = [mine[i: i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        self._cache = (epoch, batches)
        return batches

    def __len__(self):
        return len(self.epoch_batches(self.epoch))

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        while self.index < len(batches):
            self.index += 1  # advanced before handing out: a state saved after this batch resumes after it
            yield [self.studies[i] for i in batches[self.index - 1]]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.studies),
                "global_batch": self.world_size * self.batch_size}

    def load_state_dict(self, state):
        """Resume at a saved position; also valid on another number of ranks with the same global batch size."""
        mine = self.state_dict()
        if any(state[k] != mine[k] for k in ("seed", "n", "global_batch")):
            raise ValueError(f"data position was saved for seed={state['seed']}, {state['n']} studies, global batch "
                             f"{state['global_batch']}; this run has seed={self.seed}, {mine['n']} studies, global "
                             f"batch {mine['global_batch']}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def collate(studies: list[Study], proc, prompt=DEFAULT_PROMPT) -> dict:
    """A batch for the trainer. pixels: (N, 3, S, S) with N = sum(views), the views of each study in turn (Qwen2.5-VL:
    PackedImages of the N views); prompt is the user's instruction without chat format or image placeholder
    (generate.py adds those); labels: a list of 14-tuples, or None when any study has none; first_views: each study's
    first X-ray, decoded (the visual stage's expert scores it with its own preprocessing, without reading the file
    again)."""
    views = [[load_image(path) for path in study.images] for study in studies]
    labels = [study.labels for study in studies]
    return {
        "ids": [study.id for study in studies],
        "pixels": preprocess([image for images in views for image in images], proc),  # (N, 3, S, S) or packed
        "first_views": [images[0] for images in views],  # B PIL images
        "views": [len(study.images) for study in studies],
        "prompts": [prompt] * len(studies),
        "reports": [study.report for study in studies],
        "labels": None if any(label is None for label in labels) else labels,
    }
