"""GRPO math: every advantage kind and the policy loss on hand-computed numbers, and the loss against liger-kernel's
chunked GRPO loss (TRL's formulas).

    python -m pytest -q tests/test_grpo.py
"""
import math

import pytest
import torch

from nanovalor.grpo import group_advantages, kl_estimate, policy_loss


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=0, atol=tol)


# ----------------------------------------------------------------------------- advantages

def test_zscore_hand_numbers():
    # mean 2.5, unbiased std sqrt(5/3) = 1.2909944
    s = math.sqrt(5 / 3) + 1e-6
    close(group_advantages(torch.tensor([[1.0, 2, 3, 4]]), "zscore")[0], [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])


def test_mean_only_and_rloo_hand_numbers():
    r = torch.tensor([[1.0, 2, 3, 4]])
    close(group_advantages(r, "mean_only")[0], [-1.5, -0.5, 0.5, 1.5])
    close(group_advantages(r, "rloo")[0], [1 - 3, 2 - 8 / 3, 3 - 7 / 3, 4 - 2])  # r_i - mean of the others


def test_rank_with_ties_hand_numbers():
    # G = 4: 0.1 has rank 0, the two 0.3 share ranks 1 and 2 -> 1.5, 0.9 has rank 3; A = 2 rank / 3 - 1
    close(group_advantages(torch.tensor([[0.3, 0.1, 0.3, 0.9]]), "rank")[0], [0.0, -1.0, 0.0, 1.0])
    # G = 5: 1 -> 0, 2 -> 1, the three 5s share ranks 2, 3, 4 -> 3; A = rank / 2 - 1
    close(group_advantages(torch.tensor([[5.0, 5, 5, 1, 2]]), "rank")[0], [0.5, 0.5, 0.5, -1.0, -0.5])


def test_rank_is_scale_free_and_spans_minus_one_to_one():
    r = torch.tensor([[0.21, 0.25, 0.19, 0.30, 0.22, 0.27, 0.18, 0.24]])
    a = group_advantages(r, "rank")
    close(a, group_advantages(100 * r - 3, "rank"))
    close(sorted(a[0].tolist()), [2 * k / 7 - 1 for k in range(8)])


@pytest.mark.parametrize("kind", ["zscore", "mean_only", "rloo", "rank"])
def test_all_tied_group_gets_zero(kind):
    a = group_advantages(torch.tensor([[0.7] * 8, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]), kind)
    assert torch.all(a[0] == 0), a[0]
    assert a[1].abs().sum() > 0 and abs(a[1].sum()) < 1e-6  # every kind is zero-sum within a group


def test_rank_plus_text_advantage():
    r = torch.tensor([[0.3, 0.1, 0.3, 0.9]])
    t = torch.tensor([[1.0, 2, 3, 4]])
    s = math.sqrt(5 / 3) + 1e-6
    close(group_advantages(r, "rank", text_rewards=t, text_weight=0.5)[0],
          [0 - 0.75 / s, -1 - 0.25 / s, 0 + 0.25 / s, 1 + 0.75 / s])


def test_bad_advantage_arguments():
    with pytest.raises(ValueError, match="advantage kind 'std'"):
        group_advantages(torch.zeros(2, 4), "std")
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(2, 1), "rank")


# ----------------------------------------------------------------------------- policy loss

def hand_batch():
    """Two sequences; the first has 2 completion tokens, the second 1; padding holds garbage (-inf, nan)."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old = torch.tensor([[-1.0, -2.0, -math.inf], [-0.5, float("nan"), -math.inf]])
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.0, 1.0]])
    logp = (old.nan_to_num(0.0, 0.0, 0.0) + ratios.log()).where(mask, torch.tensor(-math.inf))
    logp.requires_grad_(True)
    ref = torch.tensor([[-1.0 + math.log(1.5), -2.0 + math.log(0.9) + math.log(2.0), float("nan")],
                        [-0.5 + math.log(0.5) + math.log(0.5), 0.0, 0.0]])  # d = ref - logp = [0, ln 2], [ln 0.5]
    adv = torch.tensor([1.0, -2.0])
    return logp, old, ref, adv, mask


def test_policy_loss_hand_numbers():
    # per token: seq0 r=1.5, A=1 -> -min(1.5, 1.2) = -1.2; r=0.9 -> -0.9; seq1 r=0.5, A=-2 -> -min(-1.0, -1.6) = 1.6
    logp, old, ref, adv, mask = hand_batch()
    loss, stats = policy_loss(logp, old, None, adv, mask, beta=0.0)
    close(loss, (-1.2 - 0.9 + 1.6) / 3)
    close(stats["clip_frac"], 2 / 3)  # the 1.5 (A > 0) and the 0.5 (A < 0) are clipped, 0.9 is not
    close(stats["ratio_dev"], 0.5)
    loss.backward()
    # only the unclipped token has a gradient: d(-r A / 3) / d logp = -r A / 3 = -0.3; padding gets exactly 0
    close(logp.grad, [[0.0, -0.3, 0.0], [0.0, 0.0, 0.0]])

    loss, _ = policy_loss(logp, old, None, adv, mask, beta=0.0, agg="seq_mean_token_mean")
    close(loss, ((-1.2 - 0.9) / 2 + 1.6) / 2)
    loss, _ = policy_loss(logp, old, None, adv, mask, beta=0.0, agg="seq_mean_token_sum_norm", max_len=4)
    close(loss, (-1.2 - 0.9 + 1.6) / (2 * 4))


def test_policy_loss_with_k3_kl_hand_numbers():
    # k3(d) = e^d - 1 - d: d = 0 -> 0; ln 2 -> 1 - ln 2; ln 0.5 -> -0.5 + ln 2. Sum = 0.5
    logp, old, ref, adv, mask = hand_batch()
    loss, stats = policy_loss(logp, old, ref, adv, mask, beta=0.1)
    close(stats["kl"], 0.5 / 3)
    close(loss, (-1.2 - 0.9 + 1.6 + 0.1 * 0.5) / 3)
    loss.backward()
    # d k3 / d logp = 1 - e^d: 0, -1, +0.5; plus the policy-gradient part of the unclipped token
    close(logp.grad, [[0.0, -0.3 + 0.1 * -1 / 3, 0.0], [0.1 * 0.5 / 3, 0.0, 0.0]])
    assert torch.isfinite(logp.grad).all()


def test_kl_estimators_hand_numbers():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.0 + math.log(2.0)])  # d = ln 2
    close(kl_estimate(logp, ref, "k1"), [-math.log(2.0)])
    close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2.0) ** 2])
    close(kl_estimate(logp, ref, "k3"), [1 - math.log(2.0)])
    with pytest.raises(ValueError, match="kl estimator 'k4'"):
        kl_estimate(logp, ref, "k4")


def test_kl_clamp_bounds_k3_as_verl():
    logp = torch.tensor([0.0, 0.0, -30.0])
    ref = torch.tensor([0.0, 25.0, 0.0])  # d = log(pi_ref / pi): 0, 25 (k3 = e^25 - 26) and 30
    close(kl_estimate(logp, ref, "k3", clamp=True), [0.0, 10.0, 10.0])  # d clipped to 20, then k3 to 10
    close(kl_estimate(logp, ref, "k1", clamp=True), [0.0, -20.0, -20.0])
    assert kl_estimate(logp, ref, "k3")[1] > 1e10  # unclamped, one token dominates any batch


def test_global_normaliser_splits_exactly_across_micro_batches():
    torch.manual_seed(0)
    logp = torch.randn(8, 5, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(8, 5, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(8, 5, dtype=torch.float64)
    adv = torch.randn(8, dtype=torch.float64)
    mask = torch.rand(8, 5) > 0.3
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        whole, _ = policy_loss(logp, old, ref, adv, mask, agg=agg, max_len=5)
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], agg=agg,
                                max_len=5, total_tokens=mask.sum(), total_seqs=8)[0] for i in range(0, 8, 2))
        close(parts, whole, 1e-12)


# ----------------------------------------------------------------------------- against liger-kernel (TRL's formulas)

@pytest.mark.parametrize("agg,loss_type", [("token_mean", "dapo"), ("seq_mean_token_mean", "grpo"),
                                           ("seq_mean_token_sum_norm", "dr_grpo")])
def test_matches_liger_grpo_loss(agg, loss_type):
    LigerFusedLinearGRPOLoss = pytest.importorskip("liger_kernel.chunked_loss").LigerFusedLinearGRPOLoss

    torch.manual_seed(0)
    B, T, H, V = 4, 6, 16, 50
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.randn(B, dtype=torch.float64)
    with torch.no_grad():
        base = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
        old = base + 0.2 * torch.randn(B, T, dtype=torch.float64)
        ref = base + 0.2 * torch.randn(B, T, dtype=torch.float64)

    liger = LigerFusedLinearGRPOLoss(beta=0.04, compiled=False, loss_type=loss_type, max_completion_length=T,
                                     epsilon_low=0.2, epsilon_high=0.28)
    out = liger(hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    ref_loss = out[0] if isinstance(out, tuple) else out
    g_ref = torch.autograd.grad(ref_loss, (hidden, weight))

    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    loss, _ = policy_loss(logp, old, ref, adv, mask.bool(), eps_low=0.2, eps_high=0.28, beta=0.04, agg=agg,
                          max_len=T)
    g = torch.autograd.grad(loss, (hidden, weight))
    # liger accumulates its loss and gradients in float32 even for float64 inputs: compare at float32 precision
    for ours, theirs in ((loss, ref_loss), (g[0], g_ref[0]), (g[1], g_ref[1])):
        torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- teacher-forced log-probs, reference

def tiny_policy(seed=0):
    from nanovalor.decoder import DecoderConfig
    from nanovalor.policy import Llava, LlavaConfig
    from nanovalor.vit import VisionConfig

    torch.manual_seed(seed)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=24, intermediate_size=40, num_layers=2,
                          num_heads=2)
    text = DecoderConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    return Llava(LlavaConfig(vision=vision, text=text, image_token_id=60, feature_layer=-1)).eval()


def test_completion_logprobs_equal_full_logits():
    """The fused completion-only path equals log_softmax of the model's own logits over the joined sequence."""
    from nanovalor.generate import left_pad
    from nanovalor.grpo import CompletionLogprobs

    policy, G, T = tiny_policy(), 3, 0.7
    prompts = [[1, 5] + [60] * 4 + [7, 8, 9], [1] + [60] * 4 + [3]]
    prompt_ids, prompt_mask = left_pad(prompts)
    pixels = torch.randn(2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 60, (2 * G, 5), generator=gen)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    logp, ent = CompletionLogprobs(policy)(pixels, prompt_ids, prompt_mask, tokens, mask, G, T, entropy=True)
    for row in range(2 * G):
        b = row // G
        seq = torch.tensor(prompts[b] + tokens[row, :lengths[row]].tolist())[None]
        logits = policy(seq, pixels[b:b + 1])[0] / T  # (len, V)
        all_logp = torch.log_softmax(logits[len(prompts[b]) - 1:-1], -1)  # positions predicting the completion
        expected = all_logp.gather(1, tokens[row, :lengths[row], None])[:, 0]
        torch.testing.assert_close(logp[row, :lengths[row]], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent[row, :lengths[row]], -(all_logp.exp() * all_logp).sum(-1), rtol=0, atol=1e-5)
        assert torch.all(logp[row, lengths[row]:] == 0)


def test_reference_is_the_starting_policy_and_copies_only_what_trains():
    """reference_model: the policy with its starting trainable weights swapped in, for the block only."""
    from nanovalor.generate import left_pad
    from nanovalor.grpo import CompletionLogprobs, reference_model

    policy = tiny_policy()
    policy.requires_grad_(False)
    policy.multi_modal_projector.requires_grad_(True)  # the visual stage trains the projector only
    scorer = CompletionLogprobs(policy)
    prompt_ids, prompt_mask = left_pad([[1, 5] + [60] * 4 + [7]])
    pixels, tokens, mask = torch.randn(1, 3, 16, 16), torch.tensor([[9, 11, 2]]), torch.ones(1, 3, dtype=torch.bool)
    score = lambda: scorer(pixels, prompt_ids, prompt_mask, tokens, mask)
    with torch.no_grad():
        start = score()
        reference = reference_model(policy)
        for p in policy.parameters():  # "training": every parameter moves, frozen ones too (they never do)
            p.add_(0.1)
        moved = score()
        with reference(scorer):
            ref = score()
        after = score()
    assert not torch.allclose(moved, start, atol=1e-3)
    torch.testing.assert_close(after, moved, rtol=0, atol=0)  # swapped back exactly
    # only the projector was saved: inside, the projector is the starting one and everything else as it is now
    with torch.no_grad():
        for p in policy.multi_modal_projector.parameters():
            p.sub_(0.1)
        torch.testing.assert_close(ref, score(), rtol=0, atol=0)
@pytest.mark.parametrize("completion_length", [5, 1])
def test_shared_prompt_pass_equals_a_prompt_per_completion(completion_length):
    """The prompt computed once per group (SharedPrefix) gives the same log-probs, entropies and gradients as every
    completion carrying its own copy of the prompt."""
    from nanovalor.generate import left_pad
    from nanovalor.grpo import CompletionLogprobs

    policy, G = tiny_policy(seed=3).train(), 3
    prompt_ids, prompt_mask = left_pad([[1, 5] + [60] * 4 + [7, 8, 9], [1] + [60] * 4 + [3]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 60, (2 * G, completion_length), generator=torch.Generator().manual_seed(2))
    mask = torch.arange(completion_length)[None] < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]
    results = []
    for share in (True, False):
        policy.zero_grad()
        logp, ent = CompletionLogprobs(policy, share)(pixels, prompt_ids, prompt_mask, tokens, mask, G, 0.7, True)
        (logp.sum() + 0.3 * ent.sum()).backward()
        results.append((logp, ent, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (a, ea, ga), (b, eb, gb) = results
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ea, eb, rtol=0, atol=1e-5)
    assert ga.keys() == gb.keys() and any(n.startswith("vision_tower.") for n in ga)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eos_is_trained_and_padding_never():
    """A completion's EOS is a trained token (dropping it from the mask changes the gradient); whatever sits in the
    padding after it changes neither the loss nor any gradient."""
    from nanovalor.generate import left_pad
    from nanovalor.grpo import CompletionLogprobs, Rollout, update

    policy, G, eos = tiny_policy(seed=4).train(), 2, 2
    prompt_ids, prompt_mask = left_pad([[1, 5] + [60] * 4 + [7]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def step(pad, eos_in_mask=True):
        tokens = torch.tensor([[9, 11, eos, pad, pad], [13, 9, 17, 21, 23]])
        mask = torch.tensor([[True, True, eos_in_mask, False, False], [True] * 5])
        policy.zero_grad()
        rollout = Rollout(pixels, prompt_ids, prompt_mask, tokens, mask, torch.zeros(2, 5), G)
        stats, finite = update(CompletionLogprobs(policy), rollout, torch.tensor([1.0, -1.0]), micro=1, beta=0.0)
        assert finite
        return stats["loss"], policy.lm_head.weight.grad.clone()

    (loss_a, grad_a), (loss_b, grad_b), (_, grad_no_eos) = step(0), step(37), step(0, eos_in_mask=False)
    assert loss_a == loss_b and torch.equal(grad_a, grad_b)  # padding: no effect at all
    assert (grad_a[eos] - grad_no_eos[eos]).abs().max() > 1e-4  # EOS: its own log-prob term is trained


def test_mu_passes_are_optimizer_steps_from_a_fixed_pi_old():
    """mu = 2: pi_old is one no-grad trainer pass before the first update, so the first pass's ratio is 1 to float
    error (and agrees with the sampler's log-probs); after an optimizer step the second pass's ratio moves off 1 and
    the clip counts it."""
    from nanovalor.generate import left_pad, sample
    from nanovalor.grpo import CompletionLogprobs, Rollout, rollout_logprobs, update

    policy, G = tiny_policy(seed=5).train(), 4
    prompt_ids, prompt_mask = left_pad([[1, 5] + [60] * 4 + [7], [1] + [60] * 4 + [3, 9]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = sample(policy, prompt_ids, prompt_mask, pixels, group_size=G, max_new_tokens=6,
                   generator=torch.Generator().manual_seed(3), eos_token_id=[])
    rollout = Rollout(pixels, prompt_ids, prompt_mask, s.tokens, s.mask, s.logprobs, G)
    scorer, adv = CompletionLogprobs(policy), torch.linspace(-1, 1, 2 * G)
    old = rollout_logprobs(scorer, rollout, micro=1)
    assert not old.requires_grad and (old - s.logprobs).abs().max() < 1e-5  # the sampler's, to float error
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    passes = []
    for _ in range(2):
        stats, finite = update(scorer, rollout, adv, micro=1, old_logp=old, beta=0.0, eps_low=0.01, eps_high=0.01)
        optimizer.step()
        optimizer.zero_grad()
        passes.append(stats)
    assert finite and passes[0]["ratio_dev"] < 1e-5 and passes[0]["clip_frac"] == 0
    assert passes[1]["ratio_dev"] > 1e-2 and passes[1]["clip_frac"] > 0  # pi moved away from pi_old
    assert passes[1]["ratio_err"] > 1e-2  # and away from the sampler


def test_constant_groups_get_exactly_zero_advantages():
    # 0.1 three times: its float mean is 0.1 + 1 ulp, which z-scoring would blow up to ~1e-11 instead of 0.
    r = torch.tensor([[0.1, 0.1, 0.1], [0.1, 0.2, 0.3]])
    for kind in ("zscore", "mean_only", "rloo", "rank"):
        assert torch.equal(group_advantages(r, kind)[0], torch.zeros(3)), kind
    text = torch.tensor([[0.3, 0.5, 0.1], [0.4, 0.4, 0.4]])  # the visual stage's mix: the text term counts too
    adv = group_advantages(torch.tensor([[0.7, 0.7, 0.7], [0.2, 0.2, 0.2]]), "rank", text, 0.5)
    assert (adv[0] != 0).any() and torch.equal(adv[1], torch.zeros(3))
