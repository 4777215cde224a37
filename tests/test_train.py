"""train.py end to end on a tiny phantom world: every stage runs, only the projector moves in the visual stage,
resume is exact, the update is the same for any split of a global batch over ranks and accumulation steps (torchrun
with gloo), a non-finite loss skips the step.

    python -m pytest -q tests/test_train.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from train import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(phantom_train=48, phantom_val=8, phantom_test=8, eval_n=8, max_new_tokens=16, group_size=4, warmup=1,
            eval_every=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny phantom world with an SFT warm start and an expert (a few steps each: weights, not quality)."""
    out = tmp_path_factory.mktemp("world")
    train.main(Config(stage="sft", out=str(out), steps=3, batch_size=4, **TINY))
    train.main(Config(stage="expert", out=str(out), steps=2, batch_size=8, **TINY))
    return dict(out=out, data=str(out / "phantoms" / "annotation.json"), model=str(out / "sft" / "checkpoint"),
                expert=str(out / "expert" / "checkpoint"))


def grpo_config(world, out, **kw):
    return Config(**{**TINY, **dict(stage="text", out=str(out), model=world["model"], data=world["data"],
                                    expert=world["expert"], steps=2, batch_size=2, lr=1e-3), **kw})


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def rows(out, stage="text"):
    return [json.loads(line) for line in (Path(out) / stage / "metrics.jsonl").read_text().splitlines()]


def test_text_then_visual_trains_only_the_projector_in_visual(world, tmp_path):
    train.main(grpo_config(world, tmp_path))
    log = rows(tmp_path)
    assert len(log) == 2 and all(r["skipped"] == 0 for r in log)
    for key in ("reward", "bleu4", "rougeL", "clinical", "kl", "clip_frac", "entropy", "ratio_err", "zero_var",
                "length", "normal", "tok_s", "grad_norm"):
        assert key in log[0], key
    assert max(r["ratio_err"] for r in log) < 1e-4  # sampler and trainer log-probs agree: first-pass ratio = 1
    text = weights(tmp_path / "text" / "checkpoint")
    sft = weights(world["model"])
    assert any(not torch.equal(text[k], sft[k]) for k in text if k.startswith("language_model."))

    train.main(grpo_config(world, tmp_path, stage="visual", model=""))  # continues from out/text/checkpoint
    visual = weights(tmp_path / "visual" / "checkpoint")
    moved = {k for k in visual if not torch.equal(visual[k], text[k])}
    assert moved and all(k.startswith("multi_modal_projector.") for k in moved), moved  # frozen: bit-identical
    log = rows(tmp_path, "visual")
    assert all(-1 <= r["reward"] <= 1 and 0 <= r["text_reward"] <= 1 for r in log)  # cosine; the text mix


def test_resume_is_bit_exact(world, tmp_path):
    train.main(grpo_config(world, tmp_path / "straight", steps=4))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, stop_after=2))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, resume=True))
    a, b = weights(tmp_path / "straight" / "text" / "checkpoint"), weights(tmp_path / "resumed" / "text" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("tok_s",)
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]
    assert strip(rows(tmp_path / "straight")) == strip(rows(tmp_path / "resumed"))


def test_non_finite_loss_skips_the_step(world, tmp_path, monkeypatch):
    real = train.text_reward

    def nan_rewards(*args, **kwargs):
        rewards, parts = real(*args, **kwargs)
        return rewards * float("nan"), parts

    monkeypatch.setattr(train, "text_reward", nan_rewards)
    train.main(grpo_config(world, tmp_path))
    assert [r["skipped"] for r in rows(tmp_path)] == [1, 2]
    after, sft = weights(tmp_path / "text" / "checkpoint"), weights(world["model"])
    assert all(torch.equal(after[k], sft[k]) for k in sft)


def run_torchrun(world, out, nproc, micro, *extra):
    """One GRPO step of a global batch of 4 studies on `nproc` ranks, micro-batches of `micro` studies."""
    args = [f"--out={out}", f"--model={world['model']}", f"--data={world['data']}", f"--expert={world['expert']}",
            "--steps=1", "--batch_size=4", f"--micro_batch={micro}", "--lr=1e-3", "--eval_n=0", *extra] + [
        f"--{k}={v}" for k, v in TINY.items() if k != "eval_n"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(launcher + [str(ROOT / "train.py"), "--stage=text"] + args, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return rows(out)[0], weights(Path(out) / "text" / "checkpoint")


def test_any_split_over_ranks_and_accumulation_gives_the_same_update(world, tmp_path):
    """1 rank x 4 accumulation steps = 2 x 2 = 4 x 1 = 1 rank, one micro-batch (DDP over gloo), and FSDP2."""
    runs = {"1x4": run_torchrun(world, tmp_path / "a", 1, 1), "2x2": run_torchrun(world, tmp_path / "b", 2, 1),
            "4x1": run_torchrun(world, tmp_path / "c", 4, 1), "1x1": run_torchrun(world, tmp_path / "d", 1, 4),
            "fsdp 2x1": run_torchrun(world, tmp_path / "e", 2, 2, "--fsdp")}
    (log0, w0) = runs.pop("1x4")
    for name, (log, w) in runs.items():
        assert log["reward"] == pytest.approx(log0["reward"], abs=1e-6), name  # the same rollouts
        assert log["loss"] == pytest.approx(log0["loss"], rel=1e-5, abs=1e-7), name
        assert log["grad_norm"] == pytest.approx(log0["grad_norm"], rel=1e-4), name
        for k in w0:  # AdamW's first step divides by |g|: float noise in g moves a weight by a fraction of lr
            torch.testing.assert_close(w[k], w0[k], rtol=0, atol=2e-4, msg=f"{name}: {k}")


def test_lora_resume_is_bit_exact_and_fsdp_gives_the_same_update(world, tmp_path):
    """--lora_rank: the adapters (and the projector, LM head) train, the decoder's base does not; the checkpoint is the
    merged model plus adapter.safetensors; resume continues exactly; FSDP2 over 2 ranks gives the 1-rank update."""
    lora = dict(lora_rank=4, lora_alpha=8.0)
    train.main(grpo_config(world, tmp_path / "straight", steps=4, **lora))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, stop_after=2, **lora))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, resume=True, **lora))
    a, b = weights(tmp_path / "straight" / "text" / "checkpoint"), weights(tmp_path / "resumed" / "text" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    adapter = lambda run: load_file(str(tmp_path / run / "text" / "checkpoint" / "adapter.safetensors"))
    assert all(torch.equal(adapter("straight")[k], adapter("resumed")[k]) for k in adapter("straight"))
    sft = weights(world["model"])
    moved = {k for k in a if not torch.equal(a[k], sft[k])}
    assert any(".q_proj." in k for k in moved) and not any("norm" in k or "embed" in k for k in moved), moved
    (log1, w1), (log2, w2) = (run_torchrun(world, tmp_path / "one", 1, 2, "--lora_rank=4"),
                              run_torchrun(world, tmp_path / "fsdp", 2, 2, "--lora_rank=4", "--fsdp"))
    assert log2["loss"] == pytest.approx(log1["loss"], rel=1e-5, abs=1e-7)
    assert log2["grad_norm"] == pytest.approx(log1["grad_norm"], rel=1e-4)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=2e-4, msg=k)
