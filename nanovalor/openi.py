"""Open-i chest X-ray reports (Indiana University collection, Demner-Fushman et al. 2016) with the NLM annotators'
MeSH tags: real radiologists' text on which the rule-based labeler (chexpert.py) is measured.

The reports ship inside the torchxrayvision 1.5.7 wheel (torchxrayvision/data/NLMCXR_reports.tgz; the reports are
licensed CC BY-NC-ND 4.0, so they are fetched into a cache at test / bench time and never committed). fetch_wheel
downloads the wheel with pip into $NANOVALOR_CACHE (else ~/.cache/nanovalor) and checks its sha256; read_dev reads
the archive straight from the wheel, without extracting anything to disk.

Only the development set is ever read: the odd-numbered ecgen-radiology/N.xml files, chosen by file name before
their content is parsed. The even-numbered files are held out for a final evaluation; nothing here opens them.
The labeler's rules were tuned on N = 1 (mod 4) and checked on N = 3 (mod 4) (read_dev's `residues`).

Reference labels (positive only: MeSH tags have no negatives) come from the `<major>` tags by prefix (TAG_MAP);
No Finding is positive when the tags are exactly ["normal"]. A study is kept when it has both FINDINGS and
IMPRESSION; its text is FINDINGS + " " + IMPRESSION. score() gives per-observation F1 with uncertain counted as
positive (as clinical_f1 counts it), macro over the observations with at least `min_support` positives.

    python bench/labeler_iu.py        # the per-observation table, error categories, reports/s
"""
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import NamedTuple

from nanovalor.chexpert import CHEXPERT_LABELS

WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"
WHEEL_SHA256 = "95f6c3475661f3515d4258deb0855bd5d1b1a56e0b65384251d3dd3fa61fac41"
ARCHIVE = "torchxrayvision/data/NLMCXR_reports.tgz"
_MEMBER = re.compile(r"ecgen-radiology/(\d+)\.xml")
_MIN_REPORTS = 3000  # the archive holds 3,955 reports; far fewer means it is not the archive we expect

# MeSH `<major>` tag prefixes -> CheXpert observation (the mapping of issue 11). Enlarged Cardiomediastinum and
# Pleural Other have no MeSH counterpart, so they have no reference positives and are never scored.
TAG_MAP = {
    "Cardiomegaly": ("Cardiomegaly", "Cardiac Shadow/enlarged"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Pneumothorax": ("Pneumothorax",),
    "Atelectasis": ("Pulmonary Atelectasis",),
    "Edema": ("Pulmonary Edema", "Edema", "Pulmonary Congestion"),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Lung Opacity": ("Opacity", "Infiltrate", "Airspace Disease"),
    "Lung Lesion": ("Nodule", "Mass", "Lung/nodule"),
    "Fracture": ("Fractures, Bone",),
    "Support Devices": ("Catheters, Indwelling", "Implanted Medical Device", "Tube, Inserted", "Medical Device"),
}


class OpenIUnavailable(RuntimeError):
    """The wheel could not be downloaded (no registry): tests skip on this, and on nothing else."""


class Study(NamedTuple):
    number: int  # N of ecgen-radiology/N.xml
    text: str  # FINDINGS + " " + IMPRESSION
    tags: tuple  # the `<major>` MeSH tags
    labels: tuple  # 14 reference labels in CHEXPERT_LABELS order: 1.0 positive, None otherwise


def cache_dir() -> Path:
    return Path(os.environ.get("NANOVALOR_CACHE") or Path.home() / ".cache" / "nanovalor")


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(cache=None) -> Path:
    """The torchxrayvision wheel in the cache folder, downloaded with `pip download` the first time.

    Raises OpenIUnavailable when pip cannot download it, ValueError when the file's sha256 is not the expected one.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    path = cache / WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # same filesystem: the final rename is atomic
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, "torchxrayvision==1.5.7"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if run.returncode != 0 or not got.exists():
                last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
                raise OpenIUnavailable(f"could not download {WHEEL} with pip (registry unreachable?): {last[0]}")
            got.replace(path)
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not the expected {WHEEL_SHA256}; delete it to download again")
    return path


def reference_labels(tags) -> tuple:
    """14 labels (1.0 or None) from a study's `<major>` MeSH tags, by the prefixes of TAG_MAP."""
    labels = [None] * len(CHEXPERT_LABELS)
    for observation, prefixes in TAG_MAP.items():
        if any(tag.startswith(prefixes) for tag in tags):
            labels[CHEXPERT_LABELS.index(observation)] = 1.0
    if list(tags) == ["normal"]:
        labels[CHEXPERT_LABELS.index("No Finding")] = 1.0
    return tuple(labels)


def _parse(xml_bytes, where):
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise ValueError(f"{where}: not valid XML ({e})") from None
    sections = {a.get("Label"): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
    tags = tuple((t.text or "").strip() for t in root.iter("major"))
    return sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), tags


def read_dev(wheel=None, residues=(1, 3)) -> list:
    """The development studies (odd N) with both FINDINGS and IMPRESSION, sorted by N. `residues` picks N mod 4:
    (1,) is the half the rules were tuned on, (3,) the half kept to check that they generalise."""
    if not set(residues) <= {1, 3}:
        raise ValueError(f"residues {residues}: only odd N (N mod 4 in 1, 3) form the development set")
    wheel = Path(wheel) if wheel is not None else fetch_wheel()
    where = f"{wheel}:{ARCHIVE}"
    studies, members = [], 0
    try:
        with zipfile.ZipFile(wheel) as z, z.open(ARCHIVE) as raw:
            with tarfile.open(fileobj=io.BufferedReader(raw), mode="r|gz") as tar:  # streamed, nothing on disk
                for member in tar:
                    m = _MEMBER.fullmatch(member.name)
                    if m is None or not member.isfile():
                        continue
                    members += 1
                    number = int(m.group(1))
                    if number % 4 not in residues:  # by file name, before the content is read
                        continue
                    findings, impression, tags = _parse(tar.extractfile(member).read(), f"{where}/{member.name}")
                    if findings and impression:
                        studies.append(Study(number, f"{findings} {impression}", tags, reference_labels(tags)))
    except (zipfile.BadZipFile, KeyError, tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{where}: not the expected Open-i archive ({type(e).__name__}: {e})") from None
    if members < _MIN_REPORTS or not studies:
        raise ValueError(f"{where}: expected ~3,955 ecgen-radiology/N.xml reports, found {members}")
    return sorted(studies)


def score(predicted, reference, min_support=15, scored=None) -> dict:
    """Per-observation support, tp, fp, fn, precision, recall, F1 of predicted label tuples against reference ones,
    uncertain (-1.0) counted as positive, blank and negative as absent; `macro` is the mean F1 over the
    observations with at least min_support reference positives, or over `scored` when given (a part of the data
    scored on the same observations as the whole)."""
    rows = {}
    for k, name in enumerate(CHEXPERT_LABELS):
        pred = [p[k] in (1.0, -1.0) for p in predicted]
        ref = [r[k] in (1.0, -1.0) for r in reference]
        tp = sum(p and r for p, r in zip(pred, ref))
        fp, fn = sum(pred) - tp, sum(ref) - tp
        rows[name] = dict(support=sum(ref), tp=tp, fp=fp, fn=fn, precision=tp / max(tp + fp, 1),
                          recall=tp / max(tp + fn, 1), f1=2 * tp / max(2 * tp + fp + fn, 1))
    if scored is None:
        scored = [name for name, r in rows.items() if r["support"] >= min_support]
    macro = sum(rows[name]["f1"] for name in scored) / max(len(scored), 1)
    return dict(per_label=rows, scored=scored, macro=macro)
