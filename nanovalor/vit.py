"""The project's one ViT: the policy's vision tower (policy.py) and the expert's image tower (expert.py).

One class covers OpenAI CLIP, SigLIP and timm's ViT as BiomedCLIP uses it; parameter names mirror transformers'
CLIPVisionModel, so HF checkpoints map onto it one to one.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovalor.weights import check_fields

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": F.gelu,  # timm ViT (BiomedCLIP)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP
}


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"
    class_token: bool = True  # CLIP and timm prepend a learned class token; SigLIP does not
    pre_norm: bool = True  # CLIP applies a LayerNorm to the embeddings before the first block
    patch_bias: bool = False  # the patch-embedding convolution has a bias in SigLIP and timm
    num_channels: int = 3
    # Early convolutions (Xiao et al. 2021, arXiv 2106.14881): channel widths of 3x3 stride-2 convolutions, each with
    # BatchNorm and GELU, run before the patch embedding, which then takes patches of patch_size / 2^len pixels of
    # their output. () = the plain ViT that CLIP, SigLIP and timm checkpoints hold.
    conv_stem: tuple = ()

    def __post_init__(self):
        self.conv_stem = tuple(self.conv_stem)  # a JSON list once saved

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


def vision_config_from_hf(d, where="vision_config"):
    """VisionConfig from an HF `vision_config` dict (CLIPVisionConfig or SiglipVisionConfig)."""
    kind = d.get("model_type")
    if kind not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"{where}: model_type {kind!r}: expected 'clip_vision_model' or 'siglip_vision_model'")
    check_fields(d, where, ints=("image_size", "patch_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads", "num_channels"),
                 numbers=("layer_norm_eps",))
    clip = kind == "clip_vision_model"
    act = d.get("hidden_act", "quick_gelu" if clip else "gelu_pytorch_tanh")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {act!r}: expected one of {sorted(ACTIVATIONS)}")
    return VisionConfig(
        image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32 if clip else 16),
        hidden_size=d.get("hidden_size", 768), intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5 if clip else 1e-6), act=act,
        class_token=clip, pre_norm=clip, patch_bias=not clip, num_channels=d.get("num_channels", 3))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths, layers = (cfg.num_channels, *cfg.conv_stem), []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.GELU()]
        self.stem = nn.Sequential(*layers) if layers else None
        step = cfg.patch_size >> len(cfg.conv_stem)  # the patch size left after the stem's strides
        if step << len(cfg.conv_stem) != cfg.patch_size or step < 1:
            raise ValueError(f"VisionConfig: patch_size {cfg.patch_size} is not divisible by the conv stem's stride "
                             f"2^{len(cfg.conv_stem)}")
        self.patch_embedding = nn.Conv2d(widths[-1], cfg.hidden_size, step, step, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.class_token else None
        self.position_embedding = nn.Embedding(cfg.num_patches + cfg.class_token, cfg.hidden_size)

    def forward(self, pixel_values):
        x = pixel_values.to(self.patch_embedding.weight.dtype)  # (B, C, H, W)
        if self.stem is not None:
            x = self.stem(x)  # (B, C', H / 2^k, W / 2^k)
        x = self.patch_embedding(x)  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1+P, D)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None):  # mask: (B or 1, 1, T, T) bool, True = may attend; None = bidirectional
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, mask=None):  # the CLIP text tower (expert.py) runs these blocks under a causal mask
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):  # a module of its own only so that parameter names read encoder.layers.N
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    """Pre-LN ViT. `forward` gives the hidden states after a chosen block (what LLaVA feeds its projector);
    `pooled` gives the post-LayerNorm class token (what a CLIP-style expert projects)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # "pre_layrnorm" (sic) is transformers' name
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_norm else None
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values, feature_layer=-1):
        """pixel_values (B, C, S, S) -> (B, T, D) hidden states, T = P (+1 with a class token).
        feature_layer counts like HF's `hidden_states` tuple: 0 = embeddings, k = after block k, -1 = last block,
        -2 = second to last (LLaVA). Blocks after the chosen one are not run."""
        n = len(self.encoder.layers)
        stop = feature_layer % (n + 1)
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x

    def pooled(self, pixel_values):
        """(B, C, S, S) -> (B, D): the class token after the last block and the final LayerNorm."""
        if not self.cfg.class_token:
            raise ValueError("pooled(): this ViT has no class token (SigLIP pools with an attention head instead)")
        return self.post_layernorm(self(pixel_values)[:, 0])
