"""Sampler throughput on Qwen2.5-VL: our KV-cached group sampler vs the naive sampler vs transformers' generate,
same weights (bench/sample.py's measurement, for the other model family).

    python bench/sample_qwen_vl.py                 # CPU, ~20M-parameter Qwen2.5-VL, 4 images x G=8, 128 new tokens
    python bench/sample_qwen_vl.py --threads 2 --repeats 3

A random tiny Qwen2.5-VL (4-block ViT of width 192 with 112-px windows and two full-attention blocks, an 8-layer
decoder of width 384 with M-RoPE, vocab 8000) is built with transformers, saved, and loaded by nanovalor.policy.load,
so all three samplers run the same weights. Each prompt holds one 392 x 392 image: 28 x 28 patches, 196 image
tokens after the 2 x 2 merge (as many as bench/sample.py's LLaVA). transformers gets mm_token_type_ids, without
which its Qwen2.5-VL silently falls back on 1-D positions. EOS is disabled so that every sampler generates exactly
the same number of tokens; sampling at T = 1 without top-k / top-p. The naive sampler recomputes the whole
sequence each step, so it runs fewer new tokens (--naive-tokens). Timings are the best of --repeats interleaved
runs, side by side in one process, one thread by default (see bench/sample.py on a shared machine).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanovalor.data import PackedImages  # noqa: E402
from nanovalor.generate import sample, sample_naive  # noqa: E402
from nanovalor.policy import load  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=4)
parser.add_argument("--group", type=int, default=8)
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--naive-tokens", type=int, default=8)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

torch.manual_seed(0)
VOCAB, IMAGE, START, END = 8000, 7999, 7997, 7998
config = Qwen2_5_VLConfig(
    vision_config=dict(depth=4, hidden_size=192, intermediate_size=512, num_heads=3, window_size=112,
                       fullatt_block_indexes=[1, 3], out_hidden_size=384),
    text_config=dict(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=6, num_key_value_heads=2, bos_token_id=0, eos_token_id=1,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[8, 12, 12])),
    image_token_id=IMAGE, video_token_id=7996, vision_start_token_id=START, vision_end_token_id=END)
hf = Qwen2_5_VLForConditionalGeneration(config).eval()
hf.generation_config.eos_token_id = None
with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    ours = load(folder)
n_params = sum(p.numel() for p in ours.parameters())

B, G, N, side = args.images, args.group, args.new_tokens, 28  # patches per image side: 392 px
text = torch.randint(0, 7990, (B, 24))
n_image = side * side // 4  # tokens per image after the merge
input_ids = torch.cat([text[:, :4], torch.full((B, 1), START), torch.full((B, n_image), IMAGE),
                       torch.full((B, 1), END), text[:, 4:]], 1)  # (B, 222)
images = PackedImages(torch.randn(B * side * side, 3 * 2 * 14 * 14), torch.tensor([[1, side, side]] * B))


def run_ours():
    return sample(ours, input_ids, pixel_values=images, group_size=G, max_new_tokens=N, eos_token_id=[],
                  generator=torch.Generator().manual_seed(0)).tokens


def run_naive():
    return sample_naive(ours, input_ids, pixel_values=images, group_size=G, max_new_tokens=args.naive_tokens,
                        eos_token_id=[], generator=torch.Generator().manual_seed(0)).tokens


def run_hf():
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=images.data,
                          image_grid_thw=images.grid, mm_token_type_ids=(input_ids == IMAGE).long(), do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G, max_new_tokens=N,
                          pad_token_id=0)
    return out[:, input_ids.shape[1]:]


samplers = [("nanovalor sample (KV cache, shared group prefix)", run_ours, N),
            ("transformers generate (num_return_sequences)", run_hf, N),
            ("nanovalor sample_naive (full recompute)", run_naive, args.naive_tokens)]
best = {}
for _ in range(args.repeats):  # interleaved, so that a noisy neighbour slows all three alike
    for name, fn, n_new in samplers:
        t0 = time.perf_counter()
        tokens = fn()
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        assert tokens.shape == (B * G, n_new), (name, tokens.shape)
rows = [(name, n_new, best[name], B * G * n_new / best[name]) for name, _, n_new in samplers]

print(f"# Qwen2.5-VL, {n_params / 1e6:.1f}M parameters, {B} images x G={G}, prompt {input_ids.shape[1]} tokens "
      f"({n_image} image), {torch.get_num_threads()} threads, torch {torch.__version__}")
print("| sampler | new tokens | seconds | tokens/s | ours is x faster |")
print("|---|---|---|---|---|")
for name, n_new, seconds, rate in rows:
    print(f"| {name} | {n_new} | {seconds:.2f} | {rate:.0f} | {rows[0][3] / rate:.1f} |")
