"""The text decoder of the policy: Llama / Mistral / Qwen2 (RMSNorm, RoPE, grouped-query attention, SwiGLU, optional
q/k/v bias and tied embeddings), with parameter names that mirror transformers', and its config read from an HF
config.json. policy.py puts a ViT and a projector in front of it (LLaVA).

Attention takes a cache object (generate.py's KVCache, GroupKVCache, SharedPrefix) that stores keys and values and
attends over all it holds; the decoder takes precomputed RoPE (cos, sin), so a model may number its positions as it
needs (padding skipped, or several axes).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanovalor.weights import check_fields

# Llama / Mistral / Qwen2 differ only in the fields below. Parameter names mirror transformers'.

@dataclass
class DecoderConfig:
    model_type: str = "llama"  # llama | mistral | qwen2 (decides the default chat format)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32  # < num_heads: grouped-query attention
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama's attention_bias=True biases o_proj too
    mlp_bias: bool = False
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight (small Qwen2s)
    sliding_window: int | None = None  # Mistral: attention window, not implemented; longer sequences are refused


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):  # normalise in fp32, scale in the input dtype (as transformers does, for bf16 parity)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions (B, T) -> cos, sin (B, T, head_dim), computed in fp32 (RoFormer, arXiv 2104.09864; the
    half-split layout of Llama's HF weights). Recomputed per call: no buffer that a dtype cast could round."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, hd), cos/sin (B, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv, self.hd = layer_idx, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
        else:  # sampling: a generate.py cache stores k, v and attends over all it holds
            y = cache.attend(self.layer_idx, q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU (Shazeer, arXiv 2002.05202)
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False  # recompute each block in backward: activation memory O(1 block)

    def forward(self, x, cos, sin, mask, cache=None):  # (B, T, D) -> (B, T, D), before the final norm
        for block in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        return x


def init_weights(model):
    """transformers' initialisation, for a model trained from scratch: weights of linear, embedding and convolution
    layers N(0, 0.02), their biases 0. A tied LM head is tied again by the caller."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def attention_mask_4d(attention_mask, t, past, device):
    """Boolean SDPA mask (B, 1, t, past + t) for t new queries after `past` cached columns: causal, padding keys
    hidden. attention_mask (B, past + t), 1 = real token, padding anywhere (left, right, between prompt and
    completion). Every query may see itself, so a padding row never has all keys masked (softmax of only -inf is
    NaN). None means "plain causal" and lets SDPA take its fast path."""
    S = past + t
    if attention_mask is None:
        return None if past == 0 or t == 1 else torch.ones(t, S, dtype=torch.bool, device=device).tril(past)[None, None]
    cols = torch.arange(S, device=device)
    rows = past + torch.arange(t, device=device)[:, None]  # the column of each query
    mask = (cols <= rows) & attention_mask.bool()[:, None, :]  # (B, t, S)
    return (mask | (cols == rows))[:, None]


# -----------------------------------------------------------------------------
# transformers' config.json of a Llama / Mistral / Qwen2 decoder

_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
DECODER_DEFAULTS = {  # transformers' defaults for the fields a config may omit (old llava-hf configs omit most)
    "llama": dict(vocab_size=32000, intermediate_size=11008, **_7B),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, sliding_window=4096, **_7B),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, **_7B),
}
BIASES = {"llama": None, "mistral": (False, False), "qwen2": (True, False)}  # (q/k/v, o); Llama: attention_bias


def decoder_config_from_hf(d, where):
    kind = d.get("model_type", "llama")
    if kind not in DECODER_DEFAULTS:
        raise ValueError(f"{where}: model_type {kind!r}: expected one of {sorted(DECODER_DEFAULTS)}")
    check_fields(d, where, ints=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim"),
                 numbers=("rms_norm_eps", "rope_theta"))
    d = {**DECODER_DEFAULTS[kind], **d}
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {d['hidden_act']!r}: expected 'silu' (SwiGLU)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: RoPE scaling {rope} is not implemented: expected rope_type 'default'")
    heads = d["num_attention_heads"]
    qkv_bias, o_bias = BIASES[kind] or (d.get("attention_bias", False),) * 2
    window = d.get("sliding_window") if kind == "mistral" or d.get("use_sliding_window") else None
    return DecoderConfig(
        model_type=kind, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope.get("rope_theta") or d.get("rope_theta") or 1e4,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=d.get("mlp_bias") or False,
        tie_embeddings=d.get("tie_word_embeddings") or False, sliding_window=window)
