"""Lazy loading (weights.materialise through policy.build + policy.fill): the same tensors, bit for bit, as reading
the whole checkpoint and casting it, for every file format and dtype pair; peak host memory about one model; and
under torchrun with FSDP2 (gloo, 2 ranks) each rank's shards equal its rows of the full model, LoRA adapters
included, and one LoRA training step equals the single-process one.

    python -m pytest -q tests/test_loading.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanovalor import lora, weights
from nanovalor.decoder import DecoderConfig
from nanovalor.policy import HF_LLAVA_KEYS, LLAVA_HF_NAMES, UNUSED, Llava, LlavaConfig, build, config_to_hf, fill, load
from nanovalor.vit import VisionConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tied=False, layers=2):
    """Odd sizes on purpose: 61 / 13 rows do not split evenly over 2 ranks (FSDP2 pads the last shard)."""
    return LlavaConfig(vision=VisionConfig(image_size=14, patch_size=7, hidden_size=12, intermediate_size=20,
                                           num_layers=2, num_heads=2),
                       text=DecoderConfig(vocab_size=61, hidden_size=16, intermediate_size=26, num_layers=layers,
                                          num_heads=4, num_kv_heads=2, head_dim=4, tie_embeddings=tied),
                       image_token_id=60, eos_token_id=[2])


def write(folder, cfg, dtype=torch.float32, kind="sharded", seed=0):
    """A random checkpoint of `cfg` in the llava-hf layout: sharded safetensors (3 files and an index), or one
    pytorch_model.bin (torch's zip format, or the old non-zip one). Returns {our name: tensor as stored}."""
    torch.manual_seed(seed)
    model = Llava(cfg)
    ours = {k: (v * 3).to(dtype) for k, v in model.state_dict().items()  # * 3: bf16 rounding shows if cast twice
            if not (k == "lm_head.weight" and cfg.text.tie_embeddings)}
    hub = {}
    for k, v in ours.items():
        old, new = next((o, n) for o, n in LLAVA_HF_NAMES if k.startswith(o))
        hub[new + k[len(old):]] = v.contiguous()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    if kind == "sharded":
        names, files = sorted(hub), {}
        for i in range(3):
            part = names[i::3]
            save_file({k: hub[k] for k in part}, folder / f"model-0000{i + 1}-of-00003.safetensors")
            files.update({k: f"model-0000{i + 1}-of-00003.safetensors" for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
    else:
        torch.save(hub, folder / "pytorch_model.bin", _use_new_zipfile_serialization=kind == "bin")
    return ours


@pytest.mark.parametrize("kind", ["sharded", "bin", "legacy_bin"])
@pytest.mark.parametrize("stored,wanted", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_lazy_load_equals_reading_everything_then_casting(tmp_path, monkeypatch, kind, stored, wanted):
    cfg = tiny_config(tied=kind == "bin")
    write(tmp_path / "m", cfg, stored, kind)
    eager, unexpected = weights.read_checkpoint(tmp_path / "m", HF_LLAVA_KEYS, skip=UNUSED)  # the old way
    assert not unexpected
    monkeypatch.setattr(weights, "CHUNK", 40)  # many reads per tensor: rows split across calls, both paths
    model = load(tmp_path / "m", wanted)
    state = model.state_dict()
    assert state.keys() == eager.keys() | ({"lm_head.weight"} if cfg.text.tie_embeddings else set())
    for k, t in eager.items():
        assert state[k].dtype == wanted and torch.equal(state[k], t.to(wanted)), k
    if cfg.text.tie_embeddings:
        assert model.lm_head.weight is model.language_model.embed_tokens.weight


def test_fill_reads_only_what_trains_into_a_filled_model(tmp_path):
    """Resuming: fill(trained_only=True) overwrites the trained parameters in place and leaves the others."""
    cfg = tiny_config()
    write(tmp_path / "a", cfg, seed=0)
    later = write(tmp_path / "b", cfg, seed=1)
    model = load(tmp_path / "a")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("multi_modal_projector.")}
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    projector = model.multi_modal_projector.linear_1.weight
    fill(model, tmp_path / "b", trained_only=True)
    assert model.multi_modal_projector.linear_1.weight is projector  # in place: the optimizer's tensors stay valid
    for k, v in model.state_dict().items():
        assert torch.equal(v, later[k] if k.startswith("multi_modal_projector.") else frozen[k]), k


def test_truncated_or_mismatched_files_are_clear_errors(tmp_path):
    cfg = tiny_config()
    write(tmp_path / "m", cfg)
    shard = tmp_path / "m" / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # found from the header, before any tensor is read
    with pytest.raises(ValueError, match=r"00001-of-00003.safetensors: not a readable safetensors file \(ValueError: "
                                         r"truncated, \d+ bytes where its header needs \d+\)"):
        load(tmp_path / "m")
    shard.write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load(tmp_path / "m")
    write(tmp_path / "wide", tiny_config(layers=3))
    with pytest.raises(ValueError, match=r"unexpected \['language_model.layers.2.input_layernorm.weight'"):
        fill(build(tmp_path / "m"), tmp_path / "wide")  # nothing is read before the whole index is checked


def test_peak_memory_is_about_one_model(tmp_path):
    """Peak RSS growth of a fresh process loading a 90 MB single-file bf16 checkpoint (bench/load.py measures a 2 GB
    sharded one): bf16 -> bf16 about 1x, bf16 -> fp32 about 2x plus the conversion buffer. A loader that held a
    copy of the file's tensors beside the parameters would show 2x and 3x."""
    cfg = LlavaConfig(vision=VisionConfig(image_size=14, patch_size=7, hidden_size=32, intermediate_size=64,
                                          num_layers=1, num_heads=2),
                      text=DecoderConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4,
                                         num_heads=8, num_kv_heads=2, head_dim=64), image_token_id=31999)
    with torch.device("meta"):
        n = sum(p.numel() for p in Llava(cfg).parameters())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    hub = {}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llava(cfg).state_dict().items()}
    for k, shape in shapes.items():
        old, new = next((o, n) for o, n in LLAVA_HF_NAMES if k.startswith(o))
        hub[new + k[len(old):]] = torch.randn(shape, dtype=torch.bfloat16)
    save_file(hub, folder / "model.safetensors")
    del hub
    code = ("import sys, torch, torch.distributed.tensor\nfrom nanovalor.policy import build, load\n"
            "hwm = lambda: next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "build(sys.argv[1])  # the imports a first model build triggers (torch._dynamo: ~100 MB) are not the load\n"
            "base = hwm(); model = load(sys.argv[1], getattr(torch, sys.argv[2])); print(hwm() - base)")
    size = 2 * n  # bf16 bytes; fp32 adds a conversion buffer of at most weights.CHUNK bytes
    for dtype, bound in (("bfloat16", 1.1), ("float32", 2.1 + weights.CHUNK / size)):
        run = subprocess.run([sys.executable, "-c", code, str(folder), dtype], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert int(run.stdout.split()[-1]) / size < bound, (dtype, int(run.stdout.split()[-1]) / size)


# -----------------------------------------------------------------------------
# torchrun, 2 ranks, gloo: this file is also the worker script


def test_fsdp_ranks_read_their_own_rows_and_lora_trains_the_same(tmp_path):
    for tied in (False, True):
        write(tmp_path / f"tied{tied}", tiny_config(tied=tied))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("rank ok") == 2, done.stdout


def shard(model):
    """What train.py --fsdp does: one FSDP2 unit per decoder block, the root around CompletionLogprobs."""
    from torch.distributed.fsdp import fully_shard

    from nanovalor.grpo import CompletionLogprobs
    for block in model.language_model.layers:
        fully_shard(block)
    return fully_shard(CompletionLogprobs(model))


def grpo_step(model, scorer, reference, world, seed):
    """One GRPO update (KL to `reference`) of 2 studies x G = 2 fixed completions, then an SGD step: under FSDP
    (world 2) each rank its study; in one process (world 1) both. update() sums token counts over the process group,
    so in one process on each of the 2 ranks the counts double, and update(world=2) doubles the loss back."""
    from nanovalor.grpo import Rollout, reference_logprobs, update
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 59, (2, 2), generator=g), torch.full((2, 4), 60)], 1)  # 4 image tokens each
    pixels, tokens = torch.randn(2, 3, 14, 14, generator=g), torch.randint(0, 59, (4, 3), generator=g)
    mask, advantages = torch.ones(4, 3, dtype=torch.bool), torch.tensor([1.0, -1.0, 0.5, -0.5])
    b = slice(int(os.environ["RANK"]), int(os.environ["RANK"]) + 1) if world > 1 else slice(0, 2)
    r = slice(2 * b.start, 2 * b.stop)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rollout = Rollout(pixels[b], ids[b], torch.ones_like(ids[b]), tokens[r], mask[r], torch.zeros(4, 3)[r], 2)
    ref_logp = reference_logprobs(reference, scorer, rollout, micro=1)
    stats, _ = update(scorer, rollout, advantages[r], micro=1, world=2, ref_logp=ref_logp, beta=0.5)
    optimizer.step()
    return stats["kl"]


def worker(folder):
    """Under torchrun: each rank's shards equal its rows of the fully loaded model (tied or not); LoRA adapters start
    the same as unsharded; two GRPO steps, the second with a non-zero KL to the reference (the starting weights
    swapped in; LoRA: adapters off), equal the single-process steps, with and without LoRA."""
    import torch.distributed as dist

    from nanovalor.grpo import CompletionLogprobs, reference_model
    dist.init_process_group("gloo")
    for tied in (False, True):
        path = Path(folder) / f"tied{tied}"
        full = load(path)
        for lora_rank in (0, 3):
            model = build(path)
            model.requires_grad_(False)
            model.multi_modal_projector.requires_grad_(True)
            model.language_model.requires_grad_(True)
            lora.apply(model, lora_rank, 6.0, seed=1)
            scorer = shard(model)
            fill(model, path)
            plain = load(path)
            plain.requires_grad_(False)
            plain.multi_modal_projector.requires_grad_(True)
            plain.language_model.requires_grad_(True)
            lora.apply(plain, lora_rank, 6.0, seed=1)
            expected = {k: v.clone() for k, v in plain.state_dict().items()}
            for name, p in model.state_dict(keep_vars=True).items():
                local, start = weights.local_rows(p)
                assert type(p).__name__ == "DTensor" and len(local) < max(len(expected[name]), 2), name
                assert torch.equal(local, expected[name][start:start + len(local)]), name
                assert name not in full.state_dict() or torch.equal(expected[name], full.state_dict()[name]), name
            if tied:
                assert model.lm_head.weight is model.language_model.embed_tokens.weight
            if not tied:  # two steps, sharded and not: the same updates
                sharded_ref, plain_ref = reference_model(model), reference_model(plain)
                for step in range(2):
                    kl = grpo_step(model, scorer, sharded_ref, 2, step)
                    single = grpo_step(plain, CompletionLogprobs(plain), plain_ref, 1, step)
                    assert kl == pytest.approx(single, rel=1e-4)
                    assert (kl > 1e-6) == (step == 1), kl
                after = plain.state_dict()
                for name, p in model.state_dict(keep_vars=True).items():
                    torch.testing.assert_close(p.full_tensor(), after[name], rtol=0, atol=1e-5, msg=name)
                moved = {k for k in after if not torch.equal(after[k], expected[k])}
                assert moved and all(k.startswith("multi_modal_projector.") or "lora_" in k or not lora_rank
                                     for k in moved), moved
    print("rank ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
