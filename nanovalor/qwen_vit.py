"""Qwen2.5-VL's vision side, owned by us: the ViT over native-resolution patches and the patch merger that maps it
into the decoder (Qwen2.5-VL technical report, arXiv 2502.13923, section 2.1; Qwen2-VL, arXiv 2409.12191).

    tower, merger = QwenVisionTower(cfg), PatchMerger(cfg, d_text)
    features = tower(pixels)        # data.PackedImages of patch rows -> (N, d) in the same row order
    tokens = merger(features)       # (N / 4, d_text): one decoder token per 2 x 2 patches

Each image keeps its own size (data.qwen_patches cuts it into 14-px patches, each frame pair flattened: a still
image is its own frame twice). The ViT: a Conv3d patch embedding (one matmul per patch), 2-D rotary positions
(row and column, each on half of the rotated dimensions), pre-RMSNorm blocks with SwiGLU MLPs, attention inside
windows of 112 x 112 px in most blocks and over the whole image in the blocks the config names
(fullatt_block_indexes); no attention across images. The merger (RMSNorm, concatenation of 2 x 2 neighbours,
Linear-GELU-Linear) is the "vision projection module" VALOR's stage 2 trains: qwen_vl.py names it
multi_modal_projector, as LLaVA's projector is named, so `--train multi_modal_projector` means it.
Parameter names mirror transformers' (visual.*, visual.merger.*); qwen_vl.py maps them.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovalor.decoder import MLP, DecoderConfig, RMSNorm, apply_rope


@dataclass
class QwenVisionConfig:  # Qwen2.5-VL-3B / 7B's values; field names are transformers' vision_config
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2  # the merger joins m x m patches into one decoder token
    window_size: int = 112  # px: window attention over (window_size / patch_size)^2 patches
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # blocks that attend over the whole image
    out_hidden_size: int = 2048  # the decoder's width
    in_channels: int = 3
    rope_theta: float = 10000.0
    tokens_per_second: int = 2  # video time positions only (not implemented here); kept so that save() writes it


# -----------------------------------------------------------------------------
# Where each patch is and which patches attend to each other: computed from the grids, shared by all blocks.

def patch_positions(grid, merge):
    """(row, column) of every patch (N, 2) in the order of data.qwen_patches' rows: merge block by merge block."""
    out = []
    for t, h, w in grid.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        out.append(torch.stack([blocks(rows), blocks(cols)], -1).repeat(t, 1))
    return torch.cat(out)


def vision_rope(positions, head_dim, theta):
    """positions (N, 2) -> cos, sin (N, head_dim) fp32: 2-D RoPE, head_dim / 4 frequencies turned by the row, the
    same frequencies turned by the column, in the half-split layout that decoder.apply_rope rotates."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, device=positions.device).float() / (head_dim // 2))
    angles = (positions[..., None].float() * inv_freq).flatten(1)  # (N, head_dim / 2): rows' angles, then columns'
    emb = torch.cat([angles, angles], -1)
    return emb.cos(), emb.sin()


def window_order(grid, merge, window):
    """The merge blocks of all images window by window: windows of window x window blocks, row-major over an
    image (those at the right and bottom edges may be smaller), blocks row-major inside a window. Returns the block
    order (n_blocks,) and each window's block count."""
    order, sizes, offset = [], [], 0
    for t, h, w in grid.tolist():
        blocks = torch.arange(t * (h // merge) * (w // merge)).view(t, h // merge, w // merge)
        for frame in blocks:
            for top in range(0, frame.shape[0], window):
                for left in range(0, frame.shape[1], window):
                    inside = frame[top:top + window, left:left + window].flatten()
                    order.append(inside + offset)
                    sizes.append(len(inside))
        offset += blocks.numel()
    return torch.cat(order), sizes


class Segments:
    """Attention inside consecutive segments of a sequence (one image, or one window), none across them. Segments
    of equal length are stacked and attend in one SDPA call: a few calls per block, whatever the image count."""

    def __init__(self, lengths, device):
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()
        by_length = {}
        for start, n in zip(starts, lengths):
            by_length.setdefault(n, []).append(start)
        self.groups = [((torch.tensor(s)[:, None] + torch.arange(n)).flatten().to(device), len(s), n)
                       for n, s in by_length.items()]  # (positions (m * n,), m segments, of n each)
        self.inverse = torch.argsort(torch.cat([index for index, _, _ in self.groups]))  # back to sequence order

    def attend(self, q, k, v):  # (H, N, hd) each -> (H, N, hd)
        H, _, hd = q.shape
        out = []
        for index, m, n in self.groups:
            stack = lambda x: x[:, index].view(H, m, n, hd).transpose(0, 1)  # (m, H, n, hd)
            y = F.scaled_dot_product_attention(stack(q), stack(k), stack(v))  # bidirectional
            out.append(y.transpose(0, 1).reshape(H, m * n, hd))
        return torch.cat(out, 1)[:, self.inverse.to(q.device)]


# -----------------------------------------------------------------------------
# The ViT

class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, segments):  # x (N, d); cos, sin (N, hd) fp32
        N, d = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).permute(1, 2, 0, 3)  # each (H, N, hd)
        # rotated in fp32 and cast back, as transformers does (bf16 parity)
        q, k = (apply_rope(t[None].float(), cos[None], sin[None])[0].to(t.dtype) for t in (q, k))
        return self.proj(segments.attend(q, k, v).transpose(0, 1).reshape(N, d))


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)  # eps fixed in Qwen2.5-VL (not in its config)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        # the decoder's SwiGLU, with biases
        self.mlp = MLP(DecoderConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                                     mlp_bias=True))

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, kernel, bias=False)  # transformers' shape

    def forward(self, x):  # (N, C * T * p * p) -> (N, d): a Conv3d whose stride is its kernel is one matmul a patch
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.flatten(1))


class QwenVisionTower(nn.Module):
    """PackedImages of patch rows -> (N, hidden_size) features, rows in the input's order (merge blocks
    consecutive, ready for the merger). Internally the rows are reordered window by window, so that a window's
    patches are consecutive, and put back at the end."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))

    def forward(self, images):
        cfg, grid, device = self.cfg, images.grid, images.data.device
        m = cfg.spatial_merge_size
        blocks, sizes = window_order(grid, m, cfg.window_size // m // cfg.patch_size)
        perm = (blocks[:, None] * m * m + torch.arange(m * m)).flatten().to(device)  # patch rows, window by window
        cos, sin = vision_rope(patch_positions(grid, m).to(device)[perm], cfg.hidden_size // cfg.num_heads,
                               cfg.rope_theta)
        windows = Segments([n * m * m for n in sizes], device)
        # the reordering stays inside each image, so every image (each frame of it) is still one segment
        whole = Segments((grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist(), device)
        x = self.patch_embed(images.data)[perm]  # (N, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, whole if i in cfg.fullatt_block_indexes else windows)
        return x[torch.argsort(perm)]


class PatchMerger(nn.Module):
    """The projector (transformers' visual.merger): RMSNorm, then each merge block's m x m patch features
    (consecutive rows) concatenated and mapped by Linear-GELU-Linear to the decoder's width."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, cfg.out_hidden_size))  # exact GELU; names mlp.0, mlp.2

    def forward(self, x):  # (N, d) -> (N / m^2, d_text)
        return self.mlp(self.ln_q(x).view(-1, self.width))
