"""Model folders and files written atomically, and training checkpoints: the model in its own layout plus the
training state beside it.

    out/<stage>/checkpoint/
        config.json, model.safetensors, tokenizer.json, ...   the model (policy: the HF llava layout, which
                                                              transformers, sample.py and eval.py load; expert: ours)
        trainer_state.pt     step, optimizer, LR schedule position, data position, torch RNG state, counters
        train_config.json    the resolved train.py Config

A folder (a checkpoint, policy.save, expert.save) is filled in a temporary folder next to it, which then replaces the
old one by renames; a file (write_atomic) likewise: a reader (or a crash) never sees half of one. trainer_state.pt
holds only tensors, numbers, strings, lists and dicts, so it loads with torch.load(weights_only=True).
"""
import json
import os
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.pt"


def _temporary(path):  # a new name next to `path`, hidden, unique across processes and calls
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def atomic_folder(folder, fill):
    """fill(path) writes into the empty folder `path`, which then takes the place of `folder`: the old folder is
    removed only once the new one is in place, and the temporary one is removed if fill fails."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(folder)
    old = tmp.with_name(tmp.name + ".old")
    tmp.mkdir()
    try:
        fill(tmp)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)  # the new folder is complete before the old one goes
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path, data):
    """Write `data` (str, written as UTF-8 with its newlines as they are, or bytes) to `path` through a temporary
    file next to it, then rename: never a half-written file, and no temporary file left if the write fails."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "xb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(folder, write_model, state, config):
    """write_model(path) writes the model into the empty folder `path` (policy.save / expert.save); state: a dict
    for trainer_state.pt; config: a JSON-able dict for train_config.json."""
    def fill(path):
        write_model(path)
        torch.save(state, path / STATE)
        (path / "train_config.json").write_text(json.dumps(config, indent=2))

    atomic_folder(folder, fill)


def load_state(folder):
    """The training state saved beside a checkpoint (a clear error if there is none)."""
    path = Path(folder) / STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training state to resume from (expected a checkpoint written by train.py)")
    return torch.load(path, map_location="cpu", weights_only=True)
