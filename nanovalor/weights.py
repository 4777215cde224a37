"""Checkpoint files: a hub id or a local folder, single or sharded weights, checked loading into a model.

    folder = resolve("llava-hf/llava-1.5-7b-hf")           # or a local folder, as it is
    tensors, unmapped = read_checkpoint(folder, rules)       # {our name: tensor}, renamed by (prefix, ours) rules
    load_checked(model_on_meta, tensors, folder, unmapped)   # one error listing every missing / extra / mis-shaped

The policy (policy.py), the expert (expert.py) and CheXbert (bert.py) read their weights through these functions.
Safetensors are read as they are; a pickle (`pytorch_model.bin`, open_clip's `.bin`, `chexbert.pth`) only through
`torch.load(weights_only=True)`: tensors and plain containers, never code. Nothing here runs remote code.
"""
import json
import os
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


def read_weights(path, key="state_dict"):
    """The {name: tensor} dict of one weights file: safetensors, or a pickle read only through
    torch.load(weights_only=True) (tensors and plain containers, never code), unwrapped from {key: state dict}."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # a truncated or foreign file: safetensors' message does not name it
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused or unreadable (torch.load with weights_only=True): {e}") from None
    sd = sd.get(key, sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with {key!r}), got {type(sd).__name__}")
    return sd


def read_checkpoint(folder, rules, names=WEIGHT_FILES, skip=()):
    """{our name: tensor} for the checkpoint in `folder` (checkpoint_files(folder, names)), renamed with `rules`,
    a list of (checkpoint prefix, our prefix or None = drop); a rule ("", "") keeps the rest as they are. Names
    no rule maps are returned as the second value; names containing any of `skip` (buffers old saves kept) are
    dropped."""
    tensors, unexpected = {}, []
    for f in checkpoint_files(folder, names):
        for name, t in read_weights(f).items():
            ours = next((new + name[len(old):] if new is not None else "" for old, new in rules
                         if name.startswith(old)), None)
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
