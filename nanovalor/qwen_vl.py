"""The Qwen2.5-VL policy, owned by us: ViT -> patch merger -> Qwen2 decoder with multimodal RoPE, and its checkpoints.

    model = load("Qwen/Qwen2.5-VL-3B-Instruct")          # or -7B-Instruct, or a local folder (policy.load dispatches)
    images = data.preprocess(pil_images, data.read_preprocessor_config(model.preprocessor_config))  # PackedImages
    ids, mask = generate.encode_prompts(tok, model.cfg, questions, images)  # as many image tokens as each image has
    logits = model(ids, images, attention_mask=mask)      # (B, T, V)

The model has the API of policy.Llava that the sampler and the trainer use (encode_images, hidden_states with a
cache and `select`, lm_head, language_model, multi_modal_projector = the merger), so generate.sample,
grpo.CompletionLogprobs and train.py take it as they are. What differs is carried by the data: images travel as
data.PackedImages (patch rows + each image's grid), image embeddings too (merged tokens + grid), and the model
numbers its own positions from input_ids and the grids.

Positions (M-RoPE, Qwen2-VL, arXiv 2409.12191, section 2.1): each position has three components (time, row,
column), and the decoder's rotary frequencies are split in three sections (16, 24, 24 of the 64 in Qwen2.5-VL),
each turned by one component. A text token has the same value in all three: its count among the real tokens, plus
an offset. An image's h x w merged tokens share the time value s (the next text position) and add their row and
column to it; the text after it continues at s + max(h, w), not s + h * w, so the offset (the "rope delta") drops by
h * w - max(h, w) per image. A prefill stores each row's final offset on the cache (cache.rope_deltas, generate.py's
caches carry it), and later tokens are numbered text position + offset, the same on all three axes.

Not implemented (refused): videos (time positions scaled by fps), the decoder's sliding window, Qwen2-VL (not 2.5).
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from nanovalor.data import PackedImages
from nanovalor.decoder import (Decoder, DecoderConfig, attention_mask_4d, decoder_config_from_hf, init_weights,
                               rope_cos_sin)
from nanovalor.qwen_vit import PatchMerger, QwenVisionConfig, QwenVisionTower
from nanovalor.weights import read_json, token_ids


@dataclass
class QwenVLConfig:
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    text: DecoderConfig = field(default_factory=lambda: DecoderConfig(model_type="qwen2"))
    mrope_section: tuple = (16, 24, 24)  # rotary frequencies turned by time, row, column; sums to head_dim / 2
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: list = field(default_factory=lambda: [151645, 151643])
    chat_format: str = "qwen2_vl"  # generate.CHAT_FORMATS key (saved as nanovalor_chat_format when not this one)

    def image_tokens(self, images):
        """The placeholder tokens each image takes in input_ids: h * w / m^2 (PackedImages of pixels or
        embeddings). policy.LlavaConfig answers the same question with its fixed count."""
        return (images.grid.prod(1) // self.vision.spatial_merge_size ** 2).tolist()

    @property
    def num_image_tokens(self):
        raise ValueError("a Qwen2.5-VL image takes as many tokens as its size gives: pass the images to "
                         "generate.encode_prompts (they give cfg.image_tokens(images))")


def mrope_positions(input_ids, attention_mask, images, cfg: QwenVLConfig):
    """input_ids (B, T) with each image's tokens in place, attention_mask (B, T) or None, images: PackedImages in
    the order of their tokens -> M-RoPE positions (3, B, T) and each row's rope delta (B,) (module docstring).
    Positions at padding are don't-cares (masked out)."""
    B, T = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    text = (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T): each token's count among the real ones
    offset = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)  # added to `text` on each axis
    deltas = [0] * B
    m = cfg.vision.spatial_merge_size
    if images is not None and (images.grid[:, 0] != 1).any():
        raise ValueError(f"image grids {images.grid.tolist()}: only still images (t = 1) are implemented, no videos")
    grids = [] if images is None else (images.grid[:, 1:] // m).tolist()  # (rows, columns) of merged tokens
    sizes = iter(grids)
    for b in range(B):
        columns = torch.nonzero((input_ids[b] == cfg.image_token_id) & real[b]).flatten()
        start = 0
        while start < len(columns):  # the next image of row b: its h * w tokens in order
            h, w = next(sizes, (0, 0))
            if h * w == 0 or start + h * w > len(columns):
                raise ValueError(f"row {b}'s image tokens do not split into the images' grids {grids}")
            block, k = columns[start:start + h * w], torch.arange(h * w, device=input_ids.device)
            # token k of the image sits at text position s + k; it gets (s, s + row, s + column), all + the offset
            offset[:, b, block] = deltas[b] + torch.stack([-k, k // w - k, k % w - k])
            deltas[b] += max(h, w) - h * w
            offset[:, b, int(block[-1]) + 1:] = deltas[b]  # the text after it (a later image overwrites its own)
            start += h * w
    if next(sizes, None) is not None:
        raise ValueError(f"more images (grids {grids}) than input_ids' image tokens take")
    return text + offset, torch.tensor(deltas, device=input_ids.device)


def mrope_cos_sin(positions, head_dim, theta, sections, dtype):
    """positions (3, B, T) -> cos, sin (B, T, head_dim): decoder.rope_cos_sin of each axis, then the frequencies of
    section i taken from axis i (time, row, column), in both halves of the half-split layout."""
    cos, sin = (torch.stack(t) for t in zip(*(rope_cos_sin(p, head_dim, theta, dtype) for p in positions)))
    pick = lambda x: torch.cat([part[i % 3] for i, part in enumerate(x.split(list(sections) * 2, dim=-1))], -1)
    return pick(cos), pick(sin)


class QwenVL(nn.Module):
    """ViT -> merger -> decoder. load() also sets `source` (the checkpoint folder) and `preprocessor_config` (its
    Qwen2VLImageProcessor dict, for data.read_preprocessor_config)."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = QwenVisionTower(cfg.vision)
        self.multi_modal_projector = PatchMerger(cfg.vision)  # transformers' visual.merger
        self.language_model = Decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        init_weights(self)
        if cfg.text.tie_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.source, self.preprocessor_config = None, None

    def encode_images(self, images: PackedImages) -> PackedImages:
        """Patch rows -> merged image embeddings (PackedImages of (n_tokens, D) rows, the same grids). Encode each
        image once and pass the result as `image_embeds`. A frozen ViT (no parameter requires grad) runs under
        no_grad, so it keeps no activations; the merger stays differentiable."""
        m2 = self.cfg.vision.spatial_merge_size ** 2
        if len(images) == 0:
            return PackedImages(images.data.new_zeros(0, self.cfg.text.hidden_size), images.grid, m2)
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            features = self.vision_tower(images)  # (N, d_vision)
        return PackedImages(self.multi_modal_projector(features), images.grid, m2)

    def embed(self, input_ids, image_embeds=None):
        """input_ids (B, T) -> (B, T, D): token embeddings, with the rows of image_embeds written in order into the
        image-token positions (transformers' masked_scatter). Counts must match exactly."""
        is_image = input_ids == self.cfg.image_token_id
        x = self.language_model.embed_tokens(input_ids)
        n_tokens, n_feats = int(is_image.sum()), 0 if image_embeds is None else len(image_embeds.data)
        if n_tokens != n_feats:
            grids = [] if image_embeds is None else image_embeds.grid.tolist()
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.cfg.image_token_id}) but {n_feats} "
                             f"image embeddings were given (grids {grids})")
        if n_feats:
            x = x.masked_scatter(is_image[..., None], image_embeds.data.to(x.dtype))
        return x

    def hidden_states(self, input_ids, pixel_values=None, image_embeds=None, attention_mask=None, select=None,
                      cache=None):
        """Final-norm hidden states: (B, T, D), or (N, D) at the positions where `select` (B, T) bool is True;
        hidden[b, t] predicts input_ids[b, t + 1]. attention_mask (B, T) (or (B, past + T) with a cache): 1 marks
        real tokens, padding anywhere. Without a cache, or on an empty one (a prefill), positions come from
        input_ids and the images' grids and the cache keeps the rope deltas; on a filled cache (decoding, or the
        completions after grpo's SharedPrefix prompt pass) they are text position + delta. A cache holding one
        delta per prompt serves rows in groups: B / len(deltas) consecutive rows per prompt."""
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("give pixel_values or image_embeds, not both")
            image_embeds = self.encode_images(pixel_values)
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        x = self.embed(input_ids, image_embeds)  # (B, T, D)
        if past == 0:
            positions, deltas = mrope_positions(input_ids, attention_mask, image_embeds, self.cfg)  # (3, B, T)
            if cache is not None:
                cache.rope_deltas = deltas
        else:
            if getattr(cache, "rope_deltas", None) is None:
                raise ValueError("this cache was not filled by a Qwen2.5-VL prefill: it holds no rope deltas")
            deltas = cache.rope_deltas.repeat_interleave(B // len(cache.rope_deltas))  # (B,)
            text = (torch.arange(past, past + T, device=x.device).expand(B, T) if attention_mask is None else
                    (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:])
            positions = (text + deltas[:, None]).expand(3, B, T)
        t = self.cfg.text
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, self.cfg.mrope_section, x.dtype)
        x = self.language_model(x, cos, sin, attention_mask_4d(attention_mask, T, past, x.device), cache)
        if cache is not None:
            cache.length += T
        return self.language_model.norm(x if select is None else x[select])

    def forward(self, input_ids, pixel_values=None, image_embeds=None, attention_mask=None, select=None):
        """input_ids (B, T) with each image's tokens in place, pixel_values or image_embeds (PackedImages) ->
        logits (B, T, V), or (N, V) at `select`."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, image_embeds, attention_mask, select))


# -----------------------------------------------------------------------------
# Configs: transformers' Qwen2_5_VLConfig as the hub has it (decoder fields at the top level, rope_scaling
# {"type": "mrope", "mrope_section"}) or as transformers 5 writes it (text_config with rope_parameters).

TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
VISION_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")
TEXT_DEFAULTS = dict(num_key_value_heads=8, rms_norm_eps=1e-5, hidden_act="silu")  # transformers' defaults


def config_from_hf(d, where):
    """QwenVLConfig from a Qwen2.5-VL config.json dict; one error for every missing or unsupported field."""
    if d.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{where}: model_type {d.get('model_type')!r}: expected 'qwen2_5_vl' (Qwen2.5-VL; "
                         f"Qwen2-VL's ViT differs and is not implemented)")
    text_d, vision_d = {**TEXT_DEFAULTS, **(d.get("text_config") or d)}, d.get("vision_config") or {}
    missing = [k for k in TEXT_REQUIRED if k not in text_d] + [f"vision_config.{k}" for k in VISION_REQUIRED
                                                               if k not in vision_d]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
    theta, sections = rope.get("rope_theta") or text_d.get("rope_theta") or 1e6, rope.get("mrope_section", (16, 24, 24))
    kind, act = rope.get("rope_type", rope.get("type", "default")), vision_d.get("hidden_act", "silu")
    if kind not in ("default", "mrope") or text_d.get("use_sliding_window") or act != "silu":
        raise ValueError(f"{where}: rope type {kind!r}, use_sliding_window {text_d.get('use_sliding_window')}, "
                         f"vision_config.hidden_act {act!r}: implemented are M-RoPE without scaling ('mrope' / "
                         f"'default'), no sliding window, a SiLU ViT")
    # the decoder is Qwen2's (q/k/v bias, no o bias); Qwen2.5-VL's attention ignores head_dim: hidden / heads
    text = decoder_config_from_hf({**text_d, "model_type": "qwen2", "head_dim": None, "rope_scaling": None,
                                   "rope_parameters": {"rope_type": "default", "rope_theta": theta}}, where)
    text.tie_embeddings = bool(d.get("tie_word_embeddings")) or text.tie_embeddings  # either level, as HF reads it
    v = vision_d
    vision = QwenVisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"], patch_size=v.get("patch_size", 14),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2), window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=v["out_hidden_size"], in_channels=v.get("in_channels", v.get("in_chans", 3)),
        rope_theta=(v.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        tokens_per_second=v.get("tokens_per_second", 2))
    if 2 * sum(sections) != text.head_dim or vision.out_hidden_size != text.hidden_size or (
            vision.hidden_size // vision.num_heads) % 4:
        raise ValueError(f"{where}: mrope_section {list(sections)} must sum to head_dim / 2 = {text.head_dim // 2}, "
                         f"vision_config.out_hidden_size {vision.out_hidden_size} must be hidden_size "
                         f"{text.hidden_size}, the ViT's head size a multiple of 4")
    ids = {k: d.get(k, getattr(QwenVLConfig, k)) for k in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")}
    return QwenVLConfig(vision=vision, text=text, mrope_section=tuple(sections), **ids,
                        eos_token_id=token_ids(text_d.get("eos_token_id", d.get("eos_token_id"))),
                        chat_format=d.get("nanovalor_chat_format", "qwen2_vl"))


def config_to_hf(cfg: QwenVLConfig):
    """The hub's config.json layout of Qwen/Qwen2.5-VL-3B-Instruct for `cfg` (what save() writes)."""
    t, v = cfg.text, cfg.vision
    ours = {} if cfg.chat_format == "qwen2_vl" else {"nanovalor_chat_format": cfg.chat_format}  # HF ignores it
    return dict(
        **ours, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps, hidden_act="silu", rope_theta=t.rope_theta,
        rope_scaling=dict(type="mrope", mrope_section=list(cfg.mrope_section)), tie_word_embeddings=t.tie_embeddings,
        use_sliding_window=False, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
        eos_token_id=cfg.eos_token_id[0] if cfg.eos_token_id else None,
        vision_config=dict(depth=v.depth, hidden_act="silu", hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
                           out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                           tokens_per_second=v.tokens_per_second))


# -----------------------------------------------------------------------------
# Checkpoints: ordered (checkpoint prefix -> our prefix) rules, the first match wins (weights.read_checkpoint).

QWEN_HF_NAMES = [  # (our prefix, the hub's): what save() writes, as the hub and transformers 5 store it
    ("multi_modal_projector.", "visual.merger."),
    ("vision_tower.", "visual."),
    ("language_model.", "model."),
    ("lm_head.", "lm_head."),
]
HF_QWEN_KEYS = [  # no name matches two rules that disagree
    ("visual.merger.", "multi_modal_projector."),
    ("visual.", "vision_tower."),
    ("model.visual.merger.", "multi_modal_projector."),  # transformers 5's in-memory names, if a save kept them
    ("model.visual.", "vision_tower."),
    ("model.language_model.", "language_model."),
    ("model.", "language_model."),  # the hub's
    ("lm_head.", "lm_head."),
]
UNUSED = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")  # buffers that old saves kept


def build(folder, dtype=torch.float32):
    """The QwenVL of a model folder on the meta device, in `dtype`, from its config files alone, with `source` and
    `preprocessor_config` set (policy.build calls it for model_type qwen2_5_vl; policy.fill reads the weights, with
    HF_QWEN_KEYS). A preprocessor_config.json that does not fit the ViT is refused."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json, not a model folder")
    cfg = config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    if (folder / "generation_config.json").exists():
        generation = read_json(folder / "generation_config.json")
        cfg.eos_token_id = token_ids(generation.get("eos_token_id")) or cfg.eos_token_id
    with torch.device("meta"):
        model = QwenVL(cfg).to(dtype)
    model.source = folder
    v = cfg.vision  # the processor must cut the patches the ViT was built for; transformers' pixel limits otherwise
    proc = dict(image_processor_type="Qwen2VLImageProcessor", patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                temporal_patch_size=v.temporal_patch_size, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    if (folder / "preprocessor_config.json").exists():
        given = read_json(folder / "preprocessor_config.json")
        wrong = {k: given[k] for k in ("patch_size", "merge_size", "temporal_patch_size")
                 if given.get(k, proc[k]) != proc[k]}
        if wrong:
            raise ValueError(f"{folder / 'preprocessor_config.json'}: {wrong} do not fit the ViT of config.json "
                             f"(patch_size {v.patch_size}, merge_size {v.spatial_merge_size}, temporal_patch_size "
                             f"{v.temporal_patch_size})")
        proc = given
    model.preprocessor_config = proc
    return model.eval()
