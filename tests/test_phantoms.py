"""Tests of the phantom world: determinism, labels that match findings and sentences, findings visible in the
pixels (the task is learnable), the dataset on disk read back by nanovalor.data, the tokenizer, and speed.

    python -m pytest -q tests/test_phantoms.py
"""
import json
import math

import numpy as np
import pytest

from nanovalor import data, phantom_reports, phantoms
from nanovalor.chexpert import CHEXPERT_LABELS

LABEL = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
S = phantoms.SIZE


# ---------------------------------------------------------------------------------------------------------------
# determinism

def test_same_seed_same_study_and_other_seeds_differ():
    a, b = phantoms.make_study(0, "train", 7), phantoms.make_study(0, "train", 7)
    assert a["report"] == b["report"] and a["labels"] == b["labels"] and a["image"].tobytes() == b["image"].tobytes()
    assert phantoms.make_report(0, "train", 7) == {k: v for k, v in a.items() if k != "image"}  # the same streams
    for other in (phantoms.make_study(1, "train", 7), phantoms.make_study(0, "val", 7),
                  phantoms.make_study(0, "train", 8)):
        assert other["image"].tobytes() != a["image"].tobytes()


def test_generate_is_byte_identical_and_read_by_the_data_module(tmp_path):
    for run in ("a", "b"):
        phantoms.generate(tmp_path / run, n_train=12, n_val=3, n_test=4, seed=3, vocab_size=300, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 3 + 4 + 2  # PNGs, tokenizer.json, annotation.json; no temporary files left over
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    phantoms.generate(tmp_path / "c", n_train=12, n_val=3, n_test=4, seed=4, vocab_size=300, progress=False)
    ann_a = json.loads((tmp_path / "a" / "annotation.json").read_text())
    ann_c = json.loads((tmp_path / "c" / "annotation.json").read_text())
    assert [e["report"] for e in ann_a["train"]] != [e["report"] for e in ann_c["train"]]

    studies = data.read_annotation(tmp_path / "a" / "annotation.json", "test")  # the real reader, default root
    assert [s.id for s in studies] == [e["id"] for e in ann_a["test"]]
    study = phantoms.make_study(3, "test", 2)
    assert studies[2].report == study["report"] and studies[2].labels == study["labels"]
    assert np.array_equal(np.asarray(data.load_image(studies[2].images[0]))[..., 0], study["image"])


# ---------------------------------------------------------------------------------------------------------------
# labels and reports

def _studies(n, seed=0):  # the findings, reports and labels of training studies, not their images
    return [phantoms.make_report(seed, "train", i) for i in range(n)]


def test_labels_match_findings_and_sentences():
    # Each finding is stated positive (or uncertain) by its sentence, with its side; absent findings never are.
    states = {"cardiomegaly": ["Cardiomegaly"], "mediastinum": ["Enlarged Cardiomediastinum"],
              "effusion": ["Pleural Effusion"], "pneumothorax": ["Pneumothorax"], "edema": ["Edema"],
              "consolidation": ["Consolidation", "Lung Opacity", "Pneumonia"], "atelectasis": ["Atelectasis"],
              "nodule": ["Lung Lesion"], "fracture": ["Fracture"], "devices": ["Support Devices"]}
    for study in _studies(300, seed=11):
        f, labels = study["findings"], study["labels"]
        positive = {name for name, v in zip(CHEXPERT_LABELS, labels) if v in (1.0, -1.0)}
        for name, observations in states.items():
            if name in f:
                assert positive & set(observations), (name, study["report"])
        expected = set().union(*(states[name] for name in f)) | ({"No Finding"} if not set(f) - {"devices"} else set())
        extra = positive - expected - {"Lung Opacity"}  # opacity is also how edema / atelectasis may be phrased
        assert not extra, (extra, study["report"])
        if "Lung Opacity" in positive:
            assert {"consolidation", "edema", "atelectasis"} & set(f), study["report"]
        assert (labels[LABEL["No Finding"]] == 1.0) == (not set(f) - {"devices"})
        assert labels[LABEL["Pleural Other"]] is None
        for side in {f[k]["side"] for k in ("effusion", "pneumothorax", "fracture") if k in f} - {"bilateral"}:
            assert side in study["report"].lower(), study["report"]


def test_aggregation_follows_chexpert():
    agg = phantom_reports.aggregate_labels
    assert agg([{"Edema": 0}, {"Edema": -1}])[LABEL["Edema"]] == -1.0  # negative + uncertain = uncertain
    assert agg([{"Edema": 0}, {"Edema": 1}])[LABEL["Edema"]] == 1.0
    assert agg([{"Edema": -1}, {"Edema": 1}])[LABEL["Edema"]] == 1.0
    assert agg([{"Support Devices": 1}, {"Edema": 0}])[-1] == 1.0  # devices alone leave No Finding positive
    assert agg([{"Pneumonia": -1}])[-1] is None and agg([])[LABEL["Edema"]] is None


def test_reports_vary_and_normal_fraction_is_in_range():
    studies = _studies(1000)
    normal = np.mean([s["labels"][-1] == 1.0 for s in studies])
    assert 0.30 <= normal <= 0.40, normal
    assert len({s["report"] for s in studies}) >= 850
    for name, bank in phantom_reports.BANKS.items():
        if not name.startswith("no ") and name not in ("small pneumothorax", "endotracheal tube", "enteric tube",
                                                         "central venous catheter", "pacemaker"):
            assert len(bank) >= 5, name
    counts = {}
    for s in studies:
        for name in s["findings"]:
            counts[name] = counts.get(name, 0) + 1
    assert set(counts) == set(phantom_reports.TOPIC), counts  # every finding occurs
    co = sum("edema" in s["findings"] for s in studies if "cardiomegaly" in s["findings"]) / counts["cardiomegaly"]
    assert co > 2 * counts["edema"] / len(studies)  # priors: edema is far likelier with cardiomegaly


def test_labeler_recovers_phantom_labels():
    from nanovalor.chexpert import positive, clinical_f1, label_reports

    studies = _studies(400, seed=5)
    truth, read = [s["labels"] for s in studies], label_reports([s["report"] for s in studies])
    f1 = clinical_f1(read, truth)["f1_micro_14"]  # micro F1 over the 14, uncertain counts as positive
    wrong = positive(truth) != positive(read)  # (400, 14)
    misses = [(s["report"], [CHEXPERT_LABELS[j] for j in np.nonzero(row)[0]]) for s, row in zip(studies, wrong)
              if row.any()]
    assert f1 >= 0.98, (f1, misses[:5])


def test_tokenizer_special_ids_and_round_trip(tmp_path):
    reports = [s["report"] for s in _studies(200)]
    tok = phantoms.train_tokenizer(reports, tmp_path / "tokenizer.json", vocab_size=512)
    from tokenizers import Tokenizer

    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [loaded.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= 512
    text = reports[0] + " Ünïcode — 3.5 cm"
    assert loaded.decode(loaded.encode(text).ids) == text  # byte-level: any text round-trips, no <unk>
    assert len(loaded.encode(reports[1]).ids) < len(reports[1]) / 3  # merges learned from the reports


# ---------------------------------------------------------------------------------------------------------------
# the findings are visible: each changes a simple image statistic, across patients, the way it should

def _at(image, patient, u, v, half_w=1, half_h=None):
    """Mean of a small patch of `image` around the canonical-frame point (u, v) of `patient`."""
    half_h = half_w if half_h is None else half_h
    c, s, scale = math.cos(patient["angle"]), math.sin(patient["angle"]), patient["scale"]
    x, y = scale * (u * c - v * s) + patient["dx"], scale * (u * s + v * c) + patient["dy"]
    col, row = int((x + 1) / 2 * S), int((y + 1) / 2 * S)
    return image[row - half_h: row + half_h + 1, col - half_w: col + half_w + 1].astype(float).mean()


def _auc(positive, negative):
    """Probability that a random positive scores above a random negative (Mann-Whitney)."""
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None]
    return (p > n).mean() + 0.5 * (p == n).mean()


def _sign(side):
    return -1 if side == "right" else 1  # the patient's right is on the image's left


def _dome(patient, side):
    return patient["dome"] + (patient["dome_left"] if side == "left" else 0)


def _inner(v):  # the pleural surface of the chest wall at height v (phantoms.render's formula)
    return 0.8 * math.sqrt(max(0.0, 1 - ((v - 0.4) / 1.2) ** 2)) - 0.07


def _effusion(img, p, f):  # costophrenic angle against the mid lung above it
    s, top = _sign(f["effusion"]["side"]), _dome(p, f["effusion"]["side"])
    return _at(img, p, s * 0.64, top + 0.12) - _at(img, p, s * 0.5, top - 0.3, 1, 4)


def _pneumothorax(img, p, f):  # darker, marking-free rim inside the apical chest wall
    s = _sign(f["pneumothorax"]["side"])
    return _at(img, p, s * 0.32, -0.1, 1, 4) - _at(img, p, s * (_inner(-0.45) - 0.025), -0.45, 0, 4)


def _rib_v(p, u, k):  # centre line of rib k (0 = first) at u
    return p["rib0"] + 0.3 * u * u + (k + 0.21) * p["rib_gap"]


def _fracture(img, p, f):  # the rib is interrupted: its centre is no brighter than the interspace above it
    fr = f["fracture"]
    s, v = _sign(fr["side"]), _rib_v(p, fr["pos"], fr["rib"] - 1)
    return _at(img, p, s * fr["pos"], v - 0.5 * p["rib_gap"], 0) - _at(img, p, s * fr["pos"], v, 0)


def _atelectasis(img, p, f):
    at = f["atelectasis"]
    side = "left" if at["side"] == "left" else "right"
    u, v = (-0.42 if side == "right" else 0.52), _dome(p, side) - 0.14 - at["dv"]
    return _at(img, p, u, v, 1, 0) - _at(img, p, u, v - 0.12, 1, 4)


def _nodule(img, p, f):
    cu, cv, _ = phantoms.LOBES[f["nodule"]["lobe"]]
    u, v = cu + f["nodule"]["du"], cv + f["nodule"]["dv"]
    return _at(img, p, u, v, 0) - _at(img, p, u + 0.12, v, 0, 4)


def _consolidation(img, p, f):
    cu, cv, _ = phantoms.LOBES[f["consolidation"]["lobe"]]
    return _at(img, p, cu, cv, 2) - _at(img, p, cu, cv + (0.3 if cv < 0 else -0.35), 2, 4)  # same lung, other zone


def _edema(img, p, f):  # perihilar lung against the apices
    return sum(_at(img, p, s * 0.42, -0.05, 2) - _at(img, p, s * 0.3, -0.6, 2) for s in (-1, 1))


def _heart_width(img, p, f):  # bright run across the row through the heart, image-only
    row = img[int(0.64 * S)].astype(float)
    lung, soft = np.percentile(img[int(0.4 * S)], 10), img[int(0.64 * S), S // 2 - 2: S // 2 + 8].mean()
    return (row[int(0.2 * S): int(0.8 * S)] > (lung + soft) / 2).mean()


def _mediastinum(img, p, f):  # bright central column across the upper chest, image-only
    band = img[int(0.25 * S): int(0.32 * S), int(0.25 * S): int(0.75 * S)].astype(float)
    lung = np.percentile(band, 10)
    return (band > lung + 0.6 * (band.max() - lung)).mean()


def _devices(img, p, f):  # radiopaque: pixels brighter than any anatomy, image-only
    return (img >= 250).sum()


VISIBLE = {  # finding: (sampler of its parameters, statistic, minimal AUC against normal patients)
    "cardiomegaly": (lambda r: {"cardiomegaly": phantoms._graded(r, phantoms.GRADES[r.integers(3)],
                                                                 phantoms.CTR_EDGES)}, _heart_width, 0.97),
    "mediastinum": (lambda r: {"mediastinum": {"width": r.uniform(*phantoms.WIDE_MEDIASTINUM)}}, _mediastinum, 0.97),
    "effusion": (lambda r: {"effusion": phantoms._pleural(r, phantoms.SIDES[r.integers(2)])}, _effusion, 0.97),
    "small effusion": (lambda r: {"effusion": phantoms._pleural(r, phantoms.SIDES[r.integers(2)], (1, 0, 0))},
                       _effusion, 0.95),
    "pneumothorax": (lambda r: {"pneumothorax": phantoms._pleural(r, phantoms.SIDES[r.integers(2)])},
                     _pneumothorax, 0.95),
    "small pneumothorax": (lambda r: {"pneumothorax": phantoms._pleural(r, phantoms.SIDES[r.integers(2)],
                                                                        (1, 0, 0))}, _pneumothorax, 0.9),
    "consolidation": (lambda r: {"consolidation": {"lobe": list(phantoms.LOBES)[r.integers(5)], "du": 0, "dv": 0,
                                                   "r": 1.0, "shape": r.uniform(0, 6)}}, _consolidation, 0.97),
    "edema": (lambda r: {"edema": phantoms._graded(r, phantoms.GRADES[r.integers(3)], phantoms.EDEMA_EDGES)},
              _edema, 0.95),
    "atelectasis": (lambda r: {"atelectasis": phantoms._atelectasis(r)}, _atelectasis, 0.95),
    "nodule": (lambda r: {"nodule": phantoms._nodule(r, "nodule", list(phantoms.LOBES)[r.integers(5)])}, _nodule,
               0.95),
    "fracture": (lambda r: {"fracture": {"side": phantoms.SIDES[r.integers(2)],
                                         "rib": int(r.integers(*phantoms.FRACTURE_RIBS)),
                                         "pos": r.uniform(*phantoms.FRACTURE_POS)}}, _fracture, 0.9),
    "devices": (lambda r: {"devices": [phantoms.DEVICES[r.integers(4)]]}, _devices, 0.97),
}


@pytest.mark.parametrize("name", list(VISIBLE))
def test_finding_is_visible_across_patients(name):
    sample, statistic, min_auc = VISIBLE[name]
    rng = np.random.default_rng(list(VISIBLE).index(name))
    with_finding, without = [], []
    for _ in range(120):
        patient, findings, normal = phantoms.sample_patient(rng), sample(rng), phantoms.sample_patient(rng)
        with_finding.append(statistic(phantoms.render(patient, findings), patient, findings))
        without.append(statistic(phantoms.render(normal, {}), normal, findings))  # same place, normal patient
    assert _auc(with_finding, without) >= min_auc, (_auc(with_finding, without), np.mean(with_finding),
                                                    np.mean(without))


def test_contact_sheet(tmp_path):
    phantoms.contact_sheet(tmp_path / "sheet.png")
    from PIL import Image

    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] >= 4 * S and sheet.size[1] >= 4 * S
