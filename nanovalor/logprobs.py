"""Fused LM head -> token log-probs (+ entropy), without materialising the N x V logits.

GRPO needs log p(y_i | context) for every sampled completion token, three times per step (policy, old, reference).
The eager way (logits = H @ W^T, fp32 log_softmax, gather) holds N x V logits plus an fp32 copy and the saved
log-softmax: 25-35 GB at the Qwen2.5 vocabulary (V = 151,936) for N = 16k tokens. Here the vocabulary is walked in
tiles; per token we keep only the running max, the sum of exponentials, the target logit and (for the entropy) the
exp-weighted logit sum, and the backward recomputes each tile instead of storing it.

    from nanovalor.logprobs import token_logprobs
    logp = token_logprobs(hidden, lm_head.weight, targets, temperature=1.0)            # (N,) fp32
    logp, ent = token_logprobs(hidden, lm_head.weight, targets, entropy=True)          # + entropy (N,) fp32

Backends: "triton" (the kernel below; CUDA, or CPU tensors under TRITON_INTERPRET=1, which tests use), "torch"
(the same algorithm in plain torch, chunked over the vocabulary; the CPU path) and "auto" (Triton on CUDA, torch
otherwise). `token_logprobs_reference` is the plain materialise-everything version that tests compare against.

Math, with z = H W^T / T (N, V) and p = softmax(z):
    log p_y = z_y - LSE(z),  entropy = LSE(z) - E_p[z] = -sum_j p_j log p_j
    d log p_y / dz = onehot(y) - p,  d entropy / dz = -p * (z - E_p[z]) = -p * (log p + entropy)
and dH = (1/T) g_z W, dW = (1/T) g_z^T H. Fused fwd + bwd costs 8 N d V FLOP (the backward recomputes the logits).

Layout. Forward: one program per (vocabulary split, block of tokens) walks the split's tiles, z = H_blk W_tile^T
by tl.dot with fp32 accumulation, and keeps an online max / sum-exp; the (splits, N) partials are merged in torch
in a fixed order (deterministic, no atomics). Saved per token: the max m and log s (LSE = m + log s, kept apart
so that z - LSE stays exact under a large common logit offset) and the entropy. Backward: per vocabulary chunk, a
second kernel recomputes the tiles and writes g_z (N, chunk) in the input dtype; two cuBLAS GEMMs then give
dW[chunk] = g_z^T H and dH += g_z W[chunk] into an fp32 buffer (deterministic as well).

Benchmark: python bench/logprobs.py
"""
import math
import os

import torch
import triton
import triton.language as tl

# Tile sizes. On CUDA: Hopper-sized GEMM tiles (bf16 wgmma over 128 x 128 output tiles, K step 64, 4-stage
# pipeline); bench/logprobs.py sweeps a few alternatives on a GPU. On CPU the interpreter runs every program
# one after the other at ~1-3 ms per (program x loop step), so its tiles are the smallest tl.dot accepts and the
# grid stays tiny. PROGRAMS is the forward grid size we aim for: enough CTAs to fill 132 SMs several times over,
# few enough that each walks a long run of vocabulary tiles (W tiles shared in L2 by the row blocks next to it).
# G_ELEMENTS bounds the (N, vocab chunk) gradient buffer of the backward.
CUDA_TILES = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4, PROGRAMS=1024, G_ELEMENTS=2**27)
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=256, BLOCK_D=32, num_warps=1, num_stages=1, PROGRAMS=8, G_ELEMENTS=2**14)
# The torch path holds (N, chunk) fp32 logits at a time: 2**23 elements = 32 MB.
TORCH_CHUNK_ELEMENTS = 2**23


# ----------------------------------------------------------------------------------------------------------------
# The plain reference: materialise the logits, fp32 (or fp64) log-softmax, gather.

def token_logprobs_reference(hidden, weight, targets, temperature=1.0, entropy=False):
    """log p(targets) (N,) [and entropy (N,)] from full logits. fp32 math for half inputs, fp64 for fp64 inputs."""
    logits = hidden @ weight.T  # (N, V) in the input dtype, like the model's own lm_head
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, V)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Shared by both fused paths: merging per-vocabulary-split partial statistics, and the backward's chunk loop.

def _merge_splits(row_max, sum_exp, sum_exp_z, target_logit):
    """Combine (S, N) partials of S vocabulary splits into per-token results, in a fixed (deterministic) order.

    Split k saw max m_k, s_k = sum e^(z - m_k), b_k = sum e^(z - m_k) (z - m_k), and the target logit if the target
    lies in it (else 0). Everything stays relative to a max, so a large common logit offset cancels exactly.
    """
    m = row_max.amax(0)  # (N,); every split holds at least one real column, so every m_k is finite
    scale = torch.exp(row_max - m)  # (S, N)
    s = (sum_exp * scale).sum(0)
    log_s = s.log()
    logp = (target_logit.sum(0) - m) - log_s  # LSE = m + log s
    if sum_exp_z is None:
        return logp, None, m, log_s
    b = (scale * (sum_exp_z + sum_exp * (row_max - m))).sum(0)  # sum_j e^(z_j - m) (z_j - m)
    entropy = log_s - b / s  # LSE - E_p[z]
    return logp, entropy, m, log_s


def _backward(hidden, weight, chunk_width, grad_logits_chunk, need_hidden, need_weight):
    """dH, dW (None where not needed, e.g. a frozen LM head) from the logit gradient, one vocabulary chunk at a time.

    grad_logits_chunk(v0, width) returns g (N, width) in the input dtype (as eager autograd would round it).
    dW[chunk] = g^T H is one GEMM over all tokens (fp32 accumulation inside the GEMM, rounded once); dH sums
    over chunks in an fp32 buffer.
    """
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None  # (V, d)
    for v0 in range(0, weight.shape[0], chunk_width):
        width = min(chunk_width, weight.shape[0] - v0)
        g = grad_logits_chunk(v0, width)  # (N, width)
        w_chunk = weight[v0:v0 + width]
        if need_weight:
            torch.mm(g.T, hidden, out=grad_weight[v0:v0 + width])
        if not need_hidden:
            continue
        if g.dtype == torch.float32:
            grad_hidden.addmm_(g, w_chunk)
        elif g.is_cuda:  # cuBLAS takes the half operands as they are and returns fp32
            grad_hidden += torch.mm(g, w_chunk, out_dtype=torch.float32)
        else:
            grad_hidden.addmm_(g.float(), w_chunk.float())
    return None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight


# ----------------------------------------------------------------------------------------------------------------
# The torch path: the kernel's algorithm in plain torch, over vocabulary chunks of (N, chunk) fp32 logits.
# Written for few passes over each chunk (CPU time goes to memory traffic), mostly in place.

def _torch_chunk_width(n_tokens, vocab):
    return max(1, min(vocab, TORCH_CHUNK_ELEMENTS // max(n_tokens, 1)))


def _torch_shifted_logits(hidden, weight, v0, width, inv_temp, row_max=None):
    """z / T - m for columns [v0, v0 + width), (N, width) fp32, and m (N,): the row max unless given."""
    z = (hidden @ weight[v0:v0 + width].T).float()  # (N, width); in the input dtype first, like the reference
    if row_max is None:
        row_max = z.amax(1) * inv_temp  # T > 0, so the max commutes with the scaling (rounding is monotonic)
    return torch.add(-row_max[:, None], z, alpha=inv_temp, out=z), row_max


def _torch_forward(hidden, weight, targets, inv_temp, with_entropy):
    n, vocab = hidden.shape[0], weight.shape[0]
    width = _torch_chunk_width(n, vocab)
    parts = []
    for v0 in range(0, vocab, width):
        w = min(width, vocab - v0)
        z, m = _torch_shifted_logits(hidden, weight, v0, w, inv_temp)  # (N, w), (N,)
        local = targets - v0
        here = (local >= 0) & (local < w)
        target_logit = torch.where(here, z.gather(1, local.clamp(0, w - 1)[:, None]).squeeze(1) + m, 0.0)
        if with_entropy:
            e = torch.exp(z)
            parts.append((m, e.sum(1), torch.einsum("ij,ij->i", e, z), target_logit))
        else:
            parts.append((m, z.exp_().sum(1), None, target_logit))
    stacked = [torch.stack(p) if p[0] is not None else None for p in zip(*parts)]  # each (S, N)
    return _merge_splits(*stacked)


def _torch_grad_logits(hidden, weight, targets, saved, g_logp, g_ent, inv_temp, v0, width):
    """g = dL/d(H W^T) for vocabulary columns [v0, v0 + width): (N, width), in the input dtype.

    g = (1/T) [g_logp (onehot - p) - g_ent p (log p + H)] = -(1/T) p c + (1/T) g_logp onehot,
    with c = g_logp + g_ent (log p + H).
    """
    row_max, log_s, entropy = saved
    z, _ = _torch_shifted_logits(hidden, weight, v0, width, inv_temp, row_max)  # (N, width), z / T - m
    if g_ent is None:  # p = e^(z/T - m) / s: fold 1/s into the one multiply
        g = z.exp_().mul_((-inv_temp * g_logp / log_s.exp())[:, None])
    else:
        logp = z.sub_(log_s[:, None])  # m and log s subtracted apart, so z - LSE stays exact under big offsets
        p = torch.exp(logp)
        c = logp.add_(entropy[:, None]).mul_(g_ent[:, None])
        if g_logp is not None:
            c += g_logp[:, None]
        g = p.mul_(c).mul_(-inv_temp)
    if g_logp is not None:
        local = targets - v0
        here = ((local >= 0) & (local < width)).nonzero().squeeze(1)
        g[here, local[here]] += inv_temp * g_logp[here]
    return g.to(hidden.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The Triton kernels.

@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """H[rows] @ W[cols]^T for one (BLOCK_N, BLOCK_V) tile, fp32 accumulation over d in BLOCK_D steps."""
    ks = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h  # int64: row * stride overflows int32 on big inputs
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k_ok = (k0 + ks) < D
        h = tl.load(h_rows + (k0 + ks)[None, :], mask=(rows < N)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + ks)[None, :], mask=(cols < V)[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter cannot do bf16 arithmetic: upcast right after loading
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, max_ptr, sum_ptr, sum_z_ptr, target_logit_ptr,
                    N, V, D, stride_h, stride_w, inv_temp, tiles_per_split,
                    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_N tokens x one vocabulary split. Online max / sum-exp over the split's tiles."""
    split = tl.program_id(0)  # splits vary fastest: neighbouring programs share an H row block in L2
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = tl.load(targets_ptr + rows, mask=rows < N, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max; -inf is the identity of max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum e^(z - m)
    b = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum e^(z - m) (z - m), for the entropy
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the target's logit, if it lies in this split
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION) * inv_temp
        real = (cols < V)[None, :]
        z = tl.where(real, z, float("-inf"))  # vocabulary padding must not enter the partition function
        zt += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: column v0 < V is real
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)  # guards -inf - -inf before the first tile (s = 0)
        alpha = tl.exp(shift)
        z_rel = z - m_new[:, None]  # <= 0; -inf at padding
        e = tl.exp(z_rel)  # 0 at padding
        if WITH_ENTROPY:  # re-base the old sum to the new max: sum e'(z - m_new) = alpha (b + s (m - m_new))
            b = alpha * (b + s * shift) + tl.sum(e * tl.where(real, z_rel, 0.0), axis=1)  # not 0 * -inf = nan
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = split * N + rows  # partials are (S, N)
    tl.store(max_ptr + out, m, mask=rows < N)
    tl.store(sum_ptr + out, s, mask=rows < N)
    tl.store(target_logit_ptr + out, zt, mask=rows < N)
    if WITH_ENTROPY:
        tl.store(sum_z_ptr + out, b, mask=rows < N)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, targets_ptr, max_ptr, log_s_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, g_ptr,
                        N, V, D, stride_h, stride_w, stride_g, v_begin, width, inv_temp,
                        HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One program: recompute a (BLOCK_N, BLOCK_V) logit tile and write g = dL/d(H W^T) for it into g[:, chunk]."""
    local = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)  # column within the chunk
    cols = v_begin + local
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z = _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_h, stride_w,
                    BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION) * inv_temp
    m = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_ok, other=0.0)
    real = (cols < V)[None, :]
    # log p_j, with m and log s kept apart so that z - LSE stays exact under a large common offset; padding
    # columns get a finite stand-in and p = 0 (they are never stored, but inf or nan should not arise at all)
    logp = tl.where(real, (z - m[:, None]) - log_s[:, None], 0.0)
    p = tl.where(real, tl.exp(logp), 0.0)
    g = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        g += g_logp[:, None] * (tl.where(cols[None, :] == targets[:, None], 1.0, 0.0) - p)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        g -= g_ent[:, None] * p * (logp + entropy[:, None])  # p (z - E_p[z])
    g = g * inv_temp
    dst = g_ptr + rows.to(tl.int64)[:, None] * stride_g + local[None, :]
    tl.store(dst, g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & (local < width)[None, :])


def _tiles(device):
    return CUDA_TILES if device.type == "cuda" else INTERPRETER_TILES


def _kernel_args(hidden, tiles):
    compute_in_fp32 = hidden.device.type != "cuda" or hidden.dtype == torch.float32
    return dict(BLOCK_N=tiles["BLOCK_N"], BLOCK_V=tiles["BLOCK_V"], BLOCK_D=tiles["BLOCK_D"],
                UPCAST=hidden.device.type != "cuda", PRECISION="ieee" if compute_in_fp32 else "tf32",
                num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])


def _triton_forward(hidden, weight, targets, inv_temp, with_entropy):
    (n, d), vocab = hidden.shape, weight.shape[0]
    tiles = _tiles(hidden.device)
    row_blocks, vocab_tiles = triton.cdiv(n, tiles["BLOCK_N"]), triton.cdiv(vocab, tiles["BLOCK_V"])
    tiles_per_split = triton.cdiv(row_blocks * vocab_tiles, tiles["PROGRAMS"])
    n_splits = triton.cdiv(vocab_tiles, tiles_per_split)
    partials = torch.empty(4, n_splits, n, dtype=torch.float32, device=hidden.device)  # m, s, b, z_target
    _forward_kernel[(n_splits, row_blocks)](
        hidden, weight, targets, partials[0], partials[1], partials[2], partials[3],
        n, vocab, d, hidden.stride(0), weight.stride(0), inv_temp, tiles_per_split,
        WITH_ENTROPY=with_entropy, **_kernel_args(hidden, tiles))
    return _merge_splits(partials[0], partials[1], partials[2] if with_entropy else None, partials[3])


def _triton_grad_logits(hidden, weight, targets, saved, g_logp, g_ent, inv_temp, g_buffer, v0, width):
    (n, d), vocab = hidden.shape, weight.shape[0]
    tiles = _tiles(hidden.device)
    row_max, log_s, entropy = saved
    entropy = row_max if entropy is None else entropy  # an unread placeholder pointer when there is no entropy
    grid = (triton.cdiv(width, tiles["BLOCK_V"]), triton.cdiv(n, tiles["BLOCK_N"]))
    _grad_logits_kernel[grid](
        hidden, weight, targets, row_max, log_s, entropy,
        row_max if g_logp is None else g_logp, row_max if g_ent is None else g_ent, g_buffer,
        n, vocab, d, hidden.stride(0), weight.stride(0), g_buffer.stride(0), v0, width, inv_temp,
        HAS_G_LOGP=g_logp is not None, HAS_G_ENT=g_ent is not None, **_kernel_args(hidden, tiles))
    return g_buffer[:, :width]


def _triton_chunk_width(n_tokens, vocab, tiles):
    block = tiles["BLOCK_V"]
    width = tiles["G_ELEMENTS"] // max(n_tokens, 1) // block * block
    return min(max(block, width), triton.cdiv(vocab, block) * block)


# ----------------------------------------------------------------------------------------------------------------
# Autograd and the dispatcher.

class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, backend):
        forward = _triton_forward if backend == "triton" else _torch_forward
        logp, entropy, row_max, log_s = forward(hidden, weight, targets, inv_temp, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, row_max, log_s, entropy)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skip its term
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, targets, row_max, log_s, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if (g_logp is None and g_ent is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        # upstream gradients are often strided (masked views) or expanded (from .sum()): make them plain
        g_logp = None if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        saved = (row_max, log_s, entropy)
        n, vocab = hidden.shape[0], weight.shape[0]
        if ctx.backend == "triton":
            width = _triton_chunk_width(n, vocab, _tiles(hidden.device))
            g_buffer = torch.empty(n, width, dtype=hidden.dtype, device=hidden.device)  # reused by every chunk
            chunk = lambda v0, w: _triton_grad_logits(hidden, weight, targets, saved, g_logp, g_ent, ctx.inv_temp,
                                                      g_buffer, v0, w)
        else:
            width = _torch_chunk_width(n, vocab)
            chunk = lambda v0, w: _torch_grad_logits(hidden, weight, targets, saved, g_logp, g_ent, ctx.inv_temp,
                                                     v0, w)
        grad_hidden, grad_weight = _backward(hidden, weight, width, chunk, need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, entropy=False, backend="auto"):
    """log p(targets | hidden) under the LM head `weight` at `temperature`: (N,) fp32 [, entropy (N,) fp32].

    hidden (N, d) and weight (V, d) share a floating dtype (fp32, bf16 or fp16) and device; targets (N,) integer
    token ids in [0, V). Differentiable in hidden and weight, through the entropy too. backend: "triton", "torch"
    or "auto" (Triton on CUDA tensors, the chunked torch path otherwise).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"token_logprobs: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: expected hidden (N, d) and weight (V, d) with the same d, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"token_logprobs: expected integer targets of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"token_logprobs: hidden and weight must share one dtype of fp32, bf16, fp16, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"token_logprobs: hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device} and {targets.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"token_logprobs: temperature must be a finite number > 0, got {temperature!r}")
    lo, hi = torch.stack(torch.aminmax(targets)).tolist() if targets.numel() else (0, 0)  # one device sync
    if lo < 0 or hi >= weight.shape[0]:
        raise ValueError(f"token_logprobs: targets must lie in [0, {weight.shape[0]}), got values in [{lo}, {hi}]")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "torch"
    if backend == "triton" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("token_logprobs: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 in the "
                         "environment before triton is imported")
    if hidden.shape[0] == 0:  # nothing to fuse; the plain path handles the empty shapes
        return token_logprobs_reference(hidden, weight, targets, temperature, entropy)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    return _FusedLogprobs.apply(hidden, weight, targets.long().contiguous(), 1.0 / float(temperature),
                                bool(entropy), backend)
