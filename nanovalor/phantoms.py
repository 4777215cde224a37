"""The phantom world: synthetic chest radiographs with findings-style reports and exact CheXpert labels.

The embedded default dataset: every stage of nanovalor runs on a laptop with nothing downloaded. A study is a
rendered frontal chest radiograph (body, lungs with vessel markings, heart with a cardiothoracic ratio, mediastinum,
trachea, diaphragm domes and costophrenic angles, ribs, clavicles, noise; per-patient pose, size and exposure) with
findings drawn in, a report written from many phrasings (phantom_reports.py), and the CheXpert-14 label vector of
that report. Findings co-occur with clinical priors (cardiomegaly with edema and effusions, trauma with fracture and
pneumothorax), so a model that ignores the image writes plausible but wrong findings; some are subtle (small
effusion, small apical pneumothorax, small nodule), so looking carefully pays. The patient's right is on the
image's left, as in radiology.

    python -m nanovalor.phantoms --out data/phantoms --n_train 4000 --n_val 200 --n_test 500 --seed 0
    python -m nanovalor.phantoms --sheet docs/phantoms.png      # 16 studies captioned with their findings

writes DIR/images/{split}/*.png (8-bit grayscale, 128 x 128), DIR/tokenizer.json (byte-level BPE trained on the
training reports) and, last, DIR/annotation.json: R2Gen's layout plus "labels" and "findings" (captions) per study,
read by nanovalor.data.read_annotation like a real dataset. The same seed gives the same bytes.
"""
import argparse
import ctypes
import io
import json
import math
import sys
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nanovalor.checkpoint import write_atomic
from nanovalor.phantom_reports import write_report
from nanovalor.chexpert import CHEXPERT_LABELS

SIZE = 128
UNIT_CM = 18.0  # the canonical frame spans [-1, 1]; one unit is 18 cm of patient (thoracic width ~ 26 cm)
SPLITS = {"train": 0, "val": 1, "test": 2}
GRADES, SIZES, SIDES = ("mild", "moderate", "severe"), ("small", "moderate", "large"), ("right", "left")
LOBES = {  # centre (u, v) and radius in the canonical frame; u < 0 is the patient's right (the image's left)
    "right upper lobe": (-0.42, -0.36, 0.2), "right middle lobe": (-0.32, 0.14, 0.15),
    "right lower lobe": (-0.48, 0.34, 0.16), "left upper lobe": (0.45, -0.34, 0.2),
    "left lower lobe": (0.56, 0.34, 0.14)}
DEVICES = ("endotracheal tube", "enteric tube", "central venous catheter", "pacemaker")
CTR_EDGES = (0.54, 0.59, 0.65, 0.72)  # cardiomegaly: the cardiothoracic ratio's range for each of GRADES
EDEMA_EDGES = (0.07, 0.11, 0.15, 0.2)  # edema: the haze density's range for each of GRADES
WIDE_MEDIASTINUM = (0.22, 0.28)  # the mediastinum's half-width when widened (a patient's own: 0.1 to 0.13)
FRACTURE_RIBS, FRACTURE_POS = (4, 10), (0.4, 0.56)  # a broken rib (4th to 9th) and where across it (|u|)


# ----------------------------------------------------------------------------------------------------------------
# a study: findings drawn with clinical priors, and a patient

def sample_findings(rng) -> dict:
    """Findings of one study as {name: parameters}; {} is a normal study. One clinical scenario per study sets the
    co-occurrence priors; incidental atelectasis, nodules and a widened mediastinum can join any abnormal one."""
    chance = lambda p: rng.random() < p  # noqa: E731
    pick = lambda options, weights=None: options[rng.choice(len(options), p=weights)]  # noqa: E731
    scenario = pick(("healthy", "cardiac", "infection", "icu", "trauma", "oncology"), (.3, .21, .17, .14, .09, .09))
    f = {}
    if scenario == "cardiac":
        if chance(0.85):
            f["cardiomegaly"] = _graded(rng, pick(GRADES, (0.45, 0.35, 0.2)), CTR_EDGES)
        if chance(0.6 if f else 0.35):
            f["edema"] = _graded(rng, pick(GRADES, (0.5, 0.35, 0.15)), EDEMA_EDGES)
        if chance(0.5):
            f["effusion"] = _pleural(rng, pick(("bilateral", "right", "left"), (0.55, 0.3, 0.15)))
        if chance(0.25):
            f["devices"] = ["pacemaker"]
    elif scenario == "infection":
        lobe = pick(tuple(LOBES), (0.18, 0.15, 0.3, 0.15, 0.22))
        f["consolidation"] = _consolidation(rng, lobe)
        if chance(0.3):
            f["effusion"] = _pleural(rng, lobe.split()[0], sizes=(0.7, 0.3, 0.0))
    elif scenario == "icu":
        f["devices"] = [d for d, p in zip(DEVICES, (0.7, 0.6, 0.7)) if chance(p)] or ["central venous catheter"]
        if chance(0.5):
            f["atelectasis"] = _atelectasis(rng)
        if chance(0.35):
            f["effusion"] = _pleural(rng, pick(("bilateral", "right", "left")))
        if chance(0.25):
            f["edema"] = _graded(rng, pick(GRADES, (0.5, 0.4, 0.1)), EDEMA_EDGES)
        if chance(0.25):
            f["cardiomegaly"] = _graded(rng, pick(GRADES, (0.6, 0.3, 0.1)), CTR_EDGES)
        if chance(0.2):  # ventilator-associated pneumonia, aspiration
            f["consolidation"] = _consolidation(rng, pick(tuple(LOBES), (0.1, 0.1, 0.4, 0.1, 0.3)))
        if chance(0.08):
            f["pneumothorax"] = _pleural(rng, pick(SIDES), sizes=(0.7, 0.3, 0.0))
    elif scenario == "trauma":
        side = pick(SIDES)
        if chance(0.85):
            f["fracture"] = {"side": side, "rib": int(rng.integers(*FRACTURE_RIBS)),
                             "pos": rng.uniform(*FRACTURE_POS)}
        if chance(0.5 if f else 1.0):
            f["pneumothorax"] = _pleural(rng, side if chance(0.85) else pick(SIDES))
        if chance(0.15):
            f["effusion"] = _pleural(rng, side, sizes=(0.7, 0.3, 0.0))
    elif scenario == "oncology":
        f["nodule"] = _nodule(rng, pick(("nodule", "mass"), (0.6, 0.4)), pick(tuple(LOBES)))
        if chance(0.25):
            f["effusion"] = _pleural(rng, pick(("right", "left", "bilateral")))
    if scenario != "healthy":
        if "atelectasis" not in f and chance(0.08):
            f["atelectasis"] = _atelectasis(rng)
        if "nodule" not in f and chance(0.03):
            f["nodule"] = _nodule(rng, "nodule", pick(tuple(LOBES)))
        if chance(0.12 if scenario in ("trauma", "oncology") else 0.02):
            f["mediastinum"] = {"width": rng.uniform(*WIDE_MEDIASTINUM)}
    return f


FINDINGS = ("cardiomegaly", "mediastinum", "edema", "consolidation", "atelectasis", "nodule", "effusion",
            "pneumothorax", "fracture", "devices")  # the keys a findings dict may hold


def sample_finding(name, rng):
    """The parameters of one finding `name` (a key of FINDINGS), drawn without a scenario's priors: what a report
    writer adds to make a near miss (phantom_expert.py's hard negatives and judge)."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    if name in ("cardiomegaly", "edema"):
        return _graded(rng, pick(GRADES), CTR_EDGES if name == "cardiomegaly" else EDEMA_EDGES)
    if name in ("effusion", "pneumothorax"):
        return _pleural(rng, pick(("bilateral",) + SIDES if name == "effusion" else SIDES))
    if name == "consolidation":
        return _consolidation(rng, pick(tuple(LOBES)))
    if name == "atelectasis":
        return _atelectasis(rng)
    if name == "nodule":
        return _nodule(rng, pick(("nodule", "mass")), pick(tuple(LOBES)))
    if name == "mediastinum":
        return {"width": rng.uniform(*WIDE_MEDIASTINUM)}
    if name == "fracture":
        return {"side": pick(SIDES), "rib": int(rng.integers(*FRACTURE_RIBS)), "pos": rng.uniform(*FRACTURE_POS)}
    if name == "devices":
        return [pick(DEVICES)]
    raise ValueError(f"sample_finding: unknown finding {name!r}; expected one of {FINDINGS}")


def _graded(rng, grade, edges):
    """A grade and its continuous amount (cardiothoracic ratio, edema density) within that grade's range."""
    k = GRADES.index(grade)
    return {"grade": grade, "amount": rng.uniform(edges[k], edges[k + 1])}


def _pleural(rng, side, sizes=(0.5, 0.35, 0.15)):
    """An effusion or pneumothorax: side, size class, and an amount in [0, 1] within that class."""
    size = SIZES[rng.choice(3, p=sizes)]
    lo, hi = {"small": (0.0, 0.3), "moderate": (0.4, 0.65), "large": (0.75, 1.0)}[size]
    return {"side": side, "size": size, "amount": rng.uniform(lo, hi)}


def _consolidation(rng, lobe):
    return {"lobe": lobe, "du": rng.uniform(-0.04, 0.04), "dv": rng.uniform(-0.04, 0.04), "r": rng.uniform(0.9, 1.2),
            "shape": rng.uniform(0, 2 * math.pi)}


def _atelectasis(rng):
    side = SIDES[rng.integers(2)] if rng.random() < 0.55 else "bilateral"
    return {"side": side, "dv": rng.uniform(0.0, 0.1), "tilt": rng.uniform(-0.15, 0.15)}


def _nodule(rng, kind, lobe):
    cm = rng.uniform(1.0, 2.8) if kind == "nodule" else rng.uniform(3.2, 6.0)
    return {"kind": kind, "lobe": lobe, "cm": round(cm, 1), "du": rng.uniform(-0.07, 0.07),
            "dv": rng.uniform(-0.07, 0.07)}


def sample_patient(rng) -> dict:
    """Anatomy, pose and exposure of one patient, and the seed of everything random in their image."""
    return {"scale": rng.uniform(0.88, 1.0), "dx": rng.uniform(-0.05, 0.05), "dy": rng.uniform(-0.02, 0.06),
            "angle": rng.uniform(-0.06, 0.06), "ctr": rng.uniform(0.38, 0.48), "dome": rng.uniform(0.4, 0.48),
            "dome_left": rng.uniform(0.02, 0.07), "mediastinum": rng.uniform(0.1, 0.13),
            "rib0": rng.uniform(-0.93, -0.87), "rib_gap": rng.uniform(0.125, 0.14), "gain": rng.uniform(0.9, 1.08),
            "bias": rng.uniform(-0.03, 0.04), "curve": rng.uniform(-0.3, 0.3), "noise": rng.uniform(0.008, 0.02),
            "seed": int(rng.integers(2**31))}


# ----------------------------------------------------------------------------------------------------------------
# rendering: densities in the patient's canonical frame (u to the image's right, v down, [-1, 1] when upright)

def _soft(signed_distance, edge):
    """Anti-aliased mask: 1 inside (distance < 0), 0 outside, a linear ramp `edge` wide."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _ellipse(u, v, cu, cv, a, b, edge):
    return _soft((np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1) * min(a, b), edge)


def _polyline(u, v, points, width, edge):
    """Mask of a tube `width` wide along the polyline `points` (tubes, catheters, leads)."""
    dist2 = None
    for (u0, v0), (u1, v1) in zip(points[:-1], points[1:]):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0, 1)  # nearest point of the segment
        d2 = (u - u0 - t * du) ** 2 + (v - v0 - t * dv) ** 2
        dist2 = d2 if dist2 is None else np.minimum(dist2, d2)
    return _soft(np.sqrt(dist2) - width / 2, edge)


def _spokes(du, dv, n, phase):
    """cos(n * angle + phase), with the pseudo-angle dv / (|du| + |dv|) (in [-1, 1] over a half turn, mirrored
    across the vertical) for the angle of (du, dv): numpy's arctan2 is ten times slower."""
    return np.cos((np.pi / 2 * n) * dv / (np.abs(du) + np.abs(dv) + 1e-6) + phase)


@lru_cache(maxsize=4)
def _grid(size):
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) * (2 / size) - 1  # pixel centres in [-1, 1]
    return x, y


def render(patient: dict, findings: dict, size=SIZE) -> np.ndarray:
    """A (size, size) uint8 radiograph of `patient` with `findings` drawn in."""
    P, f = patient, findings
    rng = np.random.default_rng(P["seed"])  # drawn in a fixed order, whatever the findings
    noise = rng.random((size, size), dtype=np.float32) - 0.5  # uniform: numpy's normal sampler is 4x slower
    waves = rng.uniform(0, 2 * math.pi, (2, 3, 2)).astype(np.float32)  # (x|y, component, frequency|phase)
    spin = rng.uniform(0, 2 * math.pi)

    x, y = _grid(size)  # pose: image coordinates -> the patient's canonical frame (u, v)
    c, s = math.cos(P["angle"]), math.sin(P["angle"])
    u = ((x - P["dx"]) * c + (y - P["dy"]) * s) / P["scale"]
    v = (-(x - P["dx"]) * s + (y - P["dy"]) * c) / P["scale"]
    px = 2 / size / P["scale"]  # one pixel in canonical units: the width of every anti-aliasing ramp
    right = (u < 0).astype(np.float32)  # the patient's right half
    grid = np.linspace(-1, 1, size, dtype=np.float32)
    texture = sum(np.outer(np.cos((2 + waves[1, k, 0]) * grid + waves[1, k, 1]),  # a faint, smooth mottle in [0, 1]
                           np.cos((2 + waves[0, k, 0]) * grid + waves[0, k, 1])) for k in range(3)) / 6 + 0.5

    # Chest wall: half-width W(v), round at the apices, widest at the bases; the pleura 0.07 inside it.
    wall = 0.8 * np.sqrt(np.clip(1 - ((v - 0.4) / 1.2) ** 2, 0, 1))
    inner = wall - 0.07
    dome_r, dome_l = P["dome"], P["dome"] + P["dome_left"]  # the left hemidiaphragm sits a little lower
    dome = dome_r + P["dome_left"] * (1 - right) + 1.2 * (np.abs(u) - 0.28) ** 2  # lowest laterally
    below = _soft(dome - v, px)  # under the diaphragm
    cavity = _soft(np.abs(u) - inner, px) * (1 - below)  # both pleural cavities
    ctr = f["cardiomegaly"]["amount"] if "cardiomegaly" in f else P["ctr"]
    a = ctr * 0.73  # heart half-width = CTR x the inner thoracic half-width (0.73 at the bases)
    heart = _ellipse(u, v, 0.4 * a + 0.02, dome_l - 0.15, a, 0.32 + 0.3 * (ctr - 0.45), px)
    mw = f["mediastinum"]["width"] if "mediastinum" in f else P["mediastinum"]
    mediastinum = np.maximum(_soft(np.abs(u - 0.02) - mw, px), _ellipse(u, v, mw + 0.03, -0.3, 0.07, 0.07, px))
    solid = np.maximum(heart, mediastinum) * (1 - below)  # + the aortic knob, above
    lungs = cavity * (1 - solid)

    shoulders = 0.97 * np.sqrt(np.clip(1 - ((v + 1.15) / 0.65) ** 2, 0, 1))
    body = _soft(np.abs(u) - np.maximum(wall + 0.14, shoulders), px)
    d = 0.04 + 0.42 * body + 0.12 * body * below + 0.16 * solid
    d -= 0.12 * _soft(np.abs(u - 0.01) - 0.035, px) * (v < -0.22)  # trachea, down to the carina
    d -= 0.18 * _ellipse(u, v, 0.42, dome_l + 0.14, 0.12, 0.07, px)  # gastric air bubble

    # Lung markings: vessels fanning out of each hilum and fading to the periphery, on a faint texture.
    hu = 0.22 - 0.42 * right
    r = np.sqrt((u - hu) ** 2 + (v + 0.05) ** 2)
    vessels = (0.5 + 0.5 * _spokes(u - hu, v + 0.05, 11, spin)) ** 2
    parenchyma = 0.04 + 0.03 * texture + 0.1 * vessels * vessels * vessels * np.exp(-r / 0.4) * (0.5 + texture)

    # Pleural findings: fluid replaces lung at the base (with a meniscus), air replaces it at the apex and wall.
    fluid, ptx, edge_line = np.zeros_like(u), np.zeros_like(u), np.zeros_like(u)
    for side in _sides(f.get("effusion")):
        sign, this, top = (-1, right, dome_r) if side == "right" else (1, 1 - right, dome_l)
        h = 0.15 + 0.45 * f["effusion"]["amount"]  # height above the costophrenic angle (|u| ~ 0.72)
        level = top + 1.2 * 0.44 ** 2 - h * (0.5 + 0.5 * np.clip(sign * u / 0.72, 0, 1) ** 2)
        fluid = np.maximum(fluid, _soft(level - v, 0.04) * this)
    for side in _sides(f.get("pneumothorax")):
        this = right if side == "right" else 1 - right
        gap = (0.05 + 0.3 * f["pneumothorax"]["amount"]) * np.clip((0.6 - v) / 1.2, 0.1, 1)  # widest at apex
        ptx, edge_line = _soft(inner - np.abs(u) - gap, px) * this, _soft(np.abs(inner - np.abs(u) - gap) - 0.006,
                                                                          px) * this
    air = lungs * (1 - fluid)
    d += air * (parenchyma * (1 - ptx) - 0.36 - 0.06 * ptx + 0.08 * edge_line)

    # Parenchymal findings: densities inside the lungs.
    if "consolidation" in f:
        c = f["consolidation"]
        cu, cv, rad = LOBES[c["lobe"]]
        du, dv = u - cu - c["du"], v - cv - c["dv"]
        edge = rad * c["r"] * (1 + 0.2 * _spokes(du, dv, 3, c["shape"]))
        d += 0.3 * lungs * np.clip(3 * (1 - np.sqrt(du * du + dv * dv) / edge), 0, 1) * (0.7 + 0.3 * texture)
    if "edema" in f:  # perihilar haze in both lungs, some at the bases too
        d += f["edema"]["amount"] * lungs * (np.exp(-(r / 0.42) ** 2) + 0.35 * np.clip(v / 0.4, 0, 1))
    for side in _sides(f.get("atelectasis")):  # a linear band above the dome
        at, mid = f["atelectasis"], -0.42 if side == "right" else 0.52  # the left one lateral to the heart
        vb = (dome_r if side == "right" else dome_l) - 0.14 - at["dv"] + at["tilt"] * (u - mid)
        d += 0.28 * lungs * _soft(np.abs(v - vb) - 0.025, px) * _soft(np.abs(u - mid) - 0.2, px)
    if "nodule" in f:
        n = f["nodule"]
        cu, cv, _ = LOBES[n["lobe"]]
        rad, du, dv = n["cm"] / 2 / UNIT_CM, u - cu - n["du"], v - cv - n["dv"]
        dist = np.sqrt(du * du + dv * dv) * (1 + 0.12 * _spokes(du, dv, 5, 0) * (n["kind"] == "mass"))
        d += 0.32 * cavity * _soft(dist - rad, max(px, 0.2 * rad))

    # Bones: ten posterior ribs curving down laterally, and the clavicles.
    phase = (v - P["rib0"] - 0.3 * u * u) / P["rib_gap"]
    rib = np.floor(phase)
    broken = np.zeros(u.shape, bool)
    if "fracture" in f:  # a gap across one rib, its lateral fragment stepped down
        fr = f["fracture"]
        sign = -1 if fr["side"] == "right" else 1
        this_rib = (rib == fr["rib"] - 1) & (sign * u > 0)
        phase = phase - 0.3 * (this_rib & (sign * u > fr["pos"]))
        broken = this_rib & (np.abs(sign * u - fr["pos"]) < 0.03)
    t = phase - np.floor(phase)
    t = np.minimum(t / 0.42, 1)  # a rib is the first 42% of each period, brightest in its middle
    ribs = 4 * t * (1 - t) * ((rib >= 0) & (rib < 10) & ~broken)
    d += 0.13 * ribs * _soft(np.abs(u) - wall, px) * (v < dome + 0.1)
    d += 0.1 * _soft(np.abs(v + 0.68 + 0.15 * np.abs(u)) - 0.03, px) * (np.abs(u) > 0.08) * (np.abs(u) < 0.7)

    for device in f.get("devices", []):  # radiopaque: brighter than any anatomy
        d += 0.5 * _device(u, v, device, dome_l, px)

    image = np.clip(P["gain"] * d + P["bias"], 0, 1)
    image = image + P["curve"] * image * (1 - image) + P["noise"] * math.sqrt(12) * noise  # exposure curve, noise
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _sides(finding):
    return () if finding is None else SIDES if finding["side"] == "bilateral" else (finding["side"],)


def _device(u, v, name, dome_l, px):
    if name == "endotracheal tube":  # tip 4.5 cm above the carina (v = -0.22)
        return _polyline(u, v, [(0.01, -1.3), (0.01, -0.22 - 4.5 / UNIT_CM)], 0.022, px)
    if name == "enteric tube":  # down the oesophagus, through the hiatus, into the gastric bubble
        return _polyline(u, v, [(0.04, -1.3), (0.05, -0.3), (0.07, dome_l - 0.02), (0.22, dome_l + 0.12),
                                (0.4, dome_l + 0.15)], 0.016, px)
    if name == "central venous catheter":  # right internal jugular, tip in the superior vena cava
        return _polyline(u, v, [(-0.3, -1.3), (-0.16, -0.72), (-0.08, -0.4), (-0.07, -0.08)], 0.014, px)
    generator = _soft(np.maximum(np.abs(u - 0.52) - 0.09, np.abs(v + 0.62) - 0.06), px)  # pacemaker, 2 leads
    leads = np.maximum(_polyline(u, v, [(0.46, -0.6), (0.14, -0.5), (-0.04, -0.18), (-0.06, 0.06)], 0.012, px),
                       _polyline(u, v, [(0.46, -0.58), (0.1, -0.44), (0.0, -0.04), (0.14, 0.26), (0.24, 0.34)],
                                 0.012, px))
    return np.maximum(1.4 * generator, leads)


# ----------------------------------------------------------------------------------------------------------------
# studies, the dataset on disk, the tokenizer and the contact sheet

def make_study(seed: int, split: str, index: int, size=SIZE) -> dict:
    """Study `index` of `split`: findings, patient and report each from their own random stream, so each is a
    pure function of (seed, split, index)."""
    study = make_report(seed, split, index)
    return {**study, "image": render(make_patient(seed, split, index), study["findings"], size)}


def make_patient(seed: int, split: str, index: int) -> dict:
    """The patient of study `index` of `split`: render(make_patient(...), findings) draws them with any findings."""
    return sample_patient(_stream(seed, split, index, 1))


def make_report(seed: int, split: str, index: int) -> dict:
    """make_study without the image (nor its cost): the same findings, report, labels and captions."""
    findings = sample_findings(_stream(seed, split, index, 0))
    report, labels = write_report(findings, _stream(seed, split, index, 2))
    return {"id": f"phantom-{split}-{index:05d}", "report": report, "labels": labels, "findings": findings,
            "captions": describe(findings)}


def _stream(seed, split, index, k):  # a study's random streams: 0 findings, 1 patient, 2 report
    return np.random.default_rng([seed, SPLITS[split], index, k])


CAPTIONS = {"cardiomegaly": "{grade} cardiomegaly", "edema": "{grade} edema", "effusion": "{size} {side} effusion",
            "pneumothorax": "{size} {side} pneumothorax", "consolidation": "consolidation, {lobe}",
            "atelectasis": "{side} atelectasis", "nodule": "{cm} cm {kind}, {lobe}", "mediastinum": "wide mediastinum",
            "fracture": "{side} rib {rib} fracture"}


def describe(findings: dict) -> list[str]:
    """Short captions of the findings (sides are the patient's)."""
    return [caption for name, p in findings.items()
            for caption in (p if name == "devices" else [CAPTIONS[name].format(**p)])] or ["normal"]


def generate(out, n_train=4000, n_val=200, n_test=500, seed=0, size=SIZE, vocab_size=2048, progress=True) -> dict:
    """Write the phantom dataset to `out` (layout in the module docstring); returns the annotation dict."""
    out, start, done = Path(out), time.perf_counter(), 0
    total, annotation = n_train + n_val + n_test, {}
    (out / "annotation.json").unlink(missing_ok=True)  # incomplete until it is written again, at the end
    try:  # glibc hands freed memory back to the OS at once, and every image's arrays fault it in again: keep
        ctypes.CDLL("libc.so.6").mallopt(-1, 256 << 20)  # 256 MB (-1 = M_TRIM_THRESHOLD). Renders 2x faster.
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        entries = annotation[split] = []
        for index in range(n):
            study = make_study(seed, split, index, size)
            path = f"{split}/{study['id']}.png"
            Image.fromarray(study["image"]).save(out / "images" / path)  # annotation.json, last, marks them whole
            labels = {k: v for k, v in zip(CHEXPERT_LABELS, study["labels"]) if v is not None}
            entries.append({"id": study["id"], "report": study["report"], "image_path": [path], "labels": labels,
                            "findings": study["captions"]})
            done += 1
            if progress and (done % max(1, total // 200) == 0 or done == total):
                rate = done / (time.perf_counter() - start)
                print(f"\rphantoms [{'#' * (30 * done // total):<30}] {done}/{total} {rate:.0f} studies/s", end="",
                      file=sys.stderr)
    if progress and total:
        print(file=sys.stderr)
    if n_train:
        train_tokenizer([e["report"] for e in annotation["train"]], out / "tokenizer.json", vocab_size)
    write_atomic(out / "annotation.json", json.dumps(annotation, indent=1))
    return annotation


def train_tokenizer(reports: list[str], path, vocab_size=2048):
    """Byte-level BPE on the reports, with <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4; saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(reports, trainer)
    write_atomic(path, tokenizer.to_str())
    return tokenizer


def contact_sheet(path, seed=0, size=SIZE, n=16):
    """A 4-column sheet of training studies captioned with their findings: two normal ones, then, greedily among
    the first 200, the study showing the most kinds of finding (then captions) not yet on the sheet."""
    def kinds(study):
        f = study["findings"]
        return {f["nodule"]["kind"] if k == "nodule" else k for k in f if k != "devices"} | set(f.get("devices", []))

    pool = [make_study(seed, "train", index, size) for index in range(200)]
    picked = [s for s in pool if not s["findings"]][:2]
    while len(picked) < n:
        shown, captions = set().union(*map(kinds, picked)), {c for s in picked for c in s["captions"]}
        picked.append(max((s for s in pool if s not in picked),
                          key=lambda s: (len(kinds(s) - shown), len(set(s["captions"]) - captions))))
    font, line_h, tile_w = ImageFont.load_default(size=11), 13, max(size, 180)
    tile_h = size + 4 * line_h + 8
    sheet = Image.new("L", (4 * tile_w, math.ceil(n / 4) * tile_h), 255)
    draw = ImageDraw.Draw(sheet)
    for k, study in enumerate(picked):
        x, y = (k % 4) * tile_w, (k // 4) * tile_h
        sheet.paste(Image.fromarray(study["image"]), (x + (tile_w - size) // 2, y + 4))
        for j, caption in enumerate(study["captions"][:4]):
            draw.text((x + 4, y + size + 6 + j * line_h), caption, fill=0, font=font)
    png = io.BytesIO()
    sheet.save(png, "PNG", optimize=True)
    write_atomic(path, png.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# the phantom world's tiny models, built fresh here and trained from scratch by train.py (--stage sft, --stage expert)

PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": SIZE},
                "crop_size": {"height": SIZE, "width": SIZE}, "do_center_crop": True, "resample": 3,
                "image_mean": [0.5] * 3, "image_std": [0.25] * 3}  # phantom pixels: mean ~0.45, std ~0.25


def _vision():
    """The phantom world's ViT (the expert's image tower, and the policy's once copied from it): 3 CLIP-style blocks
    over 64 patches of 16 px."""
    from nanovalor.vit import VisionConfig
    return VisionConfig(image_size=SIZE, patch_size=16, hidden_size=96, intermediate_size=384, num_layers=3,
                        num_heads=4)


def tiny_policy(folder, vision_tower=None):
    """A fresh 2.5M-parameter LLaVA for the phantom world in `folder` (its tokenizer.json sets the vocabulary): the
    phantom ViT, the mlp2x_gelu projector and a 4-block Llama decoder (GQA). As LLaVA starts from a contrastively
    trained CLIP ViT, give `vision_tower` (a trained phantom expert's `visual`) to copy its weights in."""
    if vision_tower is not None and vision_tower.cfg.conv_stem:
        raise ValueError("tiny_policy: the expert's ViT has a conv stem, which a llava-hf checkpoint cannot hold: "
                         "the phantom policy starts from an expert trained without --conv_stem")
    from tokenizers import Tokenizer

    from nanovalor.policy import DecoderConfig, Llava, LlavaConfig

    vocab = Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).get_vocab_size()
    text = DecoderConfig(model_type="llama", vocab_size=vocab, hidden_size=192, intermediate_size=512, num_layers=4,
                         num_heads=6, num_kv_heads=2, head_dim=32)
    model = Llava(LlavaConfig(vision=_vision(), text=text, image_token_id=4, feature_layer=-1, eos_token_id=[2],
                              chat_format="short"))  # <image> = 4, </s> = 2 in train_tokenizer
    if vision_tower is not None:
        model.vision_tower.load_state_dict(vision_tower.state_dict())
    model.source, model.preprocessor_config = str(folder), dict(PREPROCESSOR)  # save() copies tokenizer.json
    return model


def tiny_expert(folder, conv_stem=()):
    """A fresh CLIP-style expert for the phantom world: the phantom ViT and a 3-block BERT over the world's BPE
    tokens (<s> report </s>, pooled at <s>), 64-d joint space. conv_stem: the ViT's early convolutions (vit.py;
    e.g. (24, 48, 96)); such an expert judges better but its ViT cannot seed the llava-hf policy (tiny_policy)."""
    from tokenizers import Tokenizer, processors

    from nanovalor.data import read_preprocessor_config
    from nanovalor.expert import BertConfig, Expert, ExpertConfig, finish_tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1),
                                                                                                   ("</s>", 2)])
    tokenizer = finish_tokenizer(tokenizer, folder, 128, "<pad>")  # truncated to 128 tokens, padded with <pad> = 3
    text = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=96, num_layers=3, num_heads=4,
                      intermediate_size=384, max_position_embeddings=128, pad_token_id=3)
    vision = replace(_vision(), conv_stem=tuple(conv_stem))
    return Expert(ExpertConfig(vision=vision, text=text, embed_dim=64, context_length=128), tokenizer,
                  read_preprocessor_config(PREPROCESSOR))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder to write the dataset to")
    for name, default in (("n_train", 4000), ("n_val", 200), ("n_test", 500), ("seed", 0), ("size", SIZE),
                          ("vocab_size", 2048)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--sheet", help="write a contact sheet of 16 studies captioned with their findings to this PNG")
    args = p.parse_args(argv)
    if not args.out and not args.sheet:
        p.error("nothing to do: give --out DIR and/or --sheet FILE.png")
    if args.out:
        start = time.perf_counter()
        annotation = generate(args.out, args.n_train, args.n_val, args.n_test, args.seed, args.size, args.vocab_size)
        studies = [e for split in annotation.values() for e in split]
        seconds, n = time.perf_counter() - start, max(1, len(studies))
        normal = sum(e["labels"].get("No Finding") == 1.0 for e in studies) / n
        distinct = len({e["report"] for e in studies}) / n
        print(f"{len(studies)} studies in {seconds:.1f} s ({len(studies) / seconds:.0f}/s) -> {args.out}: "
              f"No Finding {normal:.1%}, distinct reports {distinct:.1%}")
    if args.sheet:
        contact_sheet(args.sheet, args.seed, args.size)
        print(f"contact sheet -> {args.sheet}")


if __name__ == "__main__":
    main()
