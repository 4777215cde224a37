"""Tests of nanovalor.data: image loading, preprocessing against transformers' PIL image processors, both dataset
readers and every bad-input error, skip_bad, resumable shuffling, sharding, and collate.

    python -m pytest -q tests/test_data.py
"""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from nanovalor import data
from nanovalor.data import DataError, ImageProcessing, read_preprocessor_config
from nanovalor.chexpert import CHEXPERT_LABELS


def _png(path, size=(12, 10), mode="L", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,), "LA": (2,)}[mode]
    Image.fromarray(rng.integers(0, 256, size[::-1] + channels, dtype=np.uint8), mode).save(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# images

def test_load_image_modes(tmp_path):
    gray = data.load_image(_png(tmp_path / "g.png"))
    assert gray.mode == "RGB" and gray.size == (12, 10)
    g = np.asarray(gray)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert np.array_equal(g[..., 0], np.asarray(Image.open(tmp_path / "g.png")))

    pal = Image.open(_png(tmp_path / "c.png", mode="RGB")).convert("P")
    pal.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(data.load_image(tmp_path / "p.png")), np.asarray(pal.convert("RGB")))

    # Transparency is composited onto white, exactly as transformers' convert_to_rgb does.
    from transformers.image_transforms import convert_to_rgb

    for mode in ("RGBA", "LA"):
        path = _png(tmp_path / f"{mode}.png", mode=mode, seed=3)
        assert np.array_equal(np.asarray(data.load_image(path)), convert_to_rgb(Image.open(path), return_numpy=True))


def test_load_image_16_bit_is_scaled_by_its_range(tmp_path):
    pixels = np.full((4, 5), 3000, np.uint16)
    pixels[0, 0], pixels[0, 1], pixels[0, 2] = 1000, 5000, 2000  # range 1000..5000
    Image.fromarray(pixels).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I;16")
    out = np.asarray(data.load_image(tmp_path / "x16.png"))[..., 0]
    # (v - 1000) / 4000 * 255, rounded: 1000 -> 0, 5000 -> 255, 2000 -> 63.75 -> 64, 3000 -> 127.5 -> 128
    assert (out[0, 0], out[0, 1], out[0, 2], out[1, 1]) == (0, 255, 64, 128)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png.*not found"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.png.*cannot read"):
        data.load_image(tmp_path / "junk.png")
    good = _png(tmp_path / "good.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])  # header fine, pixels truncated
    with pytest.raises(DataError, match="cut.png"):
        data.load_image(tmp_path / "cut.png")


# ---------------------------------------------------------------------------------------------------------------
# preprocessing against transformers' PIL processors

def _test_images():
    rng = np.random.default_rng(0)
    shapes = [(300, 200), (150, 333), (224, 224), (64, 80), (401, 97)]  # (width, height): both orientations, upsizing
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (210, 260), dtype=np.uint8)))  # grayscale
    return images


@pytest.mark.parametrize("kwargs", [{}, {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}},
                                    {"resample": 2}, {"size": {"shortest_edge": 96}, "crop_size": 96}])
def test_preprocess_matches_clip_processor(kwargs, tmp_path):
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(**kwargs)
    reference.save_pretrained(tmp_path)  # read back from the preprocessor_config.json it writes
    proc = read_preprocessor_config(tmp_path)
    images = _test_images()
    expected = torch.from_numpy(np.stack(reference(images, return_tensors="np")["pixel_values"]))
    got = data.preprocess(images, proc)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5  # in practice identical: same PIL resampling, same float ops
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kwargs", [{}, {"size": {"height": 96, "width": 96}, "resample": 2}])
def test_preprocess_matches_siglip_processor(kwargs):
    from transformers import SiglipImageProcessorPil

    reference = SiglipImageProcessorPil(**kwargs)
    proc = read_preprocessor_config(reference.to_dict())
    assert proc.mode == "resize"
    images = _test_images()
    expected = torch.from_numpy(np.stack(reference(images, return_tensors="np")["pixel_values"]))
    assert torch.equal(data.preprocess(images, proc), expected)


def test_pad_mode_is_llava_expand2square_then_clip():
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})

    def expand2square(image, background):  # LLaVA's llava/mm_utils.py, as published
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        result = Image.new(image.mode, (side, side), background)
        result.paste(image, ((side - width) // 2, (side - height) // 2))
        return result

    images = [image.convert("RGB") for image in _test_images()]
    background = tuple(int(x * 255) for x in reference.image_mean)
    expected = reference([expand2square(i, background) for i in images], return_tensors="np")["pixel_values"]
    proc = read_preprocessor_config(reference.to_dict(), pad=True)
    assert proc.mode == "pad"
    assert torch.equal(data.preprocess(images, proc), torch.from_numpy(np.stack(expected)))


def test_preprocessor_config_errors():
    with pytest.raises(DataError, match="square crop"):
        read_preprocessor_config({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 200},
                                  "do_center_crop": True})
    with pytest.raises(DataError, match="non-square"):
        read_preprocessor_config({"size": {"shortest_edge": 224}, "do_center_crop": False})
    with pytest.raises(DataError, match="1/255"):
        read_preprocessor_config({"size": {"height": 224, "width": 224}, "do_rescale": False})
    with pytest.raises(DataError, match="'size'"):
        read_preprocessor_config({"size": {"height": 224, "width": 200}})
    with pytest.raises(ValueError, match="mode"):
        ImageProcessing(mode="stretch")


def test_old_style_int_sizes_and_no_normalize():
    proc = read_preprocessor_config({"size": 224, "crop_size": 224, "do_center_crop": True, "do_normalize": False})
    assert (proc.size, proc.mode, proc.resize_to, proc.mean, proc.std) == (224, "crop", None, (0.0,) * 3, (1.0,) * 3)
    x = data.preprocess([Image.new("L", (300, 224), 51)], proc)
    assert x.shape == (1, 3, 224, 224) and torch.allclose(x, torch.full_like(x, 0.2))  # 51 / 255


# ---------------------------------------------------------------------------------------------------------------
# readers

def _dataset(tmp_path, n=5):
    """n studies with two views each, in both formats; the images in tmp_path/images."""
    (tmp_path / "images").mkdir()
    entries = []
    for i in range(n):
        views = [f"s{i}/{v}.png" for v in ("frontal", "lateral")]
        for k, view in enumerate(views):
            (tmp_path / "images" / f"s{i}").mkdir(exist_ok=True)
            _png(tmp_path / "images" / view, seed=10 * i + k)
        labels = [None] * 14
        labels[i % 13] = [1, 0, -1][i % 3]
        entries.append({"id": f"s{i}", "report": f"Report number {i}. No pneumothorax.", "image_path": views,
                        "labels": labels})
    (tmp_path / "annotation.json").write_text(json.dumps({"train": entries[:-1], "val": entries[-1:], "test": []}))
    with open(tmp_path / "train.jsonl", "w") as f:
        for e in entries[:-1]:
            f.write(json.dumps({"id": e["id"], "image": e["image_path"], "report": e["report"],
                                "labels": {CHEXPERT_LABELS[j]: v for j, v in enumerate(e["labels"]) if v is not None}})
                    + "\n\n")  # blank lines are allowed
    return entries


def test_both_formats_read_the_same_studies(tmp_path):
    entries = _dataset(tmp_path)
    from_json = data.read_annotation(tmp_path / "annotation.json", "train", views="all")
    from_jsonl = data.read_jsonl(tmp_path / "train.jsonl", image_root=tmp_path / "images", views="all")
    assert from_json == from_jsonl
    assert [s.id for s in from_json] == ["s0", "s1", "s2", "s3"]
    s1 = from_json[1]
    assert s1.report == entries[1]["report"] and len(s1.images) == 2 and s1.images[1].endswith("s1/lateral.png")
    assert s1.labels[1] == 0.0 and sum(v is not None for v in s1.labels) == 1
    assert data.read_dataset(tmp_path / "annotation.json", "val")[0].id == "s4"
    first = data.read_dataset(tmp_path / "train.jsonl", image_root=tmp_path / "images")
    assert [len(s.images) for s in first] == [1] * 4 and first[0].images[0].endswith("frontal.png")


def test_clean_reports_with_the_shared_normaliser(tmp_path):
    from nanovalor.nlg import clean_report

    entries = _dataset(tmp_path)
    studies = data.read_annotation(tmp_path / "annotation.json", "train", clean="r2gen")
    assert studies[0].report == clean_report(entries[0]["report"], style="r2gen") != entries[0]["report"]


def _write(tmp_path, train):
    (tmp_path / "annotation.json").write_text(json.dumps({"train": train}))
    return tmp_path / "annotation.json"


@pytest.mark.parametrize("change, message", [
    (lambda e: e[1].update(report="   "), r"train\[1\] \(id 's1'\): empty report"),
    (lambda e: e[2].update(id="s0"), r"train\[2\] \(id 's0'\): duplicated id 's0' \(first seen at .*train\[0\]"),
    (lambda e: e[0].update(image_path=["../outside.png"]), r"train\[0\].*'../outside.png' escapes the image root"),
    (lambda e: e[0].update(image_path=["/etc/passwd"]), r"'/etc/passwd' escapes the image root"),
    (lambda e: e[0].update(image_path=[]), r"train\[0\].*at least one image path"),
    (lambda e: e[3].pop("report"), r"train\[3\]: missing field\(s\) \['report'\]"),
    (lambda e: e[0].update(labels=[1] * 13), r"train\[0\].*'labels' must be a list of 14"),
    (lambda e: e[0].update(labels={"Cardiomegaly": 2}), r"train\[0\].*'labels' holds 2; expected 1, 0, -1"),
    (lambda e: e[0].update(labels={"Heart": 1}), r"unknown observation\(s\) \['Heart'\]"),
    (lambda e: e[2].update(report=42), r"train\[2\] \(id 's2'\): field 'report' is int 42, expected text"),
    (lambda e: e[1].update(report="Mild edema \ud800."), r"train\[1\].*'\\ud800' at character 11, a lone surrogate"),
])
def test_annotation_errors(tmp_path, change, message):
    entries = _dataset(tmp_path)
    change(entries)
    with pytest.raises(DataError, match=message):
        data.read_annotation(_write(tmp_path, entries), "train")


def test_file_level_errors(tmp_path):
    _dataset(tmp_path)
    with pytest.raises(DataError, match="no such annotation file"):
        data.read_annotation(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"train": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON \(line 2"):
        data.read_annotation(tmp_path / "bad.json")
    with pytest.raises(DataError, match=r"list under 'dev'; found \['test', 'train', 'val'\]"):
        data.read_annotation(tmp_path / "annotation.json", "dev")
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[4] = '{"image": "s2/frontal.png", "report": "x"'  # line 5: broken
    (tmp_path / "broken.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"broken.jsonl:5: not a JSON object"):
        data.read_jsonl(tmp_path / "broken.jsonl", image_root=tmp_path / "images")
    lines[4] = '{"image": "s2/frontal.png"}'
    (tmp_path / "broken.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"broken.jsonl:5: missing field\(s\) \['report'\]"):
        data.read_jsonl(tmp_path / "broken.jsonl", image_root=tmp_path / "images")


def test_unreadable_files_get_one_line_naming_them(tmp_path):
    _dataset(tmp_path)
    (tmp_path / "latin1.json").write_bytes('{"train": [\n{"id": "caf\xe9"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.json, line 2: not UTF-8 text"):
        data.read_annotation(tmp_path / "latin1.json")
    (tmp_path / "latin1.jsonl").write_bytes('\n\n{"image": "a.png", "report": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl, line 3: not UTF-8 text"):
        data.read_jsonl(tmp_path / "latin1.jsonl")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DataError, match=r"folder.json: a folder, expected the annotation file itself"):
        data.read_annotation(tmp_path / "folder.json")
    with pytest.raises(DataError, match=r"images: a folder, expected the JSONL file itself"):
        data.read_jsonl(tmp_path / "images")


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    _dataset(tmp_path)
    report = "Heart normal.\u2028No effusion.\x85Lungs clear."  # JSON keeps these raw; splitlines() cut them
    (tmp_path / "odd.jsonl").write_text(json.dumps({"image": "s0/frontal.png", "report": report},
                                                   ensure_ascii=False) + "\r\n", encoding="utf-8")
    studies = data.read_jsonl(tmp_path / "odd.jsonl", image_root=tmp_path / "images")
    assert [s.report for s in studies] == [report]


def test_truncated_and_oversized_images_are_found_when_the_dataset_is_read(tmp_path):
    entries = _dataset(tmp_path, n=3)
    good = _png(tmp_path / "big.png", size=(64, 64)).read_bytes()
    (tmp_path / "images" / "s1" / "frontal.png").write_bytes(good[: len(good) // 2])  # a valid header, cut pixels
    with pytest.raises(DataError, match=r"s1/frontal.png \(unreadable\)"):
        data.read_annotation(_write(tmp_path, entries))
    assert [s.id for s in data.read_annotation(tmp_path / "annotation.json", skip_bad=True)] == ["s0", "s2"]
    _png(tmp_path / "images" / "s1" / "frontal.png", size=(64, 64))
    limit = Image.MAX_IMAGE_PIXELS
    try:  # a decompression bomb: more than twice PIL's pixel limit
        Image.MAX_IMAGE_PIXELS = 64 * 64 // 3
        with pytest.raises(DataError, match=r"s1/frontal.png \(refused: Image size \(4096 pixels\) exceeds"):
            data.read_annotation(tmp_path / "annotation.json")
        with pytest.raises(DataError, match=r"big.png: refused"):
            data.load_image(tmp_path / "big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_bad_images_are_listed_or_skipped_and_counted(tmp_path, caplog):
    entries = _dataset(tmp_path, n=6)
    (tmp_path / "images" / "s1" / "frontal.png").unlink()
    (tmp_path / "images" / "s3" / "frontal.png").write_bytes(b"garbage")
    (tmp_path / "images" / "s2" / "lateral.png").unlink()  # only a problem when all views are used
    _write(tmp_path, entries)
    with pytest.raises(DataError, match=r"2 image\(s\) missing or unreadable, e.g. .*s1/frontal.png \(missing\); "
                                        r".*s3/frontal.png \(unreadable\).*skip_bad"):
        data.read_annotation(tmp_path / "annotation.json")
    with caplog.at_level(logging.WARNING):
        studies = data.read_annotation(tmp_path / "annotation.json", skip_bad=True)
    assert [s.id for s in studies] == ["s0", "s2", "s4", "s5"]
    assert "skipped 2 missing or unreadable image(s) and 2 study(ies)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        studies = data.read_annotation(tmp_path / "annotation.json", views="all", skip_bad=True)
    assert [len(s.images) for s in studies] == [2, 1, 1, 1, 2, 2]  # s1 and s3 keep their lateral views, s2 its frontal
    assert "skipped 3 missing or unreadable image(s) and 0 study(ies)" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# batching

def _ids(batches):
    return [[s.id for s in batch] for batch in batches]


def _toy(n):
    return [data.Study(f"s{i}", [f"{i}.png"], f"report {i}") for i in range(n)]


def test_shuffle_is_deterministic_per_epoch_and_resumes_exactly():
    studies = _toy(23)
    a = data.Batches(studies, batch_size=4, seed=7)
    epoch0, epoch1 = _ids(a), _ids(a)  # each iteration runs one epoch
    assert len(epoch0) == 5 and sorted(sum(epoch0, [])) != sum(epoch0, [])  # 20 of 23, shuffled
    assert epoch0 != epoch1 and epoch0 == _ids(data.Batches(studies, batch_size=4, seed=7))
    assert epoch0 != _ids(data.Batches(studies, batch_size=4, seed=8))

    b = data.Batches(studies, batch_size=4, seed=7)
    seen, it = [], iter(b)
    for _ in range(3):
        seen.append([s.id for s in next(it)])
    state = json.loads(json.dumps(b.state_dict()))  # saved with a checkpoint
    rest = _ids(it) + _ids(b)  # the end of epoch 0, then epoch 1
    assert seen + rest == epoch0 + epoch1

    c = data.Batches(studies, batch_size=4, seed=7)
    c.load_state_dict(state)
    assert _ids(c) + _ids(c) == rest
    with pytest.raises(ValueError, match="seed=7"):
        data.Batches(studies, batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch 4"):
        data.Batches(studies, batch_size=2, seed=7).load_state_dict(state)
    # Two ranks with half the batch each resume at the same global batch: together they see the same studies.
    halves = [data.Batches(studies, batch_size=2, seed=7, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert [sorted(a + b) for a, b in zip(_ids(halves[0]), _ids(halves[1]))] == [sorted(x) for x in rest[:2]]


def test_shards_are_disjoint_and_cover_the_split():
    studies = _toy(23)
    for world in (1, 2, 3, 4):
        shards = [sum(_ids(data.Batches(studies, 2, seed=1, rank=r, world_size=world, drop_last=False)), [])
                  for r in range(world)]
        flat = sum(shards, [])
        assert len(flat) == len(set(flat)) == 23  # disjoint, and every study once
        trained = [_ids(data.Batches(studies, 2, seed=1, rank=r, world_size=world)) for r in range(world)]
        assert len({len(t) for t in trained}) == 1  # the same number of steps on every rank
        flat = sum(sum(trained, []), [])
        assert len(flat) == len(set(flat)) > 23 - 2 * world
    # Global batch k is the same set of studies for any world size (with the same global batch size).
    one = _ids(data.Batches(studies, 6, seed=3))
    for world in (2, 3):
        ranks = [_ids(data.Batches(studies, 6 // world, seed=3, rank=r, world_size=world)) for r in range(world)]
        assert [sorted(sum((r[k] for r in ranks), [])) for k in range(len(one))] == [sorted(b) for b in one]
    with pytest.raises(ValueError, match="do not fill one batch"):
        data.Batches(_toy(3), batch_size=2, world_size=2)


def test_collate(tmp_path):
    _dataset(tmp_path)
    studies = data.read_annotation(tmp_path / "annotation.json", views="all")
    proc = ImageProcessing(size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = data.collate(studies[:3], proc)
    assert batch["pixels"].shape == (6, 3, 16, 16) and batch["views"] == [2, 2, 2]
    assert batch["ids"] == ["s0", "s1", "s2"] and batch["prompts"] == [data.DEFAULT_PROMPT] * 3
    assert batch["reports"][2] == "Report number 2. No pneumothorax." and batch["labels"][0][0] == 1.0
    expected = data.preprocess([data.load_image(p) for p in studies[1].images], proc)
    assert torch.equal(batch["pixels"][2:4], expected)
    assert [image.tobytes() for image in batch["first_views"]] == [
        data.load_image(study.images[0]).tobytes() for study in studies[:3]]
    studies[1].labels = None
    assert data.collate(studies[:3], proc, prompt="Findings:")["labels"] is None
