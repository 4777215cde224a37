"""LoRA (Hu et al., arXiv 2106.09685) on the policy's decoder: each targeted nn.Linear y = W x + b becomes

    y = W x + b + (alpha / r) * B (A x),    A (r, in) random, B (out, r) zero at the start, W and b frozen,

so training starts from the base model exactly and moves only r * (in + out) numbers per layer.

    n_trained = apply(model, rank=16, alpha=32, targets="q_proj,v_proj")  # a Llava, on the meta device or not
    with disabled(model): ...              # the base model: GRPO's KL reference, at no memory cost
    merged_state_dict(model)               # W + (alpha / r) B A in W's place: what policy.save writes (HF layout)
    save_adapter(model, folder); load_adapter(model, folder)   # adapter.safetensors + adapter_config.json

Only the decoder's linear layers are wrapped (the ViT has q_proj too: never touched). Parameter names keep the base
layer's (`...q_proj.weight`) and add `...q_proj.lora_A` / `lora_B`, so checkpoints map onto the wrapped model as they
are. Under FSDP2 the adapters are sharded like every parameter of their decoder block; `reset` writes the rows a rank
holds of the same random A on every rank.
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovalor.weights import local_rows, materialise, safetensors_header

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # every linear layer of a Llama decoder block
ADAPTER, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, seed):
        super().__init__()
        self.weight = base.weight  # the base layer's own parameters (no copy), frozen by apply()
        self.register_parameter("bias", base.bias)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **like))
        self.rank, self.alpha, self.scale, self.seed, self.enabled = rank, alpha, alpha / rank, seed, True
        if not self.weight.is_meta:
            self.reset()

    @torch.no_grad()
    def reset(self):
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's own initialisation, as PEFT uses) drawn from this adapter's
        seed, B = 0: the same A on every rank, each writing the rows it holds."""
        generator = torch.Generator().manual_seed(self.seed)
        a = (torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(
            self.lora_A.shape[1])
        local, start = local_rows(self.lora_A)
        local.copy_(a[start:start + len(local)])
        local_rows(self.lora_B)[0].zero_()

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)


def adapters(model):
    """{module name: LoRALinear} of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model):
    """The parameter names of the adapters (A and B of every LoRALinear)."""
    return [f"{name}.{p}" for name in adapters(model) for p in ("lora_A", "lora_B")]


def apply(model, rank, alpha, targets=TARGETS, seed=0):
    """Wrap the linear layers of `model.language_model` named in `targets` (comma-separated) in LoRALinear of this
    rank and alpha, freeze the whole decoder but the adapters, and return the number of parameters that train.
    rank 0: nothing changes. On the meta device the adapters wait for reset() (policy.fill calls it)."""
    if not rank:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder, names = model.language_model, {t.strip() for t in targets.split(",") if t.strip()}
    if adapters(model):
        raise ValueError("LoRA is already applied to this model")
    if not any(p.requires_grad for p in decoder.parameters()):
        raise ValueError("--lora_rank: the adapters train the decoder, but what trains (--train) leaves "
                         "language_model frozen")
    found = [(parent, child) for parent in decoder.modules() for child, m in parent.named_children()
             if child in names and isinstance(m, nn.Linear)]
    unknown = names - {child for _, child in found}
    if unknown:
        raise ValueError(f"--lora_targets: no linear layer of the decoder is named {sorted(unknown)}")
    decoder.requires_grad_(False)
    for i, (parent, child) in enumerate(found):
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, seed * 1_000_003 + i))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def settings(model):
    """(rank, alpha, targets) of the LoRA applied to `model`, for apply() on another copy of it; None if none."""
    found = adapters(model)
    if not found:
        return None
    first = next(iter(found.values()))
    return first.rank, first.alpha, ",".join(sorted({name.rsplit(".", 1)[-1] for name in found}))


@contextmanager
def disabled(model):
    """The base model inside the block: every adapter off (GRPO's reference policy when LoRA trains the decoder)."""
    found = list(adapters(model).values())
    for m in found:
        m.enabled = False
    try:
        yield
    finally:
        for m in found:
            m.enabled = True


@torch.no_grad()
def merged_state_dict(model):
    """model.state_dict() with each adapter folded into its base weight, W + (alpha / r) B A (computed in fp32,
    stored in W's dtype), and the adapters dropped: the plain model that transformers and policy.load read."""
    state = model.state_dict()
    for name, m in adapters(model).items():
        a, b, w = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B"), state[f"{name}.weight"]
        state[f"{name}.weight"] = (w.float() + m.scale * (b.float() @ a.float())).to(w.dtype)
    return state


def save_adapter(model, folder):
    """Write the adapters alone: adapter.safetensors (our parameter names) and adapter_config.json."""
    from safetensors.torch import save_file
    rank, alpha, targets = settings(model)
    state = model.state_dict()
    save_file({k: state[k].detach().cpu().contiguous() for k in adapter_names(model)}, Path(folder) / ADAPTER)
    (Path(folder) / ADAPTER_CONFIG).write_text(json.dumps(dict(rank=rank, alpha=alpha, targets=targets), indent=2))


def load_adapter(model, folder):
    """Read adapter.safetensors (save_adapter's) into the adapters of `model` (the same rank and targets; under
    FSDP2 each rank its rows)."""
    path = Path(folder) / ADAPTER
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (a LoRA run writes it beside the merged model)")
    materialise(model, safetensors_header(path), path, only=adapter_names(model))
