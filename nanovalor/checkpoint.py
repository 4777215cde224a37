"""Model folders and files written atomically, and training checkpoints: the model in its own layout plus the
training state beside it.

    out/<stage>/checkpoint/
        config.json, model.safetensors, tokenizer.json, ...   the model (policy: the HF llava layout, which
                                                              transformers, sample.py and eval.py load; expert: ours)
        trainer_state.pt     step, optimizer, LR schedule position, data position, torch RNG state, counters
        train_config.json    the resolved train.py Config

A folder (a checkpoint, policy.save, expert.save) is filled in a temporary folder next to it, which then replaces the
old one by renames; a file (write_atomic) likewise: a reader never sees half of one, and after a crash recover()
puts the newest complete copy in place and removes the leftovers. lock() keeps a second run out of a folder;
open_log() appends a run's metrics.jsonl.
trainer_state.pt holds only tensors, numbers, strings, lists and dicts, so it loads with
torch.load(weights_only=True).
"""
import json
import os
import shutil
from pathlib import Path

import torch

STATE = "trainer_state.pt"


def _temporary(path, kind="tmp"):  # a new name next to `path`, hidden, unique across processes and calls
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}")


def atomic_folder(folder, fill):
    """fill(path) writes into the empty folder `path`, which then takes the place of `folder`.

    The steps, each a rename (atomic on one file system): fill `.<name>.tmp-*`; rename it `.<name>.ready-*` (a ready
    folder is complete by construction); move the old `<name>` aside to `.<name>.old-*`; rename the ready folder
    `<name>`; remove the old one. A failure in fill removes the temporary and leaves the old folder as it was. A
    crash (kill -9, power loss) between the renames leaves hidden folders that recover() resolves: the newest
    ready one wins over the old one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(folder)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ready = tmp.rename(_temporary(folder, "ready"))
    old = folder.rename(_temporary(folder, "old")) if folder.exists() else None
    ready.rename(folder)  # the new folder is complete before the old one goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover(folder):
    """Finish or undo a save that a crash interrupted (see atomic_folder), then remove every leftover of earlier
    saves of `folder`. A ready copy is complete and newer than `folder` (it exists only between its own renames), so
    the newest one becomes `folder`; failing that, a missing `folder` comes back from its old copy. A tmp copy may
    be half written and is only removed. Returns what it did, for the log ("" when there was nothing to do). Call it
    only where no other process is saving `folder` (train.py holds the run's lock)."""
    folder = Path(folder)
    if not folder.parent.exists():
        return ""
    leftovers = {kind: sorted((p for p in folder.parent.glob(f".{folder.name}.{kind}-*") if p.is_dir()),
                              key=lambda p: p.stat().st_mtime) for kind in ("tmp", "ready", "old")}
    done = ""
    if leftovers["ready"]:
        if folder.exists():
            leftovers["old"].append(folder.rename(_temporary(folder, "old")))
        leftovers["ready"].pop().rename(folder)
        done = f"{folder}: completed a save that a crash interrupted"
    elif not folder.exists() and leftovers["old"]:
        leftovers["old"].pop().rename(folder)
        done = f"{folder}: restored the previous copy that a crash left aside"
    stale = [p for paths in leftovers.values() for p in paths]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        done = (done + "; " if done else f"{folder}: ") + f"removed {len(stale)} leftover folder(s) of crashed saves"
    return done


def lock(folder):
    """An exclusive lock on `folder` (created if needed) for as long as the process lives: a second train.py
    writing into the same --out stops at once with one line instead of overwriting the first one's checkpoints
    and interleaving its metrics. The operating system drops the lock when the process ends, however it ends."""
    import fcntl
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SystemExit(f"error: {folder} is in use by another train.py run (its .lock is held); wait for it to "
                         "finish or give another --out") from None
    return handle  # keep it referenced: closing it releases the lock


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


def save_training(folder, model, wrapped, optimizer, state, config, write_model, empty_like, fsdp=False, rank=0):
    """train.py's checkpoint: the model through write_model(model, path) (policy.save) and, in trainer_state.pt,
    `state` plus the optimizer's state. Under FSDP every rank takes part in gathering the full weights and optimizer
    state to rank 0's CPU, which writes them from empty_like(model) (policy.empty_like: an unsharded copy of its
    structure on the meta device) filled with them."""
    import torch.distributed as dist
    target = model
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        weights, state["optimizer"] = get_state_dict(wrapped, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if rank == 0:
            target = empty_like(model)
            prefix = next(name for name, module in wrapped.named_modules() if module is model)  # "policy"
            target.load_state_dict({k.removeprefix(prefix + "."): v for k, v in weights.items()}, assign=True)
    else:
        state["optimizer"] = optimizer.state_dict()
    if rank == 0:
        save(folder, lambda path: write_model(target, path), state, config)
    if dist.is_initialized():
        dist.barrier()


def restore_training(folder, wrapped, optimizer, fsdp=False):
    """The state saved by save_training, with the optimizer's restored (under FSDP each rank takes its shard)."""
    state = load_state(folder)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    return state


def open_log(run, config, wandb_project=""):
    """log(record): one JSON line per call in the run folder's metrics.jsonl, and to wandb when a project is named
    (and wandb installed; config: the run's settings, for wandb)."""
    file, wandb = open(Path(run) / "metrics.jsonl", "a"), None
    if wandb_project:
        try:
            import wandb
            wandb.init(project=wandb_project, config=config)
        except ImportError:
            print("wandb is not installed: logging to metrics.jsonl only")

    def log(record):
        file.write(json.dumps(record) + "\n")
        file.flush()
        if wandb:
            wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    return log


def check_resume(folder, config, free=()):
    """A resumed run must be the same run: the config it is given (a dict) against train_config.json in the
    checkpoint `folder`; one error listing every difference except in the keys `free` (logging, evaluation)."""
    path = Path(folder) / "train_config.json"
    if not path.exists():
        raise SystemExit(f"error: --resume: {path} is missing (no checkpoint of this stage to continue)")
    saved = json.loads(path.read_text())
    changed = {k: (saved[k], v) for k, v in config.items() if k in saved and saved[k] != v and k not in free}
    if changed:
        what = ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise SystemExit(f"error: --resume would change the run saved in {path}: {what}. Resume with the same "
                         "settings, or start a new run in another --out")


def load_state(folder):
    """The training state saved beside a checkpoint (a clear error if there is none)."""
    path = Path(folder) / STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no training state to resume from (expected a checkpoint written by train.py)")
    return torch.load(path, map_location="cpu", weights_only=True)
