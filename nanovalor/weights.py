"""Checkpoint files: a hub id or a local folder, single or sharded weights, checked loading into a model.

    folder = resolve("llava-hf/llava-1.5-7b-hf")           # or a local folder, as it is
    index, unmapped = checkpoint_index(folder, rules)        # {our name: Entry}: names, dtypes, shapes; no data read
    materialise(model_on_meta, index, folder, unmapped)      # each tensor read straight into its parameter
    tensors, unmapped = read_checkpoint(folder, rules)       # or eagerly: {our name: tensor} (the small experts)
    load_checked(model_on_meta, tensors, folder, unmapped)   # one error listing every missing / extra / mis-shaped

The policy (policy.py) loads lazily: the model is built on the meta device (under FSDP2 already sharded), then
`materialise` reads each tensor from its file into the parameter's storage, cast to the parameter's dtype as it is
copied, and only the rows this rank holds (FSDP2 shards dim 0). A safetensors file is read with plain `readinto` at
the offsets of its header: no second copy of the weights, no memory map whose pages would count towards the
process's memory until the file is closed. Peak host memory of a CPU load is therefore the model itself plus at most
CHUNK bytes (a conversion buffer, used only when the file's dtype or device differs from the parameter's): 1x the
checkpoint for bf16 -> bf16, 2x for bf16 -> fp32, 1/world per rank under FSDP2 (bench/load.py measures it).
A weights-only pickle (`pytorch_model.bin`) is memory-mapped (`torch.load(mmap=True, weights_only=True)`, the zip
format torch has written since 1.6): pages are read as rows are copied, and released when the file is done; an old
non-zip pickle cannot be mapped and is read whole, one file at a time.

The expert (expert.py) and CheXbert (bert.py) read their small checkpoints eagerly (read_checkpoint, load_checked).
Pickles are read only through `torch.load(weights_only=True)`: tensors and plain containers, never code. Nothing
here runs remote code.
"""
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # a checkpoint's weights, the preferred format first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "processor_config.json")  # what a policy's save() copies from the checkpoint it came from


def token_ids(x):  # eos_token_id in a config may be an int, a list or absent
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def read_json(path):
    """The parsed JSON file at `path`, or one error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e


def check_fields(d, where, ints=(), numbers=()):
    """A config dict's fields that are present must have their type: `ints` positive integers, `numbers` real
    numbers (a bool or a string such as "4096" is refused). One error naming the file and the field."""
    for key in ints:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{where}: {key} = {v!r}: expected a positive integer")
    for key in numbers:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: {key} = {v!r}: expected a number")


def read_tokenizer(path):
    """A tokenizers.Tokenizer from a tokenizer.json file, or one error naming it (a corrupt or foreign file makes
    the tokenizers library raise with a message that names neither)."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


def resolve(path_or_repo_id, allow_patterns=None):
    """A local folder as it is; "owner/name" through huggingface_hub.snapshot_download (HF_HUB_OFFLINE=1: the
    local cache only), fetching the files that match allow_patterns. By default a model's: pytorch_model*.bin are
    fetched only when a repo has no safetensors."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_repo_id)
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"{name}: no such model folder (and not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download
    try:
        if allow_patterns is not None:
            return Path(snapshot_download(name, allow_patterns=allow_patterns))
        folder = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # hub errors come in many types; the message is what helps
        raise FileNotFoundError(f"{name}: not a local folder, and fetching it from the hub failed "
                                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}") from e
    return folder


def checkpoint_files(folder, names=WEIGHT_FILES):
    """The weight files of the checkpoint in `folder`: the shards a `<name>.index.json` lists, or else the first
    of `names` (one file each, the preferred format first) that is there."""
    for index in (f"{name}.index.json" for name in names):
        if (folder / index).exists():
            files = sorted(set(read_json(folder / index).get("weight_map", {}).values()))
            missing = [f for f in files if not (folder / f).exists()]
            if not files or missing:
                raise FileNotFoundError(f"{folder / index}: names shard(s) {missing or 'none'} that are not there")
            return [folder / f for f in files]
    for single in names:
        if (folder / single).exists():
            return [folder / single]
    raise FileNotFoundError(f"{folder}: no {', '.join(names)} or *.index.json")


def read_weights(path, key="state_dict", mmap=False):
    """The {name: tensor} dict of one weights file: safetensors, or a pickle read only through
    torch.load(weights_only=True) (tensors and plain containers, never code), unwrapped from {key: state dict}.
    mmap=True: a zip-format pickle's tensors stay in the file's memory map until used (an old non-zip one is read)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # a truncated or foreign file: safetensors' message does not name it
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        raise ValueError(f"{path}: refused or unreadable (torch.load with weights_only=True): {e}") from None
    sd = sd.get(key, sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with {key!r}), got {type(sd).__name__}")
    return sd


def rename(name, rules):
    """Our name for checkpoint name `name` by the first (checkpoint prefix, our prefix) rule it starts with: "" if
    that rule's our prefix is None (a tensor we do not use), None if no rule matches."""
    return next((new + name[len(old):] if new is not None else "" for old, new in rules if name.startswith(old)), None)


def read_checkpoint(folder, rules, names=WEIGHT_FILES, skip=()):
    """{our name: tensor} for the checkpoint in `folder` (checkpoint_files(folder, names)), renamed with `rules`,
    a list of (checkpoint prefix, our prefix or None = drop); a rule ("", "") keeps the rest as they are. Names
    no rule maps are returned as the second value; names containing any of `skip` (buffers old saves kept) are
    dropped."""
    tensors, unexpected = {}, []
    for f in checkpoint_files(folder, names):
        for name, t in read_weights(f).items():
            ours = rename(name, rules)
            if ours is None:
                unexpected.append(name)
            elif ours and not any(s in ours for s in skip):
                tensors[ours] = t
    return tensors, unexpected


def load_checked(model, tensors, where, unexpected=(), tied=(), cast=lambda t: t):
    """Load {our name: tensor} into `model`, built on the meta device, with assign=True: each tensor is popped from
    `tensors` as it is cast (cast(t): to the run's dtype and device), so the weights are never held twice.
    `unexpected`: checkpoint names no rule mapped; `tied`: names that share another parameter (a tied lm_head),
    neither expected nor loaded (the caller ties them again). Every missing, unexpected or mis-shaped tensor is in
    one error that names `where`."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
    for k in tied:
        tensors.pop(k, None)  # some saves write the tied copy too
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = list(unexpected) + sorted(tensors.keys() - expected.keys())
    shapes = [f"{k}: {tuple(t.shape)} in the checkpoint, {tuple(expected[k])} in the model"
              for k, t in sorted(tensors.items()) if k in expected and t.shape != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the checkpoint does not match its config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {shapes}")
    model.load_state_dict({k: cast(tensors.pop(k)) for k in list(tensors)}, strict=False, assign=True)


# -----------------------------------------------------------------------------
# Lazy loading: an index of the checkpoint from its headers, then each tensor read straight into its parameter.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
CHUNK = 16 << 20  # bytes read per call; also the largest conversion buffer (a file dtype or device that differs)


@dataclass
class Entry:
    """One tensor of a checkpoint file, without its data."""
    file: Path
    name: str  # its name in the file
    dtype: torch.dtype
    shape: tuple
    offset: int | None  # safetensors: where its bytes start in the file; None: a pickle's tensor


def safetensors_header(path):
    """{name: Entry} of a .safetensors file, from its header alone. The format: an 8-byte little-endian header size,
    the JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}, then the tensors'
    bytes, C order, little-endian, each at 8 + header size + begin."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{name}: {end - begin} bytes for shape {shape} of {info['dtype']}")
            entries[name] = Entry(path, name, dtype, shape, 8 + size + begin)
        need = 8 + size + max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"),
                              default=0)
        if path.stat().st_size < need:  # an interrupted download or copy: found before any tensor is read
            raise ValueError(f"truncated, {path.stat().st_size} bytes where its header needs {need}")
        return entries
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def checkpoint_index(folder, rules, names=WEIGHT_FILES, skip=()):
    """read_checkpoint without the data: ({our name: Entry}, [checkpoint names no rule maps]). Safetensors are
    indexed from their headers; a pickle is memory-mapped to list its tensors (an old non-zip one is read whole,
    then dropped)."""
    index, unexpected = {}, []
    for f in checkpoint_files(folder, names):
        if f.suffix == ".safetensors":
            entries = safetensors_header(f)
        else:
            entries = {k: Entry(f, k, t.dtype, tuple(t.shape), None) for k, t in read_weights(f, mmap=True).items()}
        for name, entry in entries.items():
            ours = rename(name, rules)
            if ours is None:
                unexpected.append(name)
            elif ours and not any(s in ours for s in skip):
                index[ours] = entry
    return index, unexpected


def local_rows(t):
    """(the part of tensor `t` this process holds, the first row of the full tensor it holds): `t` itself from row 0,
    or for a DTensor that FSDP2 sharded (Shard(0) on a 1-D mesh) this rank's rows as torch.chunk splits dim 0:
    ceil(n / world) rows per rank, the last ranks fewer or none. The part shares storage with `t`."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(t, DTensor):
        return t.detach(), 0
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"a parameter sharded as {t.placements} over a {t.device_mesh.ndim}-D mesh: only FSDP2's "
                         "Shard(0) over one mesh dimension is loaded")
    local, n = t.to_local().detach(), t.shape[0]
    start = min(t.device_mesh.get_local_rank() * -(-n // t.device_mesh.size()), n)
    if local.shape[0] != min(-(-n // t.device_mesh.size()), n - start):
        raise ValueError(f"a local shard of {local.shape[0]} rows at row {start} of {n}: not torch.chunk's split")
    return local, start


def _read_rows(f, entry, start, out, scratch):
    """Read rows [start, start + len(out)) of safetensors `entry` from the open file `f` into `out`, CHUNK bytes at a
    time: straight into `out` when it is a CPU tensor of the file's dtype, else through `scratch` (a uint8 buffer,
    reused for every tensor of the load: a fresh one per chunk would leave freed blocks in the allocator's heap) and
    a cast. Returns the scratch buffer, grown if a row did not fit."""
    flat = out.reshape(1) if out.ndim == 0 else out  # a 0-d tensor: one row
    row = math.prod(entry.shape[1:]) * entry.dtype.itemsize
    step = max(1, CHUNK // max(row, 1))
    for i in range(0, len(flat), step):
        part = flat[i:i + step]
        direct = part.dtype == entry.dtype and part.device.type == "cpu" and part.is_contiguous()
        n = part.numel() * entry.dtype.itemsize
        if not direct and len(scratch) < n:
            scratch = torch.empty(n, dtype=torch.uint8)
        raw = part.reshape(-1).view(torch.uint8) if direct else scratch[:n]
        view = memoryview(raw.numpy())
        f.seek(entry.offset + (start + i) * row)
        done = 0
        while done < n:  # a read may return less than asked (Linux: at most ~2 GiB per call)
            got = f.readinto(view[done:])
            if not got:
                raise ValueError(f"{entry.file}: {entry.name} ends early (a truncated file)")
            done += got
        if not direct:
            part.copy_(raw.view(entry.dtype).view(part.shape))
    return scratch


def to_empty(model, device):
    """model.to_empty(device=device), keeping parameters that were one object (a tied lm_head) one object:
    to_empty replaces a plain parameter module by module (an FSDP2 DTensor keeps its identity)."""
    places = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            places.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)
    for (module, name), *others in places.values():
        for other, other_name in others:
            setattr(other, other_name, getattr(module, name))


@torch.no_grad()
def materialise(model, index, where, unexpected=(), tied=(), only=None, device=None):
    """Read the checkpoint of `index` ({our name: Entry}, from checkpoint_index) into `model`'s parameters and
    buffers, each cast to the model's dtype as it is copied. A model on the meta device (FSDP2-sharded or not) is
    first given uninitialised storage on `device` (to_empty: under FSDP2 only this rank's shards); a materialised
    model is overwritten in place. Under FSDP2 each rank reads only the rows it holds. `tied`: names that share
    another parameter (not read); `only`: the names to read (default: all the model's but `tied`); every missing,
    unexpected or mis-shaped tensor is in one error that names `where`, raised before anything is read."""
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in tied}
    wanted = set(targets) if only is None else set(only)
    missing = sorted(wanted - index.keys())
    unexpected = list(unexpected) + sorted(index.keys() - targets.keys() - set(tied))
    shapes = [f"{k}: {e.shape} in the checkpoint, {tuple(targets[k].shape)} in the model"
              for k, e in sorted(index.items()) if k in targets and e.shape != tuple(targets[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the checkpoint does not match its config: missing {missing}, "
                         f"unexpected {unexpected}, wrong shape {shapes}")
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian and this machine is not: not implemented")
    if any(t.is_meta for t in targets.values()):
        to_empty(model, device or "cpu")
        targets = {k: v for k, v in model.state_dict(keep_vars=True).items() if k in wanted}
    files, scratch = {}, torch.empty(0, dtype=torch.uint8)
    for name in sorted(wanted):  # file by file: a pickle's map is released once its tensors are read
        files.setdefault(index[name].file, []).append(name)
    for file, names in files.items():
        if file.suffix == ".safetensors":
            with open(file, "rb", buffering=0) as f:
                for name in names:
                    out, start = local_rows(targets[name])
                    scratch = _read_rows(f, index[name], start, out, scratch)
        else:
            tensors = read_weights(file, mmap=True)
            for name in names:
                out, start = local_rows(targets[name])
                out.copy_(tensors[index[name].name][start:start + len(out)] if out.ndim else tensors[index[name].name])
            del tensors
