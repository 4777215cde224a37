"""From questions to sampled reports: tokenizer, chat formats, and the KV-cached group sampler (+ naive reference).

    tok = load_tokenizer(model.source)
    prompts = [chat_prompt(model.cfg, question) for question in questions]
    ids, mask = left_pad([encode_prompt(tok, prompt, model.cfg) for prompt in prompts])
    out = sample(model, ids, mask, pixel_values=images, group_size=8, max_new_tokens=128,
                 generator=torch.Generator().manual_seed(0))
    out.tokens, out.mask, out.logprobs  # each (B*G, N); rows b*G .. b*G+G-1 answer prompt b

Group mode: each image goes through the ViT once, image + prompt are prefilled once per prompt, and the G rows
of a group then share that prefix's keys and values (GroupKVCache: stored once, read once per group), so a
group costs one prefill and one prefix read per step, not G. Every row stops at its own EOS and then leaves the
decode batch (the decoder runs on the rows still going); the loop ends when all rows have stopped or after
max_new_tokens.

Log-probs: each sampled token's log-prob is log softmax(logits / T)[token] over the whole vocabulary, in fp32 (on
bf16 weights, and under bf16 autocast, the LM head is applied in fp32, as logprobs.token_logprobs does): what the
trainer computes for the same token, so GRPO's first-pass ratio is 1 (to 1e-5 in fp32; on bf16 weights the cached
and the full forward round differently, to bf16 precision). top_k / top_p (and the ban on the image placeholder
token, whose embedding slot only image features may fill) restrict which tokens can be drawn; the recorded log-prob
stays the unrestricted one, so with top_p < 1 or top_k > 0 rollouts are slightly off-policy (the usual GRPO setting
is T = 1, top_p = 1, top_k = 0). Greedy (temperature 0) records log-probs at T = 1.

`sample_naive` runs the whole sequence through the model at every step (no cache, no sharing, the prompt
repeated G times up front); it draws random numbers in the same order, so with the same generator both samplers
give the same tokens. Speed: `python bench/sample.py`.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanovalor.weights import read_tokenizer, resolve, token_ids

# -----------------------------------------------------------------------------
# Prompts: the tokenizer, the chat format of each model family, and token ids in transformers' Llava convention.
# "<image>" in a prompt marks where the image features go.

IMAGE = "<image>"
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def vicuna_prompt(question, system=VICUNA_SYSTEM):
    """LLaVA-1.5 (Vicuna v1): "<system> USER: <image>\\n<question> ASSISTANT:" (system="" drops it, as llava-hf)."""
    return f"{system} USER: {IMAGE}\n{question} ASSISTANT:".lstrip()


def mistral_prompt(question):
    """Mistral instruct, as LLaVA-Med v1.5 was trained (LLaVA's conv_mistral_instruct; BOS comes from the tokenizer)."""
    return f"[INST] {IMAGE}\n{question} [/INST]"


def chatml_prompt(question, system="You are a helpful assistant."):
    """ChatML (Qwen2): system turn, user turn with the image, open assistant turn."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{IMAGE}\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def short_prompt(question):
    """Vicuna's turns without the system sentence: what the phantom world's tiny models are trained with."""
    return vicuna_prompt(question, system="")


def qwen2_vl_prompt(question, system="You are a helpful assistant."):
    """Qwen2-VL / Qwen2.5-VL's chat template: ChatML with the image between <|vision_start|> and <|vision_end|>,
    the question right after it."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|>{IMAGE}<|vision_end|>"
            f"{question}<|im_end|>\n<|im_start|>assistant\n")


CHAT_FORMATS = {"vicuna": vicuna_prompt, "mistral": mistral_prompt, "chatml": chatml_prompt, "short": short_prompt,
                "qwen2_vl": qwen2_vl_prompt}
FAMILY_FORMATS = {"llama": "vicuna", "mistral": "mistral", "qwen2": "chatml"}  # "auto": by decoder type


def chat_prompt(cfg, question):
    """The prompt text for `question` in the chat format of a model (cfg: policy.LlavaConfig)."""
    name = FAMILY_FORMATS[cfg.text.model_type] if cfg.chat_format == "auto" else cfg.chat_format
    if name not in CHAT_FORMATS:
        raise ValueError(f"chat_format {name!r}: expected 'auto' or one of {sorted(CHAT_FORMATS)}")
    return CHAT_FORMATS[name](question)


def load_tokenizer(path_or_repo_id):
    """tokenizers.Tokenizer from tokenizer.json in a folder or hub repo (resolved as load() does)."""
    path = resolve(path_or_repo_id) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing. nanovalor reads only tokenizer.json; for a sentencepiece-only "
                                f"repo use the tokenizer.json of its base LLM (same vocabulary)")
    return read_tokenizer(path)


def encode_prompt(tokenizer, prompt, cfg, image_tokens=None):
    """Token ids of `prompt` with each "<image>" replaced by cfg.image_token_id (cfg: policy.LlavaConfig or
    qwen_vl.QwenVLConfig) repeated as many times as that image has tokens: image_tokens[k] for the k-th "<image>"
    (Qwen2.5-VL: each image's own count, cfg.image_tokens(images)), by default cfg.num_image_tokens (LLaVA: fixed).
    A tokenizer that knows "<image>" as that id (llava-hf) encodes the whole text; otherwise (original LLaVA,
    Qwen2.5-VL) each piece between images is encoded on its own, special tokens on the first only, as LLaVA's
    tokenizer_image_token does."""
    image = cfg.image_token_id
    if image_tokens is None:  # every image the same (a Qwen2.5-VL config refuses: its counts vary)
        image_tokens = [cfg.num_image_tokens] * prompt.count(IMAGE) if IMAGE in prompt else []
    counts = iter(image_tokens)
    if tokenizer.token_to_id(IMAGE) == image:
        return [t for i in tokenizer.encode(prompt).ids for t in ([i] * next(counts) if i == image else [i])]
    pieces = prompt.split(IMAGE)
    ids = tokenizer.encode(pieces[0]).ids
    for piece in pieces[1:]:
        ids += [image] * next(counts) + (tokenizer.encode(piece, add_special_tokens=False).ids if piece else [])
    return ids


def repeat_for_group(images, input_ids, cfg, group_size):
    """Images (a tensor (n_images, ...) or data.PackedImages) in the order of the prompts' image tokens -> the same
    for every prompt repeated group_size times (input_ids.repeat_interleave(group_size, 0)); prompts may hold
    several images (views), and images may differ in token count (cfg.image_tokens)."""
    sizes, index, i = cfg.image_tokens(images), [], 0
    for n in (input_ids == cfg.image_token_id).sum(1).tolist():  # a prompt's image tokens belong to its next images
        start = i
        while n > 0:
            n, i = n - sizes[i], i + 1
        index += list(range(start, i)) * group_size
    return images[torch.tensor(index, dtype=torch.long)]


def left_pad(prompts, pad_token_id=0):
    """Token-id lists -> ids (B, T), attention mask (B, T), padded on the left so that every prompt ends in the
    last column (where sampling continues)."""
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (T - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def encode_prompts(tokenizer, cfg, questions, images=None):
    """Questions -> the model's chat prompts as left-padded ids (B, T) and attention mask (B, T). images: the
    questions' images, one each (data.preprocess's output); Qwen2.5-VL needs them (an image's token count follows
    its size), LLaVA's counts are fixed."""
    if images is not None and len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions and {len(images)} images: the chat prompt holds one image")
    counts = [None] * len(questions) if images is None else [[n] for n in cfg.image_tokens(images)]
    return left_pad([encode_prompt(tokenizer, chat_prompt(cfg, q), cfg, n) for q, n in zip(questions, counts)])


def decode_completions(tokenizer, samples):
    """Samples -> one string per row: the sampled tokens up to (not including) EOS."""
    rows = []
    for tokens, mask in zip(samples.tokens.tolist(), samples.mask.tolist()):
        ids = [t for t, keep in zip(tokens, mask) if keep]
        rows.append(tokenizer.decode(ids, skip_special_tokens=True).strip())  # EOS is a special token: dropped
    return rows


# -----------------------------------------------------------------------------
# Sampling

@dataclass
class Samples:
    tokens: torch.Tensor  # (B*G, N) sampled ids; pad_token_id after a row's EOS
    mask: torch.Tensor  # (B*G, N) bool: True for sampled tokens (EOS included), False for padding
    logprobs: torch.Tensor  # (B*G, N) fp32 log softmax(logits / T) of each sampled token, 0 under padding


class KVCache:
    """Static key/value buffers, one pair per decoder layer, (B, H_kv, capacity, hd); the first `length` columns
    are filled. Protocol with policy.py: each attention layer calls attend(layer, q, k, v, mask) with its new
    columns; Llava.hidden_states advances `length` once all layers have run. Used for the prefill."""

    def __init__(self, cfg, batch, capacity, dtype, device):
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length = 0
        self.rope_deltas = None  # (batch,): Qwen2.5-VL's M-RoPE offsets, set by its prefill (qwen_vl.py)

    def attend(self, layer, q, k, v, mask):  # q (B, H, t, hd); k, v (B, H_kv, t, hd) -> (B, H, t, hd)
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"KV cache full: {end} columns needed, capacity {self.k[layer].shape[2]}")
        self.k[layer][:, :, self.length:end], self.v[layer][:, :, self.length:end] = k, v
        k, v = self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H_kv, end, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=k.shape[1] != q.shape[1])


class GroupKVCache:
    """The cache of G samples per prompt after one prefill per prompt. The prompt's keys and values (B rows) are
    kept once and read by all G rows of its group (shared_prefix_attention); each row's own tokens go to a
    (B*G)-row suffix. One new token per step.

    Rows that have finished leave the decode batch: `rows` (n,) lists the B*G-row indices that the decoder still
    feeds (None: all of them). Every per-row matmul of the decoder then runs on n rows only; attention places the
    n queries back into their group's slots (finished rows attend with zero queries, and their outputs are
    dropped), so each group still reads its prompt once."""

    def __init__(self, prefix: KVCache, G, capacity):
        self.prefix_k = [k[:, :, :prefix.length] for k in prefix.k]  # (B, H_kv, T, hd) each
        self.prefix_v = [v[:, :, :prefix.length] for v in prefix.v]
        B, H, _, hd = prefix.k[0].shape
        self.k = [k.new_zeros(B * G, H, capacity, hd) for k in prefix.k]  # (B*G, H_kv, capacity, hd) each
        self.v = [v.new_zeros(B * G, H, capacity, hd) for v in prefix.v]
        self.prompt_length = self.length = prefix.length
        deltas = prefix.rope_deltas  # Qwen2.5-VL: one per row, each prompt's for its G rows
        self.row_deltas = None if deltas is None else deltas.repeat_interleave(G)  # (B*G,)
        self.rows = None

    @property
    def rope_deltas(self):  # Qwen2.5-VL's M-RoPE offsets of the rows the decoder is fed: (n,)
        return self.row_deltas if self.row_deltas is None or self.rows is None else self.row_deltas[self.rows]

    def attend(self, layer, q, k, v, mask):  # q (n, H, 1, hd); k, v (n, H_kv, 1, hd); mask (n, 1, 1, T+s+1)
        s = self.length - self.prompt_length
        if q.shape[2] != 1 or s >= self.k[layer].shape[2]:
            raise ValueError(f"GroupKVCache takes one token per step within its capacity (t={q.shape[2]}, step {s})")
        own_k, own_v = self.k[layer][:, :, :s + 1], self.v[layer][:, :, :s + 1]  # (B*G, H_kv, s + 1, hd)
        if self.rows is None:
            own_k[:, :, s:], own_v[:, :, s:] = k, v
            return shared_prefix_attention(q, self.prefix_k[layer], self.prefix_v[layer], own_k, own_v, mask)
        rows, BG = self.rows, own_k.shape[0]
        own_k[rows, :, s], own_v[rows, :, s] = k[:, :, 0].to(own_k.dtype), v[:, :, 0].to(own_v.dtype)  # autocast
        q = q.new_zeros((BG,) + q.shape[1:]).index_copy_(0, rows, q)  # (B*G, H, 1, hd)
        mask = mask.new_ones((BG,) + mask.shape[1:]).index_copy_(0, rows, mask)  # no row without a key
        return shared_prefix_attention(q, self.prefix_k[layer], self.prefix_v[layer], own_k, own_v, mask)[rows]


def shared_prefix_attention(q, prefix_k, prefix_v, own_k, own_v, mask):
    """Attention of B*G rows over their group's prompt and then their own tokens, in one softmax: row b*G + g reads
    prompt b's keys and values, which are stored once per group and read once per group (Hydragen, arXiv
    2402.05099). The sampler's GroupKVCache and the trainer's grpo.SharedPrefix both attend through it.

    q (B*G, H, T, hd); prefix_k, prefix_v (B, H_kv, Tp, hd); own_k, own_v (B*G, H_kv, S, hd); mask (B*G, 1, T,
    Tp + S) bool, True = attend (policy.attention_mask_4d), or None -> (B*G, H, T, hd)."""
    BG, H, T, hd = q.shape
    B, H_kv, Tp, _ = prefix_k.shape
    G, r = BG // B, H // H_kv
    q = q.reshape(BG, H_kv, r * T, hd)  # the r query heads that read each key head (GQA), T queries each
    # (B*G, H_kv, n, m) <-> (B, H_kv, G*n, m): a group's queries side by side, to read its prompt once
    group = lambda x: x.reshape(B, G, H_kv, -1, x.shape[-1]).transpose(1, 2).reshape(B, H_kv, -1, x.shape[-1])
    ungroup = lambda x: x.reshape(B, H_kv, G, -1, x.shape[-1]).transpose(1, 2).reshape(BG, H_kv, -1, x.shape[-1])
    scores = torch.cat([ungroup(group(q) @ prefix_k.transpose(2, 3)), q @ own_k.transpose(2, 3)], -1)
    scores = scores.float().view(BG, H_kv, r, T, Tp + own_k.shape[2]) * hd ** -0.5  # (B*G, H_kv, r, T, Tp + S)
    if mask is not None:
        scores = torch.where(mask[:, :, None], scores, float("-inf"))  # the same mask for the r heads
    probs = scores.softmax(-1).to(q.dtype).view(BG, H_kv, r * T, -1)
    y = ungroup(group(probs[..., :Tp]) @ prefix_v) + probs[..., Tp:] @ own_v  # (B*G, H_kv, r*T, hd)
    return y.reshape(BG, H, T, hd)


class SharedPrefix:
    """Training-time attention over a shared prompt, in the same cache protocol as KVCache and GroupKVCache (each
    attention layer calls attend(layer, q, k, v, mask); Llava.hidden_states advances `length`); grpo.py's
    CompletionLogprobs uses it. The first pass (the B prompts) is
    plain causal attention that keeps each layer's keys and values; the second (the B*G completions, row b*G + g
    answering prompt b) attends to its prompt's keys and values and, causally, to its own, in one softmax
    (shared_prefix_attention, as the sampler does)."""

    def __init__(self):
        self.k, self.v, self.length = {}, {}, 0
        self.rope_deltas = None  # Qwen2.5-VL: one per prompt, set by the prompt pass (qwen_vl.py)

    def attend(self, layer, q, k, v, mask):
        if layer not in self.k:  # the prompts: (B, H, Tp, hd) queries, (B, H_kv, Tp, hd) keys and values
            self.k[layer], self.v[layer] = k, v
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        return shared_prefix_attention(q, self.k[layer], self.v[layer], k, v, mask)  # (B*G, H, Tc - 1, hd)


def filter_logits(scores, top_k=0, top_p=1.0):
    """scores (N, V) (logits or log-probs) with the tokens outside the top-k, and outside the smallest set of
    highest-probability tokens whose mass reaches top_p (nucleus sampling, Holtzman et al., arXiv 1904.09751),
    set to -inf. The most likely token is always kept."""
    if top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        remove_sorted = probs.cumsum(-1) - probs >= top_p  # (N, V): the more likely tokens already reach top_p
        remove = torch.empty_like(remove_sorted).scatter_(1, order, remove_sorted)  # back to vocabulary order
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def uniform_noise(shape, generator, device):
    """U(0, 1) draws (N, V). `generator` may be a list of one torch.Generator per group of N / len(generator)
    consecutive rows: a group's draws then depend only on its own generator, not on which other prompts share the
    batch, so a GRPO step samples the same rollouts on any number of ranks or micro-batches."""
    if isinstance(generator, (list, tuple)):
        out, rows = torch.empty(shape, device=device), shape[0] // len(generator)
        for i, g in enumerate(generator):  # each into its own rows (no concatenation): the same numbers
            torch.rand((rows, shape[1]), generator=g, device=device, out=out[i * rows:(i + 1) * rows])
        return out
    return torch.rand(shape, generator=generator, device=device)


def head_logits(h, w32):
    """Final hidden states (N, D) -> fp32 logits (N, V) with the fp32 head weight w32 (V, D). Autocast is off: under
    bf16 autocast (train.py samples under it on CUDA) the matmul would run, and round the logits, in bf16, while the
    trainer's fused op (logprobs.py) uses fp32; the log-probs would then differ by ~2e-2 instead of ~1e-6."""
    with torch.autocast(h.device.type, enabled=False):
        return h.float() @ w32.T


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, banned=None, noise=None):
    """logits (N, V) fp32 -> tokens (N,), log-probs (N,) (see the module docstring for what they are); fp32 even
    under autocast. noise: the U(0, 1) draws (N, V) to use, by default drawn from `generator` (uniform_noise)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float() if temperature in (0, 1) else logits.float() / temperature
        logp = F.log_softmax(logits, dim=-1)  # (N, V)
        ban_first = banned is not None and (top_k > 0 or top_p < 1.0 or temperature <= 0)  # before top-k / p / argmax
        scores = logp.index_fill(1, banned, -math.inf) if ban_first else logp
        if temperature > 0:
            # Gumbel-max: argmax_i (log p_i + g_i), g_i = -log(-log U_i), picks i with probability p_i / sum(p) over
            # the kept tokens; no normalisation or GPU sync needed (uniforms: 5x cheaper than exponential_ on CPU).
            noise = uniform_noise(scores.shape, generator, scores.device) if noise is None else noise
            scores = filter_logits(scores, top_k, top_p) - noise.log().neg_().log_()  # a new tensor
            if banned is not None and not ban_first:  # banned after the noise, in place: a pass less than a copy
                scores.index_fill_(1, banned, -math.inf)
        tokens = scores.argmax(-1)
        return tokens, logp.gather(1, tokens[:, None])[:, 0]


def _prepare(model, input_ids, attention_mask, eos_token_id, max_new_tokens):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not (attention_mask[:, -1].all() and (attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
        raise ValueError("prompts must be left-padded (attention_mask 0...0 1...1 per row); see left_pad()")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: expected >= 1")
    eos = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor(token_ids(eos), dtype=torch.long, device=input_ids.device)
    image = model.cfg.image_token_id
    banned = torch.tensor([image], device=input_ids.device) if image < model.cfg.text.vocab_size else None
    return attention_mask, eos, banned


class _Recorder:
    """Per-step bookkeeping shared by both samplers: the (N, max_new_tokens) results (padding after EOS), which rows
    are still running, their random draws, the stop test."""

    def __init__(self, n, max_new_tokens, eos, pad_token_id, device):
        self.tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((n, max_new_tokens), dtype=torch.bool, device=device)
        self.logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device)
        self.rows = torch.arange(n, device=device)  # (n_running,): the rows that have not drawn an EOS yet
        self.eos, self.steps = eos, 0

    def noise(self, generator, vocab, temperature):
        """U(0, 1) draws (n_running, V) for this step, or None when greedy. All N rows draw, running or not, so a
        row's numbers are those it would get if no row ever stopped (what makes both samplers agree)."""
        if temperature <= 0:
            return None
        u = uniform_noise((len(self.tokens), vocab), generator, self.tokens.device)  # (N, V)
        return u if len(self.rows) == len(u) else u[self.rows]

    def add(self, tokens, logprobs):
        """tokens, logprobs (n_running,) of this step -> None if every row runs on, else keep (n_running,) bool:
        False where the row has just drawn an EOS (it is recorded, and the row stops)."""
        s, rows = self.steps, self.rows
        self.tokens[rows, s], self.mask[rows, s], self.logprobs[rows, s] = tokens, True, logprobs
        self.steps += 1
        keep = ~torch.isin(tokens, self.eos)
        if keep.all():  # one host sync per step, for the stop test
            return None
        self.rows = rows[keep]
        return keep

    def result(self):
        n = self.steps  # as many columns as steps ran: until every row stopped, or max_new_tokens
        return Samples(*(x[:, :n].contiguous() for x in (self.tokens, self.mask, self.logprobs)))


@torch.no_grad()
def sample(model, input_ids, attention_mask=None, pixel_values=None, image_embeds=None, group_size=1,
           max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
           generator=None):
    """Sample group_size completions for each of B left-padded prompts (B, T). Images: pixel_values
    (n_images, 3, S, S) or image_embeds (n_images, P, D) (Qwen2.5-VL: data.PackedImages of either), in the order of
    the image tokens (one per prompt, several, or none). eos_token_id defaults to the checkpoint's; temperature 0 is
    greedy. generator: one torch.Generator, or a list of B (one per prompt, see uniform_noise). Returns B *
    group_size rows."""
    attention_mask, eos, banned = _prepare(model, input_ids, attention_mask, eos_token_id, max_new_tokens)
    if pixel_values is not None:
        image_embeds = model.encode_images(pixel_values)  # (n_images, P, D): each image through the ViT once
    B, T = input_ids.shape
    G, weight = group_size, model.lm_head.weight
    prefix = KVCache(model.cfg.text, B, T, weight.dtype, input_ids.device)
    h = model.hidden_states(input_ids, image_embeds=image_embeds, attention_mask=attention_mask, cache=prefix)
    w32 = weight.float()  # (V, D); no copy in fp32
    logits = head_logits(h[:, -1], w32).repeat_interleave(G, 0)  # (B*G, V): one prefill per group
    cache = GroupKVCache(prefix, G, max_new_tokens)
    # every step's attention mask is a prefix of this one (running rows only): (B*G, T + max_new_tokens)
    mask = torch.cat([attention_mask.repeat_interleave(G, 0), attention_mask.new_ones(B * G, max_new_tokens)], 1)
    rec = _Recorder(B * G, max_new_tokens, eos, pad_token_id, input_ids.device)
    for step in range(max_new_tokens):  # logits, tokens, mask: (n_running, ...), the rows of rec.rows
        noise = rec.noise(generator, logits.shape[1], temperature)
        tokens, logprobs = sample_token(logits, temperature, top_k, top_p, banned=banned, noise=noise)
        keep = rec.add(tokens, logprobs)
        if len(rec.rows) == 0 or step == max_new_tokens - 1:
            break
        if keep is not None:  # rows that drew an EOS leave the decode batch
            tokens, mask, cache.rows = tokens[keep], mask[keep], rec.rows
        h = model.hidden_states(tokens[:, None], attention_mask=mask[:, :T + step + 1], cache=cache)  # (n, 1, D)
        logits = head_logits(h[:, -1], w32)  # (n, V)
    return rec.result()


@torch.no_grad()
def sample_naive(model, input_ids, attention_mask=None, pixel_values=None, image_embeds=None, group_size=1,
                 max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
                 generator=None):
    """The reference for `sample` (same arguments, same result): the whole sequence through the model each step."""
    attention_mask, eos, banned = _prepare(model, input_ids, attention_mask, eos_token_id, max_new_tokens)
    G = group_size
    ids, mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)  # (B*G, T)
    pixel_values = None if pixel_values is None else repeat_for_group(pixel_values, input_ids, model.cfg, G)
    image_embeds = None if image_embeds is None else repeat_for_group(image_embeds, input_ids, model.cfg, G)
    w32 = model.lm_head.weight.float()  # the fp32 LM head of `sample`: model(...) with fp32 logits
    rec = _Recorder(ids.shape[0], max_new_tokens, eos, pad_token_id, ids.device)
    for _ in range(max_new_tokens):
        h = model.hidden_states(ids, pixel_values, image_embeds, mask)  # (B*G, T + step, D): every row, every step
        logits = head_logits(h[:, -1], w32)[rec.rows]  # (n_running, V)
        noise = rec.noise(generator, logits.shape[1], temperature)
        rec.add(*sample_token(logits, temperature, top_k, top_p, banned=banned, noise=noise))
        if len(rec.rows) == 0:
            break
        tokens = rec.tokens[:, rec.steps - 1:rec.steps]  # (B*G, 1): padding where a row has stopped
        ids, mask = torch.cat([ids, tokens], 1), torch.cat([mask, mask.new_ones(ids.shape[0], 1)], 1)
    return rec.result()


def group_generators(key, rank, world, n, device):
    """One torch.Generator per study of a rank's batch of n, seeded by (key, the study's place in the global batch):
    a group's samples (uniform_noise) are the same on any number of ranks and after a resume. key: numbers, e.g.
    (seed, step)."""
    seeds = [np.random.SeedSequence([*key, rank + k * world]).generate_state(1)[0] for k in range(n)]
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
