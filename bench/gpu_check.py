"""The model-level half of the GPU check (bench/gpu_check.sh runs it): a random ~0.5B LLaVA under bf16 autocast.

    python bench/gpu_check.py            # CUDA: the log-prob checks, then a few GRPO steps with a tokens/s line
    python bench/gpu_check.py --tiny     # the same code on a tiny model, on CPU if there is no GPU (plumbing)

The model is built from a config, no download: a CLIP-B/14-sized ViT on 336-px images (576 image tokens, 12
layers, width 768) and a Qwen2-0.5B-shaped decoder (24 layers, width 896, GQA 14/2, vocabulary 151,936, tied
embeddings), 0.58B parameters in fp32 master weights; the ViT is frozen, as in VALOR's text stage. Everything runs
as train.py runs it on CUDA: bf16 autocast for sampling and training, the fused Triton log-prob op.

1. Log-prob agreement under bf16 autocast (before any update), max |difference| over the completion tokens:
   - head: the sampler's recorded log-probs against the fused op applied to the very hidden states the sampler
     produced (the LM head and the draw stay fp32 under autocast: expect ~1e-6, a bf16 head gives ~1e-2);
   - sampler vs trainer: against grpo.CompletionLogprobs' teacher-forced pass, under bf16 autocast (the cached
     decode and the full pass round differently in bf16: this is GRPO's first-pass |ratio - 1|) and in fp32.
2. GRPO steps: sample (B studies x G, --new-tokens each, no EOS so every step does the same work), random
   rewards, grpo.update (reference pass + clipped k3-KL loss + backward, micro-batches of --micro groups), AdamW.
   Prints per step: seconds for sampling and for the update, completion tokens/s (sampling alone and the whole
   step), the update's ratio_err, peak GPU memory.
Lines that start with "RESULT" are what gpu_check.sh puts in its table.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovalor import dist, grpo  # noqa: E402
from nanovalor.decoder import DecoderConfig  # noqa: E402
from nanovalor.generate import sample  # noqa: E402
from nanovalor.logprobs import token_logprobs  # noqa: E402
from nanovalor.policy import Llava, LlavaConfig  # noqa: E402
from nanovalor.vit import VisionConfig  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="a tiny model (on CPU without a GPU): checks the plumbing")
parser.add_argument("--studies", type=int, default=8, help="B studies per GRPO step")
parser.add_argument("--group", type=int, default=8)
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--micro", type=int, default=4, help="groups per training micro-batch")
parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps, after one warm-up step")
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cpu" and not args.tiny:
    raise SystemExit("no CUDA device: run with --tiny to check the plumbing on CPU")
if device.type == "cpu":
    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other (and on a busy machine, a lot)
if args.tiny:
    vision = VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2)
    text = DecoderConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_embeddings=True)
    args.studies, args.group, args.new_tokens, args.micro, args.steps = 2, 4, 8, 1, 2
else:
    vision = VisionConfig(image_size=336, patch_size=14, hidden_size=768, intermediate_size=3072, num_layers=12,
                          num_heads=12)
    text = DecoderConfig(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True,
                         tie_embeddings=True)
cfg = LlavaConfig(vision=vision, text=text, image_token_id=text.vocab_size, eos_token_id=[])  # no EOS
torch.manual_seed(0)
with torch.device(device):
    model = Llava(cfg)  # fp32 master weights, transformers' initialisation
model.vision_tower.requires_grad_(False)
B, G, N, P = args.studies, args.group, args.new_tokens, cfg.num_image_tokens
n_params = sum(p.numel() for p in model.parameters())
gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
print(f"# {gpu}, torch {torch.__version__}: a random LLaVA of {n_params / 1e6:.1f}M parameters ({P} image tokens, "
      f"vocabulary {text.vocab_size}); GRPO steps under bf16 autocast as train.py runs them on CUDA", flush=True)


def batch(n_studies, seed):
    """n_studies prompts "<4 text> <image> <26 text>" (n, P + 30) and random images (n, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    text_ids = torch.randint(0, text.vocab_size, (n_studies, 30), generator=g)
    ids = torch.cat([text_ids[:, :4], torch.full((n_studies, P), cfg.image_token_id), text_ids[:, 4:]], 1)
    pixels = torch.randn(n_studies, 3, vision.image_size, vision.image_size, generator=g)
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- 1. log-prob agreement
ids, mask, pixels = batch(2, seed=1)
bf16 = lambda: torch.autocast(device.type, torch.bfloat16)  # also on CPU (--tiny), where train.py uses none
gens = lambda: [torch.Generator(device).manual_seed(s) for s in range(2)]
seen = []  # the final-norm hidden states the sampler's LM head reads: (B, D) after the prefill, (B*G, D) per step
hook = model.language_model.norm.register_forward_hook(lambda m, i, out: seen.append(out[:, -1]))
try:
    with torch.no_grad(), bf16():
        out = sample(model, ids, mask, pixels, group_size=4, max_new_tokens=32, generator=gens())
finally:
    hook.remove()
hidden = torch.stack([seen[0].repeat_interleave(4, 0)] + seen[1:], 1)  # (B*G, N, D), as the sampler saw them
eos = list(range(text.vocab_size // 16))  # a random model draws one of these ~every 16 tokens: rows stop early
with torch.no_grad():
    weight = model.lm_head.weight.to(hidden.dtype)
    head = token_logprobs(hidden.flatten(0, 1), weight, out.tokens.flatten()).view_as(out.logprobs)
    scorer = grpo.CompletionLogprobs(model)
    with bf16():
        bf16_out = sample(model, ids, mask, pixels, group_size=4, max_new_tokens=32, eos_token_id=eos, generator=gens())
        trainer_bf16 = scorer(pixels, ids, mask, bf16_out.tokens, bf16_out.mask, 4)
    fp32_out = sample(model, ids, mask, pixels, group_size=4, max_new_tokens=32, eos_token_id=eos, generator=gens())
    trainer_fp32 = scorer(pixels, ids, mask, fp32_out.tokens, fp32_out.mask, 4)
errors = {"head, bf16 autocast": (out.logprobs, head, out.mask),
          "sampler vs trainer, bf16 autocast": (bf16_out.logprobs, trainer_bf16, bf16_out.mask),
          "sampler vs trainer, fp32": (fp32_out.logprobs, trainer_fp32, fp32_out.mask)}
for name, (recorded, recomputed, valid) in errors.items():
    err = (recorded - recomputed)[valid].abs()
    print(f"RESULT log-prob error | {name} | max abs {float(err.max()):.2e}, mean {float(err.mean()):.2e} over "
          f"{int(valid.sum())} tokens (rows of {valid.sum(1).min()}-{valid.sum(1).max()} tokens)", flush=True)
del out, bf16_out, fp32_out, hidden, seen, head, trainer_bf16, trainer_fp32

# ----------------------------------------------------------------------------- 2. GRPO steps
reference = grpo.reference_model(model)  # a copy of what trains (projector, decoder, head), swapped in for KL
scorer = grpo.CompletionLogprobs(model)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
print(f"# GRPO: {B} studies x G={G}, {P + 30} prompt + {N} new tokens, micro-batches of {args.micro} groups, "
      f"{sum(p.numel() for p in params) / 1e6:.1f}M trained parameters")
print("| step | sample s | update s | sample tokens/s | step tokens/s | ratio_err | peak GB |")
print("|---|---|---|---|---|---|---|")
rows = []
for step in range(1 + args.steps):  # step 0 warms up (Triton compiles, cuBLAS picks its kernels)
    ids, mask, pixels = batch(B, seed=100 + step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.no_grad(), dist.autocast(device):
        model.eval()
        samples = sample(model, ids, mask, pixels, group_size=G, max_new_tokens=N,
                         generator=[torch.Generator(device).manual_seed(1000 * step + b) for b in range(B)])
        model.train()
    sync()
    t1 = time.perf_counter()
    rewards = torch.rand(B, G, generator=torch.Generator().manual_seed(step))  # random: speed is what we measure
    advantages = grpo.group_advantages(rewards, "zscore").flatten().to(device)
    rollout = grpo.Rollout(pixels, ids, mask, samples.tokens, samples.mask, samples.logprobs, G)
    ref_logp = grpo.reference_logprobs(reference, scorer, rollout, args.micro)
    stats, finite = grpo.update(scorer, rollout, advantages, args.micro, ref_logp=ref_logp, beta=0.01, eps_low=0.2,
                                eps_high=0.2, agg="token_mean")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    t2 = time.perf_counter()
    n_tokens = int(samples.mask.sum())
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    row = (t1 - t0, t2 - t1, n_tokens / (t1 - t0), n_tokens / (t2 - t0), stats["ratio_err"], peak)
    print(f"| {step}{' (warm-up)' if step == 0 else ''} | " + " | ".join(f"{x:.3g}" for x in row) + " |",
          flush=True)
    if not finite:
        raise SystemExit(f"step {step}: the loss is not finite")
    if step:
        rows.append(row)
best = min(rows, key=lambda r: r[0] + r[1])
print(f"RESULT GRPO step | {n_params / 1e6:.1f}M LLaVA, bf16 autocast, {B}x{G} rollouts of {N} tokens after "
      f"{P + 30}-token prompts | {best[3]:.0f} completion tokens/s per step ({best[0] + best[1]:.2f} s: sample "
      f"{best[0]:.2f} s at {best[2]:.0f} tokens/s, update {best[1]:.2f} s), ratio_err {max(r[4] for r in rows):.2e}, "
      f"peak {max(r[5] for r in rows):.1f} GB")
