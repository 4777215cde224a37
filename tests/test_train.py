"""train.py end to end on a tiny phantom world: every stage runs, only the projector moves in the visual stage (with
the expert and with the phantom-only controls), resume is exact and refuses a changed run, a second writer is
refused, mu passes are optimizer steps, non-finite steps are skipped and a dead run stops, and the gradient is the
same for any split of a global batch over ranks and accumulation steps (torchrun with gloo), for every loss
aggregation, with dynamic sampling and in the visual stage, at a step where the policy differs from its reference.
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
from nanovalor import checkpoint, phantom_expert, phantoms
from train import Config

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(phantom_train=48, phantom_val=8, phantom_test=8, eval_n=8, max_new_tokens=16, group_size=4, warmup=1,
            eval_every=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny phantom world, its expert and an SFT warm start (a few steps each: weights, not quality), built in
    the order train.py's bootstrap builds them."""
    out = tmp_path_factory.mktemp("world")
    phantoms.generate(out / "phantoms", 48, 8, 8, seed=0, progress=False)
    phantom_expert.train(out / "phantoms", out / "expert" / "checkpoint", steps=2, batch_size=8, warmup=1,
                         log_every=1)
    data = str(out / "phantoms" / "annotation.json")
    train.main(Config(stage="sft", out=str(out), data=data, steps=3, batch_size=4, **TINY))
    return dict(out=out, data=data, model=str(out / "sft" / "checkpoint"), expert=str(out / "expert" / "checkpoint"))


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

    for judge in ("", "oracle", "oracle_strict", "null"):  # the expert, and the phantom-only controls of its reward
        out = tmp_path / (judge or "expert")
        out.mkdir()
        (out / "text").symlink_to(tmp_path / "text")
        train.main(grpo_config(world, out, stage="visual", model="", expert=judge or world["expert"]))
        visual = weights(out / "visual" / "checkpoint")
        moved = {k for k in visual if not torch.equal(visual[k], text[k])}
        assert moved and all(k.startswith("multi_modal_projector.") for k in moved), (judge, moved)
        log = rows(out, "visual")
        low = 0 if judge.startswith("oracle") else -1  # oracles score label agreement in (0, 1], experts a cosine
        assert all(low <= r["reward"] <= 1 and 0 <= r["text_reward"] <= 1 for r in log), (judge, log)


def test_resume_is_bit_exact_and_refuses_a_changed_run(world, tmp_path):
    train.main(grpo_config(world, tmp_path / "straight", steps=4))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, stop_after=2))
    for change in (dict(group_size=2), dict(lr=2e-3), dict(beta=0.0), dict(max_new_tokens=8)):
        with pytest.raises(SystemExit, match=f"--resume would change the run.*--{next(iter(change))}"):
            train.main(grpo_config(world, tmp_path / "resumed", steps=4, resume=True, **change))
    train.main(grpo_config(world, tmp_path / "resumed", steps=4, resume=True, eval_every=3))  # logging may change
    a, b = weights(tmp_path / "straight" / "text" / "checkpoint"), weights(tmp_path / "resumed" / "text" / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in r.items() if k != "tok_s"} for r in log if "val" not in r]
    assert strip(rows(tmp_path / "straight")) == strip(rows(tmp_path / "resumed"))


def test_a_second_run_into_the_same_out_is_refused(world, tmp_path):
    held = checkpoint.lock(tmp_path / "text")  # another train.py writing into this --out
    with pytest.raises(SystemExit, match="in use by another train.py run"):
        train.main(grpo_config(world, tmp_path))
    held.close()
    assert not (tmp_path / "text" / "metrics.jsonl").exists()  # refused before writing anything


def test_options_are_checked_before_any_work(world, tmp_path):
    for bad, message in [(dict(group_size=1), "--group_size=1"), (dict(temperature=0.0), "--temperature=0.0"),
                         (dict(rewards="chexbert=1"), "--chexbert"), (dict(kl="k4"), "--kl=k4"),
                         (dict(expert="oracle"), "control of the visual stage"), (dict(mu=0), "--mu=0")]:
        with pytest.raises(SystemExit, match=message):
            train.main(grpo_config(world, tmp_path, **bad))
        assert not (tmp_path / "text" / "metrics.jsonl").exists()


def test_mu_passes_are_optimizer_steps(world, tmp_path):
    train.main(grpo_config(world, tmp_path, mu=2, steps=1))
    (log,) = rows(tmp_path)
    assert log["ratio_dev"] < 1e-5 < log["ratio_dev_pass2"]  # pass 1 is pi_old itself; pass 2 follows a step
    state = checkpoint.load_state(tmp_path / "text" / "checkpoint")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}  # two AdamW steps


def test_non_finite_loss_skips_the_step_and_a_dead_run_stops(world, tmp_path, monkeypatch):
    real = train.text_reward

    def nan_rewards(*args, **kwargs):
        rewards, parts = real(*args, **kwargs)
        return rewards * float("nan"), parts

    monkeypatch.setattr(train, "text_reward", nan_rewards)
    train.main(grpo_config(world, tmp_path / "a"))
    assert [r["skipped"] for r in rows(tmp_path / "a")] == [1, 2]
    after, sft = weights(tmp_path / "a" / "text" / "checkpoint"), weights(world["model"])
    assert all(torch.equal(after[k], sft[k]) for k in sft)
    with pytest.raises(SystemExit, match="3 steps in a row were skipped"):
        train.main(grpo_config(world, tmp_path / "b", steps=10, max_skipped=3))
    assert len(rows(tmp_path / "b")) == 3


def test_chexbert_from_the_command_line(world, tmp_path):
    """--rewards ...,chexbert=W with --chexbert PATH: CheXbert's clinical reward in the loop and its F1s in the
    held-out table; eval.py --chexbert likewise (the library took a CheXbert, the scripts could not reach it)."""
    from test_rewards import tiny_chexbert
    tiny_chexbert(tmp_path)
    after = train.main(grpo_config(world, tmp_path, steps=1, rewards="bleu4=0.5,chexbert=0.5",
                                   chexbert=str(tmp_path / "chexbert.pth")))
    assert "chexbert" in rows(tmp_path)[0] and "chexbert_f1_micro_14" in after
    (tmp_path / "h.txt").write_text("No pleural effusion.\nModerate left pneumothorax.\n")
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"--hyps={tmp_path / 'h.txt'}",
                           f"--refs={tmp_path / 'h.txt'}", f"--chexbert={tmp_path / 'chexbert.pth'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "CheXbert F1-14 micro" in done.stdout, done.stderr[-2000:]


def test_lora_trains_only_adapters_and_resumes_bit_exactly(world, tmp_path):
    """--lora_rank: the adapters (and the projector, LM head) train, the decoder's base does not; the checkpoint is the
    merged model plus adapter.safetensors; resume continues exactly (FSDP: the split test's "lora" variant)."""
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


# -----------------------------------------------------------------------------
# The same gradient for any split over ranks and accumulation steps. One torchrun launch per rank count runs every
# configuration in turn; AdamW.step is wrapped to record the full gradient of every step before it is applied.

WORKER = """
import json, sys, zlib
from pathlib import Path
import torch
import train
from nanovalor import dist

configs, dump = json.loads(sys.argv[1]), Path(sys.argv[2])
grads, step = [], torch.optim.AdamW.step

def recording(self, *args, **kwargs):  # every rank takes part: a DTensor's full_tensor() is a collective
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
    params = [p for group in self.param_groups for p in group["params"]]
    grads.append([full(p.grad).detach().clone() for p in params])
    # Adam's first step moves every weight by about lr * sign(gradient), however small the gradient: one that is 0 in
    # one split and 1e-12 (rounding) in another would move a weight by lr in one run only, and the second step would
    # sample other reports. Gradients below 1e-6 of the largest are zeroed, alike in every split, after recording.
    floor = 1e-6 * max(g.abs().max() for g in grads[-1])
    for p in params:
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        local.masked_fill_(local.abs() < floor, 0)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = recording
text_reward = train.text_reward

def some_constant(samples, references, *args, **kwargs):  # a study-level rule, the same on any rank: zero-variance
    rewards, parts = text_reward(samples, references, *args, **kwargs)  # groups for dynamic sampling to drop
    rewards[[zlib.crc32(ref.encode()) % 3 == 0 for ref in references]] = 0.5
    return rewards, parts

train.text_reward = some_constant
for name, kwargs in configs:
    grads.clear()
    train.main(train.Config(**kwargs))
    if dist.rank_and_world()[0] == 0:
        torch.save(grads, dump / f"{name}.pt")
"""


def test_any_split_over_ranks_and_accumulation_gives_the_same_gradient(world, tmp_path):
    """Global batch of 4 studies, 2 steps (at step 2 the policy differs from its reference, so the KL term and its
    gradient are not 0): 1 rank x 4 micro-batches = 1 x 1 = 2 ranks x 2 = 4 x 1 = FSDP2 on 2 ranks, for the three
    loss aggregations, with dynamic sampling, in the visual stage and with LoRA adapters."""
    base = dict(TINY, eval_n=0, stage="text", model=world["model"], data=world["data"], expert=world["expert"],
                steps=2, batch_size=4, lr=1e-3, warmup=0, save_every=0, max_new_tokens=12)
    variants = {"token_mean": {}, "seq_mean": dict(agg="seq_mean_token_mean"),
                "dr_grpo": dict(agg="seq_mean_token_sum_norm"), "dynamic": dict(dynamic_sampling=True),
                "visual": dict(stage="visual", beta=0.05), "lora": dict(lora_rank=4, lora_alpha=8.0)}
    splits = {1: [("1x4", 1, {}), ("1x1", 4, {})], 2: [("2x2", 1, {}), ("fsdp2x1", 2, dict(fsdp=True))],
              4: [("4x1", 1, {})]}
    for nproc, runs in splits.items():
        configs = [(f"{variant} {name}", dict(base, **extra, **change, micro_batch=micro,
                                              out=str(tmp_path / variant / name)))
                   for name, micro, extra in runs for variant, change in variants.items()
                   if nproc != 4 or variant == "token_mean"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = _launch(launcher, configs, tmp_path, env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for variant in variants:
        ref = torch.load(tmp_path / f"{variant} 1x4.pt")
        assert len(ref) == 2
        for name in ["1x1", "2x2", "fsdp2x1"] + (["4x1"] if variant == "token_mean" else []):
            got = torch.load(tmp_path / f"{variant} {name}.pt")
            for step in (0, 1):
                for g, g0 in zip(got[step], ref[step]):
                    scale = g0.abs().max().item()
                    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4 * scale, msg=f"{variant} {name} {step}")
        log = rows(tmp_path / variant / "1x4", "visual" if variant == "visual" else "text")
        assert log[1]["kl"] > 0  # the second step's gradient carries the KL term
        if variant == "dynamic":
            assert max(r["zero_var"] for r in log) > 0  # some groups were taken out


def _launch(launcher, configs, tmp_path, env):
    (tmp_path / "worker.py").write_text(WORKER)
    return subprocess.run(launcher + [str(tmp_path / "worker.py"), json.dumps(configs), str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
