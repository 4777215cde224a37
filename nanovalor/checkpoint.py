"""Training checkpoints: the model in its own layout plus the training state beside it, written atomically.

    out/<stage>/checkpoint/
        config.json, model.safetensors, tokenizer.json, ...   the model (policy: the HF llava layout, which
                                                              transformers, sample.py and eval.py load; expert: ours)
        trainer_state.pt     step, optimizer, LR schedule position, data position, torch RNG state, counters
        train_config.json    the resolved train.py Config

Everything is written into a temporary folder next to the checkpoint, which then replaces the old one by renames:
a reader (or a crash) never sees half a checkpoint. trainer_state.pt holds only tensors, numbers, strings, lists
and dicts, so it loads with torch.load(weights_only=True).
"""
import json
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.pt"


def save(folder, write_model, state, config):
    """write_model(path) writes the model into a new folder `path` (policy.save / expert.save); state: a dict for
    trainer_state.pt; config: a JSON-able dict for train_config.json."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(tmp)
    torch.save(state, tmp / STATE)
    (tmp / "train_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)  # the new checkpoint is complete before the old one goes
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder):
    """The training state saved beside a checkpoint (a clear error if there is none)."""
    path = Path(folder) / STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training state to resume from (expected a checkpoint written by train.py)")
    return torch.load(path, map_location="cpu", weights_only=True)
