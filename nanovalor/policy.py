"""The policy: a LLaVA-family medical VLM (ViT -> projector -> decoder), owned by us, and its checkpoints.

    model = load("microsoft/llava-med-v1.5-mistral-7b")  # or llava-hf/llava-1.5-7b-hf, or a local folder
    model = build(path); ...; fill(model)     # the same in two steps: built on the meta device from config.json,
                                              # weights read once what trains is set and FSDP2 has sharded it
    logits = model(input_ids, pixel_values)  # (B, T, V): transformers' Llava input convention (generate.py
                                             # builds input_ids: encode_prompt, left_pad)

Here: the projector, the LLaVA model with the API GRPO needs (encode each image once, hidden states at chosen
positions, any padding, gradient checkpointing), configs, `build` / `fill` / `load` / `save` (HF llava and original
LLaVA / LLaVA-Med layouts). The ViT is vit.py, the decoder (Llama / Mistral / Qwen2) decoder.py; the tokenizer, chat
formats and samplers are generate.py; weight files and how they are read weights.py; LoRA lora.py. `build`, `fill`,
`load` and `save` also take Qwen2.5-VL (qwen_vl.py, the same API), so every script takes either family.

Not implemented (each refused with a clear error): Mistral's sliding-window attention (longer sequences are
refused; LLaVA-Med's window is 4096 tokens), RoPE scaling, multi-layer vision features, image start/end tokens.
"""
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovalor import lora, qwen_vl
from nanovalor.checkpoint import atomic_folder
from nanovalor.decoder import (BIASES, Decoder, DecoderConfig, attention_mask_4d, decoder_config_from_hf, init_weights,
                               rope_cos_sin)
from nanovalor.vit import VisionConfig, VisionTower, vision_config_from_hf
from nanovalor.weights import TOKENIZER_FILES, checkpoint_index, materialise, read_json, resolve, token_ids


# -----------------------------------------------------------------------------
# Projector: LLaVA-1.5's `mlp2x_gelu` (Linear, GELU, Linear) or LLaVA-1's single `linear`. HF names linear_1/2.

class Projector(nn.Module):
    def __init__(self, kind, d_vision, d_text, bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_text, bias=bias)
        self.linear_2 = nn.Linear(d_text, d_text, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, x):  # (B, P, d_vision) -> (B, P, d_text)
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))  # exact GELU, as LLaVA and HF use


# -----------------------------------------------------------------------------
# The LLaVA model: image features replace the image placeholder tokens, then a causal decoder.

@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: DecoderConfig = field(default_factory=DecoderConfig)
    projector: str = "mlp2x_gelu"  # or "linear"
    projector_bias: bool = True
    image_token_id: int = 32000  # original LLaVA has no such token: we use vocab_size (never sampled, never embedded)
    feature_layer: int = -2  # ViT hidden state fed to the projector (HF hidden_states indexing)
    feature_select: str = "default"  # "default" drops the ViT's first token (CLIP's class token), "full" keeps all
    eos_token_id: list = field(default_factory=lambda: [2])
    chat_format: str = "auto"  # generate.CHAT_FORMATS key; "auto": the decoder family's (saved as
    # nanovalor_chat_format)

    @property
    def num_image_tokens(self):  # placeholder tokens per image in input_ids
        return self.vision.num_patches + (self.vision.class_token and self.feature_select == "full")

    def image_tokens(self, images):  # the placeholder tokens of each image (n, ...): the same for all (qwen_vl's vary)
        return [self.num_image_tokens] * len(images)


class Llava(nn.Module):
    """ViT -> projector -> decoder. load() also sets `source` (the checkpoint folder) and `preprocessor_config`
    (its image preprocessing dict, for data.read_preprocessor_config). The LM-head weight (V, D) is
    model.lm_head.weight, tied or not: with hidden_states(..., select=) it feeds logprobs.token_logprobs."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.text.hidden_size,
                                               cfg.projector_bias)
        self.language_model = Decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        init_weights(self)
        if cfg.text.tie_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.source, self.preprocessor_config = None, None

    def encode_images(self, pixel_values):
        """(n, 3, S, S) -> projected image embeddings (n, P, D). Encode each image once and pass the result as
        `image_embeds` (generate.repeat_for_group repeats it for a group). A frozen ViT (no parameter requires
        grad) runs under no_grad, so it keeps no activations; the projector stays differentiable."""
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats = self.vision_tower(pixel_values, self.cfg.feature_layer)  # (B, 1+P or P, d_vision)
        if self.cfg.feature_select == "default":
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed(self, input_ids, image_embeds=None):
        """input_ids (B, T) -> (B, T, D): token embeddings, with the rows of image_embeds (n, P, D) written in order
        into the image-token positions (transformers' masked_scatter convention). Counts must match exactly."""
        is_image = input_ids == self.cfg.image_token_id
        x = self.language_model.embed_tokens(torch.where(is_image, 0, input_ids))  # the id may be outside the vocab
        n_tokens = int(is_image.sum())
        n_feats = 0 if image_embeds is None else image_embeds.shape[0] * image_embeds.shape[1]
        if n_tokens != n_feats:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.cfg.image_token_id}) but "
                             f"{n_feats} image features were given ({self.cfg.num_image_tokens} per image)")
        if n_feats:
            x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))
        return x

    def hidden_states(self, input_ids, pixel_values=None, image_embeds=None, attention_mask=None, select=None,
                      cache=None):
        """Final-norm hidden states: (B, T, D), or (N, D) at the positions where `select` (B, T) bool is True.

        hidden[b, t] predicts input_ids[b, t + 1]: to score completion tokens, select the positions just before
        them. attention_mask (B, T) (or (B, past + T) with a cache) marks real tokens with 1; positions count real
        tokens only, so left, right or inner padding gives the same hidden states as no padding. `cache`: a
        generate.py KVCache or GroupKVCache (sampling only)."""
        if pixel_values is not None:
            if image_embeds is not None:
                raise ValueError("give pixel_values or image_embeds, not both")
            image_embeds = self.encode_images(pixel_values)
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        S = self.cfg.text.sliding_window
        if S is not None and past + T > S:
            raise ValueError(f"{past + T} tokens exceed the sliding window {S}, which nanovalor does not implement")
        x = self.embed(input_ids, image_embeds)  # (B, T, D)
        if attention_mask is None:
            positions = torch.arange(past, past + T, device=x.device).expand(B, T)
        else:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, past + T)}")
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.text.head_dim, self.cfg.text.rope_theta, x.dtype)
        mask = attention_mask_4d(attention_mask, T, past, x.device)
        x = self.language_model(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.language_model.norm(x if select is None else x[select])

    def forward(self, input_ids, pixel_values=None, image_embeds=None, attention_mask=None, select=None):
        """input_ids (B, T) with the image token repeated num_image_tokens times per image, pixel_values
        (n_images, 3, S, S) or image_embeds (n_images, P, D) -> logits (B, T, V), or (N, V) at `select`. Training
        never builds these logits: grpo.CompletionLogprobs takes hidden_states through the fused LM-head op."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, image_embeds, attention_mask, select))


# -----------------------------------------------------------------------------
# Configs: transformers' LlavaConfig (config.json with text_config and vision_config), or the original LLaVA's flat
# config (decoder fields at the top level, mm_* fields for the vision side).

def config_from_hf(d, where):
    """LlavaConfig from transformers' llava config.json."""
    text = decoder_config_from_hf(d.get("text_config") or {}, f"{where} text_config")
    if "vision_config" not in d:
        raise ValueError(f"{where}: no vision_config")
    layer, act = d.get("vision_feature_layer", -2), d.get("projector_hidden_act", "gelu")
    if not isinstance(layer, int):
        raise ValueError(f"{where}: vision_feature_layer {layer}: only one layer (an int) is implemented")
    if act != "gelu":
        raise ValueError(f"{where}: projector_hidden_act {act!r}: expected 'gelu'")
    text.tie_embeddings = bool(d.get("tie_word_embeddings")) or text.tie_embeddings  # either level, as HF reads it
    return LlavaConfig(vision=vision_config_from_hf(d["vision_config"], f"{where} vision_config"), text=text,
                       projector="mlp2x_gelu",
                       projector_bias=d.get("multimodal_projector_bias", True),
                       image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)), feature_layer=layer,
                       feature_select=d.get("vision_feature_select_strategy", "default"),
                       eos_token_id=token_ids((d.get("text_config") or {}).get("eos_token_id", d.get("eos_token_id"))),
                       chat_format=d.get("nanovalor_chat_format", "auto"))


ORIGINAL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen2": "qwen2",
                  "llava_qwen": "qwen2"}


def config_from_original(d, vision_d, where):
    """LlavaConfig from an original LLaVA / LLaVA-Med config.json and the config of its mm_vision_tower repo."""
    kind = d.get("model_type")
    if kind not in ORIGINAL_TYPES:
        raise ValueError(f"{where}: model_type {kind!r}: expected one of {sorted(ORIGINAL_TYPES)}")
    text = decoder_config_from_hf({**d, "model_type": ORIGINAL_TYPES[kind]}, where)
    if vision_d.get("model_type") in ("clip", "siglip"):  # a dual-encoder repo: take its vision half
        vision_d = {"model_type": vision_d["model_type"] + "_vision_model", **vision_d.get("vision_config", {})}
    vision = vision_config_from_hf(vision_d)
    projector, select = d.get("mm_projector_type", "linear"), d.get("mm_vision_select_feature", "patch")
    start_end = d.get("mm_use_im_start_end")
    if projector not in ("linear", "mlp2x_gelu") or select not in ("patch", "cls_patch") or start_end:
        raise ValueError(f"{where}: mm_projector_type {projector!r}, mm_vision_select_feature {select!r}, "
                         f"mm_use_im_start_end {start_end}: expected linear or mlp2x_gelu, "
                         f"patch or cls_patch, and no image start/end tokens")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"{where}: mm_hidden_size {d['mm_hidden_size']} != the vision tower's {vision.hidden_size}")
    return LlavaConfig(vision=vision, text=text, projector=projector, projector_bias=True,
                       image_token_id=text.vocab_size, feature_layer=d.get("mm_vision_select_layer", -2),
                       feature_select="default" if select == "patch" else "full",
                       eos_token_id=token_ids(d.get("eos_token_id")))


def config_to_hf(cfg: LlavaConfig):
    """transformers' llava config.json for `cfg` (what save() writes)."""
    t, v = cfg.text, cfg.vision
    if cfg.projector != "mlp2x_gelu":
        raise ValueError("HF llava has only the mlp2x_gelu projector; this model's projector is linear")
    if (BIASES[t.model_type] or (t.o_bias, t.o_bias)) != (t.qkv_bias, t.o_bias) or v.pre_norm != v.class_token:
        raise ValueError(f"HF llava cannot express this model (q/k/v bias {t.qkv_bias}, o bias {t.o_bias} in a "
                         f"{t.model_type}; a ViT with class token {v.class_token} and pre-norm {v.pre_norm})")
    if v.conv_stem:
        raise ValueError(f"HF llava cannot express a ViT with a conv stem ({v.conv_stem})")
    text = dict(model_type=t.model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
                rope_theta=t.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta),
                tie_word_embeddings=t.tie_embeddings, sliding_window=t.sliding_window, attention_bias=t.o_bias,
                mlp_bias=t.mlp_bias, use_sliding_window=t.sliding_window is not None)
    vision = dict(model_type="clip_vision_model" if v.class_token else "siglip_vision_model",
                  hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                  layer_norm_eps=v.layer_norm_eps, hidden_act=v.act, num_channels=v.num_channels)
    if not v.class_token:
        vision["vision_use_head"] = False  # LLaVA never uses SigLIP's pooling head, and we do not keep it
    ours = {} if cfg.chat_format == "auto" else {"nanovalor_chat_format": cfg.chat_format}  # transformers ignores it
    return dict(**ours, architectures=["LlavaForConditionalGeneration"], model_type="llava",
                image_token_index=cfg.image_token_id, image_seq_length=cfg.num_image_tokens,
                projector_hidden_act="gelu", multimodal_projector_bias=cfg.projector_bias,
                vision_feature_layer=cfg.feature_layer, vision_feature_select_strategy=cfg.feature_select,
                tie_word_embeddings=t.tie_embeddings, text_config=text, vision_config=vision)


# -----------------------------------------------------------------------------
# Checkpoints. One explicit key map per layout: ordered (checkpoint prefix -> our prefix) rules, the first match
# wins; None marks known tensors that we do not use. Our names are transformers' in-memory names minus "model.".

LLAVA_HF_NAMES = [  # (our prefix, llava-hf's): what save() writes, as llava-hf/* and transformers 5.x name it
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
]
HF_LLAVA_KEYS = [(hub, ours) for ours, hub in LLAVA_HF_NAMES] + [  # no name matches two rules that disagree
    ("model.language_model.", "language_model."),  # newer transformers saves
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),  # transformers 5.x saves
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
ORIGINAL_LLAVA_KEYS = [  # github.com/haotian-liu/LLaVA (and LLaVA-Med): LlavaLlamaForCausalLM and its siblings
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),  # nn.Sequential(Linear, GELU, Linear)
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.mm_projector.", "multi_modal_projector.linear_1."),  # the "linear" projector: one nn.Linear
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),  # only if the ViT was saved with the model
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
]
VISION_REPO_KEYS = [  # the repo named by mm_vision_tower: a CLIPModel / CLIPVisionModel (or SigLIP) checkpoint
    ("vision_model.", "vision_tower."),
    ("text_model.", None), ("visual_projection.", None), ("text_projection.", None), ("logit_", None),
    ("", "vision_tower."),  # a CLIPVisionModel saved by transformers 5 has no vision_model. level
]
UNUSED = ("rotary_emb.inv_freq", "embeddings.position_ids", "vision_tower.head.")  # buffers old saves kept; SigLIP head


CONFIG_FILES = ["*.json", "*.jinja", "*.txt"]  # what build() fetches of a hub repo: configs and tokenizer, no weights


def read_config(folder):
    """(LlavaConfig, the vision repo's folder or None) of a model folder: transformers' LlavaForConditionalGeneration
    config or the original LLaVA / LLaVA-Med one (its ViT's config from the repo named by mm_vision_tower), with the
    EOS ids of generation_config.json."""
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json, not a model folder")
    d, where = read_json(folder / "config.json"), str(folder / "config.json")
    vision_folder = None
    if "mm_vision_tower" in d:
        vision_folder = resolve(d["mm_vision_tower"], CONFIG_FILES)
        cfg = config_from_original(d, read_json(vision_folder / "config.json"), where)
    elif d.get("model_type") == "llava":
        if d.get("architectures", ["LlavaForConditionalGeneration"]) != ["LlavaForConditionalGeneration"]:
            raise ValueError(f"{where}: architectures {d['architectures']}: expected ['LlavaForConditionalGeneration']")
        cfg = config_from_hf(d, where)
    else:
        raise ValueError(f"{where}: model_type {d.get('model_type')!r} is not a LLaVA model: expected 'llava' "
                         f"(HF layout) or one of {sorted(ORIGINAL_TYPES)} with mm_vision_tower (original layout); or "
                         f"'qwen2_5_vl' (Qwen2.5-VL)")
    if (folder / "generation_config.json").exists():
        generation = read_json(folder / "generation_config.json")
        cfg.eos_token_id = token_ids(generation.get("eos_token_id")) or cfg.eos_token_id
    return cfg, vision_folder


def weight_index(folder):
    """({our name: weights.Entry}, unmapped checkpoint names) of a model folder's weights, nothing read: its own
    files, and for an original-layout checkpoint without the ViT those of the repo named by mm_vision_tower."""
    d = read_json(folder / "config.json")
    if d.get("model_type") == "qwen2_5_vl":
        return checkpoint_index(folder, qwen_vl.HF_QWEN_KEYS, skip=qwen_vl.UNUSED)
    if "mm_vision_tower" not in d:
        return checkpoint_index(folder, HF_LLAVA_KEYS, skip=UNUSED)
    index, unexpected = checkpoint_index(folder, ORIGINAL_LLAVA_KEYS, skip=UNUSED)
    if not any(k.startswith("vision_tower.") for k in index):
        vision_index, vision_unexpected = checkpoint_index(resolve(d["mm_vision_tower"]), VISION_REPO_KEYS, skip=UNUSED)
        index, unexpected = {**index, **vision_index}, unexpected + vision_unexpected
    return index, unexpected


def build(path_or_repo_id, dtype=torch.float32):
    """The Llava of a local folder or hub id on the meta device, in `dtype`, from its config files alone (a hub id:
    only *.json, *.jinja, *.txt are fetched); `source` and `preprocessor_config` set. Nothing is allocated: set what
    trains, apply LoRA, shard it with FSDP2, then fill() reads the weights (each rank only its own rows)."""
    folder = resolve(path_or_repo_id, CONFIG_FILES)
    if (folder / "config.json").exists() and read_json(folder / "config.json").get("model_type") == "qwen2_5_vl":
        return qwen_vl.build(folder, dtype)  # the other family, with the same API
    cfg, vision_folder = read_config(folder)
    with torch.device("meta"):
        model = Llava(cfg).to(dtype)
    model.source = folder
    proc = vision_folder if vision_folder is not None else folder
    if (proc / "preprocessor_config.json").exists():
        model.preprocessor_config = read_json(proc / "preprocessor_config.json")
        if read_json(folder / "config.json").get("image_aspect_ratio") == "pad":  # original LLaVA pads to a square
            model.preprocessor_config["do_pad"] = True                             # with the mean colour
    return model.eval()


def fill(model, path_or_repo_id=None, device=None, trained_only=False):
    """Read a checkpoint's weights (default: the one `model` was built from) into `model`, each cast to the model's
    dtype as it is copied (weights.materialise: peak host memory ~ the model itself, 1/world of it per FSDP2 rank).
    A model on the meta device gets its storage on `device` first (default CPU). LoRA adapters start as lora.reset
    makes them. trained_only=True (resuming a train.py checkpoint into a filled model): only the parameters that
    train are read, frozen ones never change within a stage; the adapters from the checkpoint's adapter.safetensors.
    Any missing, unexpected or mis-shaped tensor is one error that lists them all. Returns the model."""
    folder = resolve(path_or_repo_id or model.source)
    index, unexpected = weight_index(folder)
    embed, text = index.get("language_model.embed_tokens.weight"), model.cfg.text
    if embed is not None and embed.shape != (text.vocab_size, text.hidden_size):  # e.g. a config that omits them
        raise ValueError(f"{folder / 'config.json'}: vocab_size {text.vocab_size} and hidden_size {text.hidden_size} "
                         f"(a field it omits takes transformers' {text.model_type} default) do not fit the "
                         f"checkpoint's embed_tokens of shape {embed.shape}")
    tied = ["lm_head.weight"] if model.cfg.text.tie_embeddings else []
    skip = set(tied) | set(lora.adapter_names(model))
    state = model.state_dict(keep_vars=True)
    only = [k for k, t in state.items() if k not in skip and (t.requires_grad or not trained_only)]
    materialise(model, index, folder, unexpected, tied, only, device)
    if trained_only and lora.adapters(model):
        lora.load_adapter(model, folder)
    elif not trained_only:
        for adapter in lora.adapters(model).values():
            adapter.reset()
    return model


def load(path_or_repo_id, dtype=None, device=None):
    """The Llava (or QwenVL) model of a local folder or hub id, in eval mode: build() then fill(). Layouts:
    transformers' LlavaForConditionalGeneration (every key layout it has written), the original LLaVA / LLaVA-Med
    (vision tower from the repo named by mm_vision_tower unless the checkpoint holds it) and Qwen2.5-VL's. dtype
    defaults to bfloat16 on CUDA and float32 elsewhere. Any missing, unexpected or mis-shaped tensor is one error
    that lists them all."""
    device = torch.device(device or "cpu")
    return fill(build(path_or_repo_id, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)),
                path_or_repo_id, device)


def empty_like(model):
    """An unsharded copy of `model`'s structure (its LoRA adapters included) on the meta device, with its source and
    preprocessing: train.py assigns the full state dict that FSDP gathers into it, to save it."""
    with torch.device("meta"):
        target = type(model)(model.cfg)  # Llava or QwenVL
    if lora.settings(model):
        lora.apply(target, *lora.settings(model))
    target.source, target.preprocessor_config = model.source, model.preprocessor_config
    return target


def save(model, folder):
    """Write `model` in the llava-hf layout (config.json, generation_config.json, model.safetensors, and the
    tokenizer and preprocessor files of the checkpoint it came from), loadable by transformers'
    LlavaForConditionalGeneration and by load(). Atomic (checkpoint.atomic_folder). A QwenVL is written in the hub
    layout of Qwen/Qwen2.5-VL-3B-Instruct (qwen_vl.config_to_hf, qwen_vl.QWEN_HF_NAMES), which transformers'
    Qwen2_5_VLForConditionalGeneration loads."""
    qwen = isinstance(model, qwen_vl.QwenVL)
    config = (qwen_vl.config_to_hf if qwen else config_to_hf)(model.cfg)
    tensors = {}
    for name, t in lora.merged_state_dict(model).items():  # LoRA adapters folded into their weights
        if name == "lm_head.weight" and model.cfg.text.tie_embeddings:
            continue
        old, new = next((o, n) for o, n in (qwen_vl.QWEN_HF_NAMES if qwen else LLAVA_HF_NAMES) if name.startswith(o))
        tensors[new + name[len(old):]] = t.detach().cpu().contiguous()
    from safetensors.torch import save_file

    def fill(path):
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        if lora.adapters(model):  # and the adapters alone (train.py resumes a LoRA run from them)
            lora.save_adapter(model, path)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": model.cfg.eos_token_id}, indent=2))
        if model.preprocessor_config is not None:
            (path / "preprocessor_config.json").write_text(json.dumps(model.preprocessor_config, indent=2))
        for name in TOKENIZER_FILES if model.source is not None else ():
            if (Path(model.source) / name).exists():
                shutil.copy(Path(model.source) / name, path / name)

    atomic_folder(folder, fill)
