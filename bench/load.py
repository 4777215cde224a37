"""Peak host memory of loading a policy: policy.load on one process, and policy.build + FSDP2 + policy.fill on each
rank under torchrun, as multiples of the checkpoint's size on disk.

    python bench/load.py                 # ~1B parameters, 2.1 GB of bf16 in 5 shards, in a temporary folder
    python bench/load.py --layers=2      # a quick look (~0.3B)

It writes a synthetic *sharded* bf16 LLaVA checkpoint in the llava-hf layout (config.json, model-0000N-of-0000M
.safetensors and model.safetensors.index.json; random tensors written shard by shard with safetensors, no
transformers), then runs each load in a fresh process and reads its peak resident set size (VmHWM: anonymous memory
and mapped file pages, the page cache excluded), minus the peak after its imports (and, under torchrun, after the
process group started). So "1.00x" means: the process grew by exactly the checkpoint's size. The page cache the
kernel keeps of the files is not the process's and is not counted. Benchmarks print; they do not assert.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss():  # bytes: the process's high-water mark of resident memory
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def llava_hf_config(layers):
    """A ~1B LLaVA (18 layers) in transformers' llava config.json layout: a CLIP ViT-B/16 and a Llama decoder with
    Mistral-7B's proportions at half its width."""
    text = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
    vision = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=16)
    return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", image_token_index=32000,
                text_config=text, vision_config=vision, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu")


def write_checkpoint(folder, config, shard_bytes=450 << 20, seed=0):
    """A random bf16 checkpoint of `config` (llava-hf layout) in `folder`, in shards of about shard_bytes, with its
    index; one shard in memory at a time. Returns the bytes of tensor data written."""
    import torch
    from safetensors.torch import save_file

    from nanovalor.policy import LLAVA_HF_NAMES, Llava, config_from_hf
    folder = Path(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llava(config_from_hf(config, "bench")).state_dict().items()}
    names = {}
    for name in shapes:  # our name -> the llava-hf checkpoint's
        old, new = next((o, n) for o, n in LLAVA_HF_NAMES if name.startswith(o))
        names[name] = new + name[len(old):]
    g = torch.Generator().manual_seed(seed)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        if size and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {names[k]: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in group}
        save_file(shard, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({names[k]: file for k in group})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return total


def measure(folder, dtype_name, fsdp):
    """In this process: load the checkpoint as asked and print one JSON line of peak RSS growth (and timing)."""
    import torch
    import torch.distributed.tensor  # noqa: F401  (weights.local_rows imports it: likewise)

    from nanovalor import policy
    from nanovalor.grpo import CompletionLogprobs
    dtype = getattr(torch, dtype_name)
    if fsdp:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        dist.init_process_group("gloo")
    policy.build(folder)  # a first model build imports torch._dynamo (~100 MB): an import, not the load
    base, t0 = peak_rss(), time.time()
    if fsdp:  # what train.py --fsdp does: build on meta, shard (one unit per decoder block + the root), fill
        model = policy.build(folder, dtype)
        for block in model.language_model.layers:
            fully_shard(block)
        fully_shard(CompletionLogprobs(model))
        policy.fill(model, folder)
    else:
        model = policy.load(folder, dtype)
    seconds = time.time() - t0
    held = sum(p.to_local().numel() if fsdp else p.numel() for p in model.parameters()) * dtype.itemsize
    print(json.dumps(dict(rank=int(os.environ.get("RANK", 0)), grown=peak_rss() - base, held=held,
                          seconds=seconds)), flush=True)
    if fsdp:
        dist.destroy_process_group()


def run(folder, dtype, fsdp=False, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = [str(Path(__file__).resolve()), "--measure", str(folder), dtype] + (["--fsdp"] if fsdp else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if fsdp \
        else [sys.executable]
    done = subprocess.run(launcher + args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main(layers=18):
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(tmp, llava_hf_config(layers))
        shards = len(list(Path(tmp).glob("model-*.safetensors")))
        print(f"checkpoint: {size / 1e9:.2f} GB of bf16 ({size / 2e9:.2f}B parameters) in {shards} shards\n")
        print("| load | peak RSS growth | × checkpoint | parameters held | target | seconds |")
        print("|---|---|---|---|---|---|")
        rows = [("policy.load, bf16", run(tmp, "bfloat16"), "≤ 1.15×"),
                ("policy.load, fp32 (from bf16)", run(tmp, "float32"), "~2×"),
                ("FSDP2, 2 ranks, bf16 (per rank)", run(tmp, "bfloat16", fsdp=True), "≤ 0.65×"),
                ("FSDP2, 2 ranks, fp32: train.py's (per rank)", run(tmp, "float32", fsdp=True), "~1×")]
        for name, results, target in rows:
            for r in sorted(results, key=lambda r: r['rank']):
                label = name if len(results) == 1 else f"{name}: rank {r['rank']}"
                print(f"| {label} | {r['grown'] / 2**30:.2f} GiB | {r['grown'] / size:.2f}× | "
                      f"{r['held'] / size:.2f}× | {target} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2], sys.argv[3], "--fsdp" in sys.argv)
    else:
        main(int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--layers=")), 18)))
