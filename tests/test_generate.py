"""nanovalor.generate: the KV-cached group sampler against the naive sampler, transformers' generate, and the
teacher-forced log-probs the GRPO trainer computes.

    python -m pytest -q tests/test_generate.py

Tiny random LLaVA models come from tests/test_policy.py's builder (transformers, no download).
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_policy import IMAGE, VOCAB, build, prompt_ids

from nanovalor.generate import (GroupKVCache, KVCache, filter_logits, left_pad, repeat_for_group, sample, sample_naive,
                                sample_token)
from nanovalor.policy import load


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in ("clip_llama", "siglip_qwen2"):
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = build(kind, folder, seed=2), load(folder)
    return out


def prompts(lengths=((3, 9), (2, 4))):
    """Left-padded prompts of different lengths, each with one image: ids (B, T), mask (B, T), pixels (B, 3, 35, 35)."""
    ids, mask = left_pad([prompt_ids(a, b, seed=i).tolist() for i, (a, b) in enumerate(lengths)])
    return ids, mask, torch.randn(len(lengths), 3, 35, 35, generator=torch.Generator().manual_seed(0))


def test_left_pad_and_right_padding_is_refused(models):
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="left-padded"):
        sample(models["clip_llama"][1], torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize("kind", ["clip_llama", "siglip_qwen2"])
def test_greedy_matches_transformers_generate(models, kind):
    hf, ours = models[kind]
    ids, mask, pixels = prompts()
    hf.generation_config.eos_token_id = None  # no EOS: 20 tokens each
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False, max_new_tokens=20,
                          pad_token_id=0)[:, ids.shape[1]:]
    out = sample(ours, ids, mask, pixel_values=pixels, max_new_tokens=20, temperature=0, eos_token_id=[])
    assert ref.shape == (2, 20) and (ref[:, 1:] != ref[:, :-1]).any()  # not one token repeated
    assert torch.equal(out.tokens, ref) and out.mask.all()


def _first(row, eos):  # index of the first EOS in a list of tokens, or None
    return next((i for i, t in enumerate(row) if t in eos), None)


def test_cached_equals_naive_greedy_with_rows_stopping_at_different_steps(models):
    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts(((3, 9), (2, 4), (1, 1)))
    free = sample_naive(ours, ids, mask, pixels, max_new_tokens=12, temperature=0, eos_token_id=[]).tokens.tolist()
    # EOS := two tokens of the free run with which the three rows stop at three different steps (or not at all)
    seen = sorted({t for row in free for t in row})
    eos = next([a, b] for a in seen for b in seen
               if len({_first(row, {a, b}) for row in free}) == 3 and None in {_first(row, {a, b}) for row in free})
    stops = [_first(row, eos) for row in free]
    naive = sample_naive(ours, ids, mask, pixels, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=7)
    cached = sample(ours, ids, mask, pixels, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(cached.tokens, naive.tokens) and torch.equal(cached.mask, naive.mask)
    torch.testing.assert_close(cached.logprobs, naive.logprobs, rtol=0, atol=1e-5)
    assert cached.mask.sum(1).tolist() == [12 if s is None else s + 1 for s in stops]  # EOS included
    for row, stop in enumerate(stops):
        if stop is not None:
            assert (cached.tokens[row, stop + 1:] == 7).all() and (cached.logprobs[row, stop + 1:] == 0).all()
            assert cached.tokens[row, :stop + 1].tolist() == free[row][:stop + 1]


def test_cached_group_sampler_equals_naive_under_sampling(models):
    """Same generator, same draws: top-k and top-p sampling at T = 0.7 in group mode give identical samples."""
    _, ours = models["siglip_qwen2"]
    ids, mask, pixels = prompts()
    kw = dict(group_size=3, max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9, eos_token_id=[11, 12])
    cached = sample(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(3), **kw)
    naive = sample_naive(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(3), **kw)
    assert cached.tokens.shape == (6, 10)
    assert torch.equal(cached.tokens, naive.tokens) and torch.equal(cached.mask, naive.mask)
    torch.testing.assert_close(cached.logprobs, naive.logprobs, rtol=0, atol=1e-5)
    assert not torch.equal(cached.tokens[0], cached.tokens[1])  # a group's rows differ
    again = sample(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(3), **kw)
    other = sample(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(again.tokens, cached.tokens) and not torch.equal(other.tokens, cached.tokens)


def test_rows_that_stop_leave_the_decode_batch_and_change_no_other_row(models):
    """Sampling (T = 1, a generator per group) with EOS tokens that end rows at different steps: finished rows leave
    the decode batch (the decoder sees fewer rows), yet every row's tokens are those of the naive sampler and, up to
    its EOS, those of a run where no row stops (a row's draws do not depend on which others are still running)."""
    _, ours = models["siglip_qwen2"]
    ids, mask, pixels = prompts(((3, 9), (2, 4), (1, 1)))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (20, 21, 22)]
    kw = dict(group_size=4, max_new_tokens=12, temperature=1.0, pad_token_id=7)
    free = sample(ours, ids, mask, pixels, generator=gens(), eos_token_id=[], **kw).tokens.tolist()
    # EOS := the tokens that rows 0..5 drew at steps 1..6 (rows 6..11 run on unless they draw one of them too)
    eos = sorted({free[row][row + 1] for row in range(6)})
    stops = [_first(row, eos) for row in free]
    assert len(set(stops)) >= 4  # rows stop at several different steps, some not at all
    batch_sizes = []
    hook = ours.language_model.register_forward_hook(lambda m, i, o: batch_sizes.append(i[0].shape[0]))
    try:
        cached = sample(ours, ids, mask, pixels, generator=gens(), eos_token_id=eos, **kw)
    finally:
        hook.remove()
    naive = sample_naive(ours, ids, mask, pixels, generator=gens(), eos_token_id=eos, **kw)
    assert torch.equal(cached.tokens, naive.tokens) and torch.equal(cached.mask, naive.mask)
    torch.testing.assert_close(cached.logprobs, naive.logprobs, rtol=0, atol=1e-5)
    running = [sum(1 for s in stops if s is None or s >= step) for step in range(cached.tokens.shape[1])]
    assert batch_sizes == [3] + running[1:]  # the prefill (3 prompts), then the rows still running at each step
    for row, stop in enumerate(stops):
        n = cached.tokens.shape[1] if stop is None else stop + 1
        assert cached.tokens[row, :n].tolist() == free[row][:n] and cached.mask[row].sum() == n
        assert (cached.tokens[row, n:] == 7).all() and (cached.logprobs[row, n:] == 0).all()


def test_one_generator_per_group_makes_a_group_independent_of_its_batch(models):
    """With a generator per prompt, a group's samples are the same whether its prompt is sampled alone or beside
    others (what lets DDP runs on any number of ranks draw the same rollouts)."""
    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts()
    kw = dict(group_size=4, max_new_tokens=8, temperature=1.0, eos_token_id=[11])
    both = sample(ours, ids, mask, pixels, generator=[torch.Generator().manual_seed(s) for s in (10, 11)], **kw)
    alone_ids, alone_mask = left_pad([ids[1][mask[1].bool()].tolist()])
    alone = sample(ours, alone_ids, alone_mask, pixels[1:], generator=[torch.Generator().manual_seed(11)], **kw)
    n = alone.tokens.shape[1]
    assert torch.equal(both.tokens[4:, :n], alone.tokens) and torch.equal(both.mask[4:, :n], alone.mask)
    assert not both.mask[4:, n:].any()  # the longer batch ran on only for the other group
    assert not torch.equal(both.tokens[:4], both.tokens[4:])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recorded_logprobs_equal_teacher_forced_logprobs(models, temperature):
    """GRPO's first-pass ratio is 1: the sampler's log-probs are what a teacher-forced forward over prompt
    (left-padded) + completion (right-padded after EOS) gives, through logits and through the hidden-states path."""
    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts()
    G = 3
    out = sample(ours, ids, mask, pixels, group_size=G, max_new_tokens=15, temperature=temperature,
                 eos_token_id=list(range(40)), generator=torch.Generator().manual_seed(0))
    assert 0 < (~out.mask).sum() and out.mask[:, 0].all()  # some rows stopped early
    full = torch.cat([ids.repeat_interleave(G, 0), out.tokens], 1)  # (B*G, T + N)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), out.mask.long()], 1)
    T = ids.shape[1]
    with torch.no_grad():
        logits = ours(full, pixels.repeat_interleave(G, 0), attention_mask=full_mask)[:, T - 1:-1]  # predicts tokens
        teacher = F.log_softmax(logits / temperature, -1).gather(2, out.tokens[..., None])[..., 0]
        select = torch.zeros_like(full_mask, dtype=torch.bool)
        select[:, T - 1:-1] = out.mask  # the positions before each completion token
        hidden = ours.hidden_states(full, image_embeds=ours.encode_images(pixels).repeat_interleave(G, 0),
                                    attention_mask=full_mask, select=select)  # (n_tokens, D)
        fused = F.log_softmax(hidden @ ours.lm_head.weight.T / temperature, -1).gather(
            1, out.tokens[out.mask][:, None])[:, 0]
    torch.testing.assert_close(out.logprobs[out.mask], teacher[out.mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logprobs[out.mask], fused, rtol=0, atol=1e-5)


def test_prompts_with_several_images(models):
    """A study with two views: two image blocks in one prompt; image rows follow the order of the image tokens."""
    _, ours = models["clip_llama"]
    two_views = torch.cat([prompt_ids(2, 3, seed=5), prompt_ids(0, 4, seed=6)])
    ids, mask = left_pad([two_views.tolist(), prompt_ids(3, 2, seed=7).tolist()])
    pixels = torch.randn(3, 3, 35, 35)  # study 0: images 0 and 1; study 1: image 2
    assert torch.equal(repeat_for_group(pixels, ids, ours.cfg, 2), pixels[[0, 1, 0, 1, 2, 2]])
    kw = dict(group_size=2, max_new_tokens=6, eos_token_id=[])
    cached = sample(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(0), **kw)
    naive = sample_naive(ours, ids, mask, pixels, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(cached.tokens, naive.tokens)
    full = torch.cat([ids.repeat_interleave(2, 0), cached.tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), cached.mask.long()], 1)
    with torch.no_grad():
        logits = ours(full, repeat_for_group(pixels, ids, ours.cfg, 2), attention_mask=full_mask)
    teacher = F.log_softmax(logits[:, ids.shape[1] - 1:-1], -1).gather(2, cached.tokens[..., None])[..., 0]
    torch.testing.assert_close(cached.logprobs, teacher, rtol=0, atol=1e-5)


def test_group_mode_runs_the_vit_once_and_prefills_once(models):
    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts()
    vit_batches, decoder_lengths = [], []
    hooks = [ours.vision_tower.register_forward_hook(lambda m, i, o: vit_batches.append(i[0].shape[0])),
             ours.language_model.register_forward_hook(lambda m, i, o: decoder_lengths.append(tuple(i[0].shape[:2])))]
    try:
        sample(ours, ids, mask, pixels, group_size=8, max_new_tokens=4, eos_token_id=[])
    finally:
        [h.remove() for h in hooks]
    assert vit_batches == [2]  # both images, once
    assert decoder_lengths == [(2, ids.shape[1]), (16, 1), (16, 1), (16, 1)]  # one prefill, then G * B rows


def test_group_cache_attention_equals_attention_over_the_copied_prefix():
    """Shared-prefix attention (prompt keys stored once per group, one softmax over prompt and own tokens) equals
    plain attention of every row over its own copy of the prompt followed by its own tokens (GQA, left padding)."""
    torch.manual_seed(0)
    B, G, H, H_kv, T, hd = 2, 3, 6, 2, 5, 4
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    prefix = KVCache(SimpleNamespace(num_kv_heads=H_kv, head_dim=hd, num_layers=1), B, T, torch.float32, "cpu")
    k, v = torch.randn(B, H_kv, T, hd), torch.randn(B, H_kv, T, hd)
    prefix.attend(0, torch.randn(B, H, T, hd), k, v, None)
    prefix.length = T
    cache = GroupKVCache(prefix, G, capacity=4)
    all_k, all_v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)  # (B*G, H_kv, T, hd): the copied prefix
    for step in range(4):
        q, k_new, v_new = torch.randn(B * G, H, 1, hd), torch.randn(B * G, H_kv, 1, hd), torch.randn(B * G, H_kv, 1, hd)
        valid = torch.cat([prompt_mask.repeat_interleave(G, 0), torch.ones(B * G, step + 1, dtype=torch.long)], 1)
        valid = valid.bool()[:, None, None, :]  # (B*G, 1, 1, T + step + 1): what policy.attention_mask_4d gives
        ours = cache.attend(0, q, k_new, v_new, valid)
        cache.length += 1
        all_k, all_v = torch.cat([all_k, k_new], 2), torch.cat([all_v, v_new], 2)
        ref = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=valid, enable_gqa=True)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_shared_prefix_attention_over_several_tokens_equals_attention_over_the_copied_prefix():
    """The training-time case (grpo.SharedPrefix): T completion tokens per row at once, causal among themselves,
    after a left-padded prompt; GQA with 3 query heads per key head."""
    from nanovalor.generate import shared_prefix_attention
    from nanovalor.decoder import attention_mask_4d

    torch.manual_seed(0)
    B, G, H, H_kv, Tp, T, hd = 2, 3, 6, 2, 4, 5, 4
    pk, pv = torch.randn(B, H_kv, Tp, hd), torch.randn(B, H_kv, Tp, hd)
    q, k, v = torch.randn(B * G, H, T, hd), torch.randn(B * G, H_kv, T, hd), torch.randn(B * G, H_kv, T, hd)
    valid = torch.cat([torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).repeat_interleave(G, 0),
                       (torch.arange(T) < torch.tensor([5, 2, 5, 3, 1, 4])[:, None]).long()], 1)  # (B*G, Tp + T)
    mask = attention_mask_4d(valid, T, Tp, "cpu")  # (B*G, 1, T, Tp + T)
    ours = shared_prefix_attention(q, pk, pv, k, v, mask)
    all_k, all_v = torch.cat([pk.repeat_interleave(G, 0), k], 2), torch.cat([pv.repeat_interleave(G, 0), v], 2)
    ref = F.scaled_dot_product_attention(q, all_k, all_v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_filter_logits_on_hand_numbers():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logp, **kw))[0].tolist()
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.2) == [True, False, False, False]  # the top token always stays
    assert kept(top_k=3) == [True, True, True, False]
    assert kept(top_k=3, top_p=0.6) == [True, True, False, False]
    assert kept() == [True] * 4


def test_sample_token_draws_from_the_tempered_distribution():
    """20000 draws: frequencies follow softmax(logits / T) (renormalised over the kept set with top_p); the
    recorded log-prob is always the unrestricted one."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    p = F.softmax(logits[0] / 0.7, -1)  # 0.754, 0.181, 0.043, 0.010
    tokens, logprobs = sample_token(logits, temperature=0.7, generator=g)
    torch.testing.assert_close(torch.bincount(tokens, minlength=4) / 20000, p, rtol=0, atol=0.01)
    torch.testing.assert_close(logprobs, p.log()[tokens])
    tokens, logprobs = sample_token(logits, temperature=0.7, top_p=0.9, generator=g)  # keeps {0, 1}
    kept = torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)])
    torch.testing.assert_close(torch.bincount(tokens, minlength=4) / 20000, kept, rtol=0, atol=0.01)
    torch.testing.assert_close(logprobs, p.log()[tokens])
    tokens, logprobs = sample_token(logits[:3], temperature=0)
    assert tokens.tolist() == [0, 0, 0]
    torch.testing.assert_close(logprobs, F.log_softmax(logits[0], -1)[[0, 0, 0]])
    tokens, _ = sample_token(logits[:3], temperature=0, banned=torch.tensor([0]))
    assert tokens.tolist() == [1, 1, 1]


def test_the_image_token_is_never_sampled(models):
    """Its embedding slot is for image features only; sampling it would break the next forward."""
    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts()
    saved = ours.lm_head.weight[IMAGE].clone()
    # make <image> the likeliest token everywhere: hidden dim 0 shifted by +10, read by <image>'s row alone
    hook = ours.language_model.norm.register_forward_hook(lambda m, i, out: out + F.one_hot(torch.tensor(0), 60) * 10)
    with torch.no_grad():
        ours.lm_head.weight[IMAGE] = F.one_hot(torch.tensor(0), 60) * 100.0
        try:
            out = sample(ours, ids, mask, pixels, group_size=2, max_new_tokens=5, temperature=0, eos_token_id=[])
            logits = ours(ids, pixels, attention_mask=mask)[:, -1]
        finally:
            hook.remove()
            ours.lm_head.weight[IMAGE] = saved
    assert (logits.argmax(-1) == IMAGE).all() and not (out.tokens == IMAGE).any()
    assert out.tokens.max() < VOCAB


def test_bfloat16_weights_sample_with_fp32_logprobs(models, tmp_path):
    """bf16 weights (the CUDA default) on CPU: the sampler applies the LM head in fp32, as logprobs.py does, so
    its log-probs are fp32 and agree with a teacher-forced bf16 forward to bf16 precision."""
    hf, _ = models["clip_llama"]
    hf.save_pretrained(tmp_path)
    ours = load(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids, mask, pixels = prompts()
    out = sample(ours, ids, mask, pixels, group_size=2, max_new_tokens=6, eos_token_id=[],
                 generator=torch.Generator().manual_seed(0))
    assert out.logprobs.dtype == torch.float32
    full = torch.cat([ids.repeat_interleave(2, 0), out.tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), out.mask.long()], 1)
    with torch.no_grad():
        hidden = ours.hidden_states(full, pixels.repeat_interleave(2, 0), attention_mask=full_mask)
    logits = hidden[:, ids.shape[1] - 1:-1].float() @ ours.lm_head.weight.float().T
    teacher = F.log_softmax(logits, -1).gather(2, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.logprobs, teacher, rtol=0, atol=0.1)


def test_lm_head_runs_in_fp32_under_bf16_autocast(models):
    """Under bf16 autocast (how train.py samples on CUDA) the LM head and the draw stay fp32, as the trainer's fused
    op: the recorded log-probs equal token_logprobs of the very hidden states the sampler produced (captured at the
    final norm), not a bf16 rounding of them (0.02 off before the fix)."""
    from nanovalor.logprobs import token_logprobs

    _, ours = models["clip_llama"]
    ids, mask, pixels = prompts()
    G, N = 3, 6
    seen = []
    hook = ours.language_model.norm.register_forward_hook(lambda m, i, out: seen.append(out[:, -1]))
    try:
        with torch.autocast("cpu", torch.bfloat16):
            out = sample(ours, ids, mask, pixels, group_size=G, max_new_tokens=N, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    # seen: the prefill's last positions (B, D), then one (B*G, D) per decode step; row r, step s -> hidden[s, r]
    hidden = torch.stack([seen[0].repeat_interleave(G, 0)] + seen[1:], 1)  # (B*G, N, D)
    assert hidden.shape[:2] == out.tokens.shape and hidden.dtype == torch.float32
    fused = token_logprobs(hidden.flatten(0, 1), ours.lm_head.weight, out.tokens.flatten()).view_as(out.logprobs)
    assert out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs, fused, rtol=0, atol=1e-5)
    # rows that stop leave the batch under autocast too (bf16 keys and values go into the fp32 cache)
    eos = sorted({t for row in out.tokens[:, 1:4].tolist() for t in row})[:4]
    with torch.autocast("cpu", torch.bfloat16):
        stopped = sample(ours, ids, mask, pixels, group_size=G, max_new_tokens=N, eos_token_id=eos,
                         generator=torch.Generator().manual_seed(0))
    n = stopped.mask.shape[1]
    assert not stopped.mask.all()
    assert torch.equal(stopped.tokens[stopped.mask], out.tokens[:, :n][stopped.mask])  # the same draws up to EOS
