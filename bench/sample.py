"""Sampler throughput: our KV-cached group sampler vs the naive sampler vs transformers' generate, same weights.

    python bench/sample.py                 # CPU, ~20M-parameter LLaVA, 4 images x G=8, 128 new tokens
    python bench/sample.py --threads 2 --repeats 3

A random tiny LLaVA (CLIP ViT 224/16 + Llama decoder, vocab 8000) is built with transformers, saved, and loaded
by nanovalor.policy.load, so all three samplers run the same weights. EOS is disabled so that every sampler
generates exactly the same number of tokens; sampling at T = 1 without top-k / top-p. The naive sampler
recomputes the whole sequence each step, so it runs fewer new tokens (--naive-tokens; its rate only falls with
length, which favours it). Timings are the best of --repeats interleaved runs, side by side in one process. One
thread by default: on a shared machine, multi-threaded GEMMs stall at their barriers whenever a neighbour holds
a core (a decode step measured 20x slower with 2 threads than with 1 under load).
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

torch.manual_seed(0)
VOCAB, IMAGE = 8000, 7999
config = LlavaConfig(
    vision_config=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                                   image_size=224, patch_size=16).to_dict(),
    text_config=LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                            num_attention_heads=6, num_key_value_heads=2).to_dict(),
    image_token_index=IMAGE, image_seq_length=196)
hf = LlavaForConditionalGeneration(config).eval()
hf.generation_config.eos_token_id = None
with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    ours = load(folder)
n_params = sum(p.numel() for p in ours.parameters())

B, G, N = args.images, args.group, args.new_tokens
text = torch.randint(0, IMAGE, (B, 24))
input_ids = torch.cat([text[:, :4], torch.full((B, 196), IMAGE), text[:, 4:]], 1)  # (B, 220)
pixel_values = torch.randn(B, 3, 224, 224)


def run_ours():
    return sample(ours, input_ids, pixel_values=pixel_values, group_size=G, max_new_tokens=N, eos_token_id=[],
                  generator=torch.Generator().manual_seed(0)).tokens


def run_naive():
    return sample_naive(ours, input_ids, pixel_values=pixel_values, group_size=G, max_new_tokens=args.naive_tokens,
                        eos_token_id=[], generator=torch.Generator().manual_seed(0)).tokens


def run_hf():
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=G,
                          max_new_tokens=N, pad_token_id=0)
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

print(f"# {n_params / 1e6:.1f}M parameters, {B} images x G={G}, prompt {input_ids.shape[1]} tokens "
      f"(196 image), {torch.get_num_threads()} threads, torch {torch.__version__}")
print("| sampler | new tokens | seconds | tokens/s | ours is x faster |")
print("|---|---|---|---|---|")
for name, n_new, seconds, rate in rows:
    print(f"| {name} | {n_new} | {seconds:.2f} | {rate:.0f} | {rows[0][3] / rate:.1f} |")
