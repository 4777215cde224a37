"""GRPO for VALOR: group advantages, the clipped + KL policy loss, and rollout assembly.

The objective is DeepSeekMath's GRPO (arXiv 2402.03300, eq. 3) with the per-token clipped importance ratio of PPO
and a KL penalty to a frozen reference policy:

    L = agg_{i,t} [ -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it ],
    r_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)

Choices that are ours, where the VALOR paper (arXiv 2512.16201; only its abstract is public) is silent:
- group size G = 8; eps_low = eps_high = 0.2 (eps_high > eps_low is DAPO's "clip-higher", arXiv 2503.14476);
- KL with Schulman's k3 estimator exp(d) - d - 1, d = log pi_ref - log pi, beta = 0.01 (beta = 0 drops the
  reference model); k1 and k2 available;
- mu = 1 optimisation pass per rollout batch, so pi_old is the sampling policy and the first-pass ratio is 1; with
  mu > 1, pi_old comes from one no-grad trainer forward before the first pass (as TRL's num_iterations) and every
  pass is an optimizer step;
- aggregation "token_mean" over the whole global batch (DAPO), with "seq_mean_token_mean" (the original GRPO) and
  "seq_mean_token_sum_norm" (Dr.GRPO, arXiv 2503.20783: sum over tokens / (sequences * max length));
- advantages: group z-score with the unbiased std + 1e-6 for the text stage (verl's convention; TRL adds 1e-4);
  for the visual stage, ranks mapped to [-1, 1] (the abstract says "rank-normalized"; the mapping is ours),
  optionally plus lambda times the text advantage (lambda = 0 by default).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from nanovalor import lora
from nanovalor.dist import all_sum, autocast, micro_batches, no_sync_unless_last
from nanovalor.generate import SharedPrefix, repeat_for_group
from nanovalor.logprobs import token_logprobs
from nanovalor.weights import local_rows

# -----------------------------------------------------------------------------
# Advantages: rewards (B, G) -> advantages (B, G), one row per prompt group.


def zscore(r, eps=1e-6):
    """(r - mean) / (std + eps), std unbiased. An all-equal group gets 0."""
    return (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)


def mean_only(r):
    """Dr.GRPO: r - mean, no division by std (which up-weights near-constant groups)."""
    return r - r.mean(1, keepdim=True)


def rloo(r):
    """Leave-one-out baseline: r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean)."""
    G = r.shape[1]
    return G / (G - 1) * (r - r.mean(1, keepdim=True))


def rank(r):
    """A_i = 2 * rank_i / (G - 1) - 1 with 0-based ranks in ascending reward, ties given their average rank.
    Spans [-1, 1], sums to 0, ignores the reward's scale (the expert's similarities are uncalibrated), and an
    all-tied group gets 0 everywhere."""
    G = r.shape[1]
    below = (r.unsqueeze(2) > r.unsqueeze(1)).sum(2)  # (B, G): how many rewards are strictly smaller
    ties = (r.unsqueeze(2) == r.unsqueeze(1)).sum(2)  # (B, G): group members with an equal reward, self included
    avg_rank = below + (ties - 1) / 2
    return 2 * avg_rank / (G - 1) - 1


ADVANTAGES = {"zscore": zscore, "mean_only": mean_only, "rloo": rloo, "rank": rank}
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def check_options(group_size, temperature, advantage, kl, agg, eps_low, eps_high, beta, mu):
    """The GRPO options that are wrong, each as a message (an empty list when all are right): for train.py to refuse
    a run before any work rather than fail at its first update."""
    checks = [(group_size >= 2, f"--group_size={group_size}: GRPO compares >= 2 samples per study"),
              (temperature > 0, f"--temperature={temperature}: rollouts sample, T > 0 (greedy rollouts would make "
                                "every group one report, and the log-probs divide by T)"),
              (advantage in ADVANTAGES, f"--advantage={advantage}: expected one of {sorted(ADVANTAGES)}"),
              (kl in KL_ESTIMATORS, f"--kl={kl}: expected one of {KL_ESTIMATORS}"),
              (agg in AGGREGATIONS, f"--agg={agg}: expected one of {AGGREGATIONS}"),
              (min(eps_low, eps_high, beta) >= 0, "--eps_low, --eps_high and --beta must be >= 0"),
              (mu >= 1, f"--mu={mu}: at least one optimisation pass")]
    return [message for ok, message in checks if not ok]


def group_advantages(rewards, kind="zscore", text_rewards=None, text_weight=0.0):
    """rewards (B, G) -> advantages (B, G) of the given kind. The visual stage may add text_weight times the z-scored
    text rewards (B, G) to its rank advantages (A = A_rank + lambda * A_text)."""
    if kind not in ADVANTAGES:
        raise ValueError(f"advantage kind {kind!r}: expected one of {sorted(ADVANTAGES)}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, G) with G >= 2 samples per group, got shape {tuple(rewards.shape)}")
    adv = ADVANTAGES[kind](rewards.double())
    # A group whose rewards are all equal teaches nothing: exactly 0 (a float mean of equal values can miss them
    # by an ulp, which z-scoring would blow up to ~1e-11), so zero-variance groups are found by adv == 0.
    adv = torch.where(_tied(rewards), 0.0, adv)
    if text_weight:
        adv = adv + text_weight * torch.where(_tied(text_rewards), 0.0, zscore(text_rewards.double()))
    return adv.float()


def _tied(r):  # (B, G) -> (B, 1): all G rewards of the group are equal
    return (r.max(1, keepdim=True).values == r.min(1, keepdim=True).values)


# -----------------------------------------------------------------------------
# The policy loss over completion tokens. Every tensor is (N, T): N sequences, T completion positions; mask marks
# the real completion tokens (EOS included, padding excluded).


def kl_estimate(logp, ref_logp, kind="k3", clamp=False):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (http://joschu.net/blog/kl-approx.html).
    clamp=True bounds it as verl does (core_algos.kl_penalty): d = log(pi_ref / pi) clipped to [-20, 20] and
    k3 to at most 10, so one token the policy has made very unlikely under the reference cannot blow the loss up."""
    d = ref_logp - logp  # log(pi_ref / pi)
    if clamp:
        d = d.clamp(-20, 20)
    if kind == "k3" and clamp:
        return (torch.expm1(d) - d).clamp(max=10)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(d) - d  # exp(d) - 1 - d, >= 0, unbiased, low variance
    raise ValueError(f"kl estimator {kind!r}: expected 'k1', 'k2' or 'k3'")


def policy_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.01, kl="k3",
                kl_clamp=False, agg="token_mean", total_tokens=None, total_seqs=None, max_len=None, entropy=None):
    """The GRPO loss of one micro-batch, normalised so that summing it over the micro-batches (and ranks) of a global
    batch gives the loss of the whole batch.

    logp (N, T) requires grad; old_logp, ref_logp (N, T) do not (ref_logp may be None when beta == 0);
    advantages (N,); mask (N, T) bool. total_tokens / total_seqs are the valid-token and sequence counts of the
    *global* batch (all micro-batches, all ranks): they default to this call's own counts. max_len is the
    completion budget for "seq_mean_token_sum_norm". entropy (N, T), optional, is only logged.
    Returns (loss, stats) with stats averaged over this call's valid tokens.
    """
    mask = mask.bool()
    # Log-ratios only where the token is real: padding may hold -inf or garbage log-probs, and inf * 0 = nan (a pain
    # point of several GRPO codebases). Zeroing them first with torch.where keeps every later value finite and the
    # gradient at padded positions exactly 0.
    logp = torch.where(mask, logp, 0.0)
    old_logp = torch.where(mask, old_logp, 0.0)
    ratio = torch.exp(logp - old_logp)
    A = advantages.view(-1, 1)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.minimum(ratio * A, clipped * A)  # (N, T)
    kl_tok = None
    if beta:
        kl_tok = kl_estimate(logp, torch.where(mask, ref_logp, 0.0), kl, kl_clamp)  # 0 at padding
        per_token = per_token + beta * kl_tok
    per_token = torch.where(mask, per_token, 0.0)

    n_tok = mask.sum(1)  # (N,)
    if agg == "token_mean":
        loss = per_token.sum() / (total_tokens if total_tokens is not None else n_tok.sum().clamp(min=1))
    elif agg == "seq_mean_token_mean":
        per_seq = per_token.sum(1) / n_tok.clamp(min=1)
        loss = per_seq.sum() / (total_seqs if total_seqs is not None else len(per_seq))
    elif agg == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("agg 'seq_mean_token_sum_norm' (Dr.GRPO) needs max_len, the completion length budget")
        loss = per_token.sum() / ((total_seqs if total_seqs is not None else mask.shape[0]) * max_len)
    else:
        raise ValueError(f"agg {agg!r}: expected 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum_norm'")

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))  # where the clip bites
        stats = {
            "clip_frac": (is_clipped & mask).sum() / n,
            "ratio_dev": torch.where(mask, (ratio - 1).abs(), 0.0).max() if ratio.numel() else ratio.new_zeros(()),
            "kl": (kl_tok.sum() / n) if kl_tok is not None else ratio.new_zeros(()),
            "tokens": mask.sum(),
        }
        if entropy is not None:
            stats["entropy"] = torch.where(mask, entropy, 0.0).sum() / n
    return loss, stats


# -----------------------------------------------------------------------------
# Teacher-forced log-probs of sampled completions: GRPO's policy and reference passes and the SFT loss share it.

class CompletionLogprobs(nn.Module):
    """policy -> per-token log-probs (and entropies) of given completions, computed from the hidden states of the
    completion positions only with the fused LM-head op (logprobs.py), never the (N, T, V) logits.

    A group's G completions share their prompt (hundreds of image tokens in VALOR): by default the prompt goes
    through the decoder once per group and the G completions attend to its keys and values (SharedPrefix), as the
    sampler does; backward sends all G completions' gradients into that one prompt pass. With gradient checkpointing
    (or share_prefix=False) each completion runs with its own copy of the prompt instead; both give the same numbers.

    A module of its own so that DDP and FSDP wrap the one forward every training pass goes through: their gradient
    and resharding hooks only run on forward, and the image encoding (the projector trains in the visual stage)
    must happen inside it."""

    def __init__(self, policy, share_prefix=True):
        super().__init__()
        self.policy, self.share_prefix = policy, share_prefix

    def forward(self, pixels, prompt_ids, prompt_mask, tokens, mask, group_size=1, temperature=1.0, entropy=False):
        """pixels (n_images, 3, S, S) for B left-padded prompts (B, Tp); tokens, mask (B*G, Tc) right-padded
        completions, rows b*G .. b*G+G-1 answering prompt b. Returns logp (B*G, Tc) fp32, 0 at padding, and with
        entropy=True also the entropy of each position's distribution (B*G, Tc)."""
        policy, G = self.policy, group_size
        embeds = policy.encode_images(pixels)  # (n_images, P, D): each image through the ViT once
        # The hidden state at position t predicts token t + 1: the last prompt position predicts the first completion
        # token, and the last completion token predicts nothing, so it is not fed.
        attn = torch.cat([prompt_mask.repeat_interleave(G, 0).bool(), mask[:, :-1]], 1)  # (B*G, Tp + Tc - 1)
        if self.share_prefix and not policy.language_model.gradient_checkpointing:
            shared = SharedPrefix()
            prompt = policy.hidden_states(prompt_ids, image_embeds=embeds, attention_mask=prompt_mask, cache=shared)
            hidden = prompt[:, -1:].repeat_interleave(G, 0)  # (B*G, 1, D): predicts each first completion token
            if tokens.shape[1] > 1:
                rest = policy.hidden_states(tokens[:, :-1], attention_mask=attn, cache=shared)  # (B*G, Tc - 1, D)
                hidden = torch.cat([hidden, rest], 1)
            hidden = hidden[mask]  # (n, D)
        else:
            ids = torch.cat([prompt_ids.repeat_interleave(G, 0), tokens[:, :-1]], 1)  # (B*G, Tp + Tc - 1)
            Tp = prompt_ids.shape[1]
            select = torch.cat([torch.zeros_like(ids[:, :Tp - 1], dtype=torch.bool), mask], 1)
            embeds = repeat_for_group(embeds, prompt_ids, policy.cfg, G)
            hidden = policy.hidden_states(ids, image_embeds=embeds, attention_mask=attn, select=select)  # (n, D)
        weight = policy.lm_head.weight.to(hidden.dtype)  # under bf16 autocast the fp32 master weight is cast, once
        out = token_logprobs(hidden, weight, tokens[mask], temperature, entropy)
        scatter = lambda values: torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, values)
        return tuple(scatter(o) for o in out) if entropy else scatter(out)


def reference_model(policy):
    """The frozen reference policy of the KL term, the stage's starting policy, as a context in which the policy
    itself computes it: `with reference(scorer): scorer(...)`. It keeps a copy of the trainable parameters as they
    are now (under FSDP2 this rank's shards only), swaps it in on entry and back on exit, and turns LoRA adapters
    off; every frozen parameter is the policy's own. The memory cost is that copy: the projector alone in the visual
    stage, nothing of a LoRA-trained decoder (its base is the reference), never a second model."""
    adapter = set(lora.adapter_names(policy))
    saved = [(p, local_rows(p)[0].clone()) for name, p in policy.named_parameters()
             if p.requires_grad and name not in adapter]

    def exchange():  # one parameter at a time: a parameter's size of extra memory at most
        for p, other in saved:
            mine = local_rows(p)[0]  # read again each time: FSDP2 may re-point its shard at lazy init
            kept = mine.clone()
            mine.copy_(other)
            other.copy_(kept)

    def reshard(module):  # FSDP2 keeps the root's gathered parameters after a no-grad forward: drop them, so that
        from torch.distributed.fsdp import FSDPModule  # the next forward gathers the shards as they are now
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextmanager
    def context(scorer):
        with torch.no_grad(), lora.disabled(policy):
            reshard(scorer)
            exchange()
            try:
                yield
            finally:
                reshard(scorer)
                exchange()
    return context


# -----------------------------------------------------------------------------
# One optimisation pass over a batch of rollouts.

@dataclass
class Rollout:
    """B studies' prompts and the G completions sampled for each: rows b*G .. b*G+G-1 of the (B*G, Tc) tensors
    answer study b."""
    pixels: torch.Tensor  # (B, 3, S, S): each study's X-ray, as the policy preprocesses it
    prompt_ids: torch.Tensor  # (B, Tp), left-padded
    prompt_mask: torch.Tensor  # (B, Tp)
    tokens: torch.Tensor  # (B*G, Tc), right-padded
    mask: torch.Tensor  # (B*G, Tc): the real completion tokens, EOS included, padding not
    logprobs: torch.Tensor  # (B*G, Tc): the sampler's, as it sampled (0 at padding)
    group_size: int

    def micro(self, s):
        """Micro-batch s (a slice of studies): the arguments of CompletionLogprobs.forward."""
        r = slice(s.start * self.group_size, s.stop * self.group_size)
        return (self.pixels[s], self.prompt_ids[s], self.prompt_mask[s], self.tokens[r], self.mask[r],
                self.group_size)


@torch.no_grad()
def rollout_logprobs(module, rollout, micro, temperature=1.0):
    """Teacher-forced log-probs (B*G, Tc) of the rollout's completions under `module` (a CompletionLogprobs, or its
    DDP / FSDP wrapper), without a graph: the reference policy's, and pi_old's when mu > 1."""
    with autocast(rollout.tokens.device):
        return torch.cat([module(*rollout.micro(s), temperature) for s in micro_batches(len(rollout.prompt_ids),
                                                                                        micro)])


def reference_logprobs(reference, scorer, rollout, micro, temperature=1.0):
    """The reference policy's log-probs (B*G, Tc) of the rollout: the policy's own scorer with its starting weights
    swapped in (reference = reference_model(policy)); None when there is no reference (beta = 0)."""
    if reference is None:
        return None
    with reference(scorer):
        return rollout_logprobs(scorer, rollout, micro, temperature)


def update(scorer, rollout, advantages, micro, world=1, temperature=1.0, old_logp=None, ref_logp=None,
           **loss_options):
    """One optimisation pass: accumulate the GRPO gradient of this rank's groups; the caller clips and steps the
    optimizer (once per pass: mu passes are mu steps).

    scorer: the policy's CompletionLogprobs (DDP / FSDP wrapped or not); rollout: this rank's B groups; advantages
    (B*G,); old_logp (B*G, Tc): pi_old, the policy before the first pass (rollout_logprobs), or None on a single
    pass, where pi_old = pi (detached) and the ratio is exactly 1; ref_logp (B*G, Tc): the reference policy's, or
    None when beta = 0. Micro-batches of `micro` groups each run one forward and backward; the loss is normalised
    by the token and sequence counts of the *global* batch (all micro-batches, all ranks) and multiplied by `world`
    (DDP averages gradients over ranks), so any split of one global batch over ranks and accumulation steps gives
    the same gradient. Returns (stats, finite); ratio_err is the largest |log pi - log pi_sampler| over the batch,
    the trainer's disagreement with the sampler (float error on the first pass)."""
    G, mask, device = rollout.group_size, rollout.mask, rollout.tokens.device
    # Every completion holds at least one token (its first, EOS or not): a row without any is one dynamic sampling
    # took out of the loss, and it leaves the sequence count too.
    total_tokens, total_seqs = all_sum(mask.sum(), device), all_sum(mask.any(1).sum(), device)
    parts = micro_batches(len(rollout.prompt_ids), micro)
    # Running sums stay on the device: reading a value to the host each micro-batch would stall the GPU queue.
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = dict.fromkeys(("loss", "kl", "clip_frac", "entropy"), zero)
    ratio_err, ratio_dev = zero, zero
    finite = torch.ones((), dtype=torch.bool, device=device)
    for i, s in enumerate(parts):
        r = slice(s.start * G, s.stop * G)
        with no_sync_unless_last(scorer, i, len(parts)), autocast(device):
            logp, ent = scorer(*rollout.micro(s), temperature, True)
            old = logp.detach() if old_logp is None else old_logp[r]
            loss, st = policy_loss(logp, old, None if ref_logp is None else ref_logp[r], advantages[r], mask[r],
                                   total_tokens=total_tokens, total_seqs=total_seqs, entropy=ent.detach(),
                                   **loss_options)
            (loss * world).backward()
        finite &= torch.isfinite(loss)
        sums["loss"] = sums["loss"] + loss.detach().double()
        for k in ("kl", "clip_frac", "entropy"):  # token-weighted means over the global batch
            sums[k] = sums[k] + st[k].double() * st["tokens"] / total_tokens
        err = torch.where(mask[r], (logp.detach() - rollout.logprobs[r]).abs(), 0).max().double()
        ratio_err, ratio_dev = torch.maximum(ratio_err, err), torch.maximum(ratio_dev, st["ratio_dev"].double())
    stats = dict(zip(sums, all_sum(torch.stack(list(sums.values())), device).tolist()))
    return stats | {"ratio_err": float(ratio_err), "ratio_dev": float(ratio_dev)}, bool(finite)
