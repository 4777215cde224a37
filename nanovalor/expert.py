"""The frozen expert: a CLIP-style image-text dual encoder that scores how well each sampled report matches the
X-ray (VALOR's stage `visual`). Ours from scratch; it loads the checkpoints people use for chest X-rays:

  - BiomedCLIP (Zhang et al. 2023, arXiv 2303.00915; `microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`),
    open_clip's layout: a timm ViT-B/16 and PubMedBERT, [CLS] pooling, MLP text projection, 256-token context;
  - HF `CLIPModel` (OpenAI CLIP, Radford et al. 2021; CheXzero once converted): the causal CLIP text transformer;
  - our own layout (save / load): config.json + model.safetensors + tokenizer.json.

    expert = load("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")   # or a local folder
    scores = expert.similarity(images, reports)   # B X-rays, B lists of G reports -> (B, G) cosine similarities

The image tower is the project's one ViT (vit.py), the BERT text tower bert.py's (also CheXbert's backbone).
Reports longer than the text context are truncated to it (77 tokens for CLIP, 256 for BiomedCLIP, special tokens
included), as open_clip and CheXzero do: findings come first in a report. Speed: `python bench/expert.py`.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from nanovalor.checkpoint import atomic_folder
from nanovalor.data import ImageProcessing, load_image, preprocess, read_preprocessor_config
from nanovalor.bert import (Bert, BertConfig, bert_config_from_state, count_layers, finish_tokenizer,
                            load_bert_tokenizer, tokenize)
from nanovalor.decoder import attention_mask_4d
from nanovalor.vit import VisionConfig, VisionEncoder, VisionTower, vision_config_from_hf
from nanovalor.weights import checkpoint_files, load_checked, read_checkpoint, read_tokenizer, read_weights, resolve

def load_clip_tokenizer(folder, max_length=77):
    """CLIP byte-level BPE tokenizer from `tokenizer.json` (HF CLIPTokenizer's: <|startoftext|> ... <|endoftext|>).
    Padded with tokenizer_config.json's pad_token (default <|endoftext|>); truncated to max_length tokens with the
    end-of-text token kept last, where the CLIP text tower pools."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json for the CLIP tokenizer")
    pad = "<|endoftext|>"
    if (folder / "tokenizer_config.json").exists():
        pad = json.loads((folder / "tokenizer_config.json").read_text()).get("pad_token", pad)
        pad = pad["content"] if isinstance(pad, dict) else pad
    return finish_tokenizer(read_tokenizer(folder / "tokenizer.json"), folder, max_length, pad)


# -----------------------------------------------------------------------------
# CLIP text transformer (Radford et al. 2021, as in HF CLIPTextModel): pre-LN blocks under a causal mask, pooled
# at the end-of-text token. Its blocks are vit.py's ViT blocks (the same names as HF's CLIPEncoderLayer), given a
# causal attention mask.


@dataclass
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"
    eos_token_id: int = 49407  # 2 in configs written before transformers PR #24773: then pool at the highest id


def clip_text_config_from_hf(d):
    """ClipTextConfig from an HF `text_config` dict (CLIPTextConfig)."""
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_config.hidden_act {act!r}: expected 'quick_gelu' or 'gelu'")
    return ClipTextConfig(
        vocab_size=d.get("vocab_size", 49408), hidden_size=d.get("hidden_size", 512),
        num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 8),
        intermediate_size=d.get("intermediate_size", 2048),
        max_position_embeddings=d.get("max_position_embeddings", 77),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5), act=act, eos_token_id=d.get("eos_token_id", 49407))


class ClipText(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        blocks = VisionConfig(hidden_size=d, intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, layer_norm_eps=cfg.layer_norm_eps, act=cfg.act)
        self.embeddings = nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab_size, d),
                                             position_embedding=nn.Embedding(cfg.max_position_embeddings, d)))
        self.encoder = VisionEncoder(blocks)  # encoder.layers.N, as HF's CLIPTextModel names them
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T), attention_mask (B, T) -> (B, T, D) hidden states after the final LayerNorm."""
        B, T = input_ids.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"CLIP text input of {T} tokens: at most {self.cfg.max_position_embeddings}")
        x = self.embeddings["token_embedding"](input_ids) + self.embeddings["position_embedding"].weight[:T]
        # (B, 1, T, T): causal, padded keys hidden, each query sees itself (no empty softmax row under left padding)
        keep = attention_mask_4d(torch.ones_like(input_ids) if attention_mask is None else attention_mask, T, 0,
                                 input_ids.device)
        for block in self.encoder.layers:
            x = block(x, keep)
        return self.final_layer_norm(x)

    def pooled(self, hidden, input_ids):
        """(B, T, D) -> (B, D): the hidden state at the first end-of-text token (HF CLIPTextModel's rule)."""
        eos = self.cfg.eos_token_id
        where = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), where]


# -----------------------------------------------------------------------------
# The dual encoder: image tower + projection, text tower + projection, learned logit scale.
# Our parameter names follow HF CLIPModel with vision_model -> visual and text_model -> text.


@dataclass
class ExpertConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: BertConfig | ClipTextConfig = field(default_factory=ClipTextConfig)
    embed_dim: int = 512
    text_projection: str = "linear"  # "mlp": open_clip's Linear -> GELU -> Linear, both without bias (BiomedCLIP)
    context_length: int = 77  # longer reports are truncated to this many tokens (specials included): our one rule


class Expert(nn.Module):
    """CLIP-style scorer. `encode_images` / `encode_texts` are differentiable (contrastive training of a tiny
    expert); `similarity` is the frozen GRPO scorer."""

    def __init__(self, cfg: ExpertConfig, tokenizer=None, processing=None):
        super().__init__()
        if cfg.text_projection not in ("linear", "mlp"):
            raise ValueError(f"ExpertConfig.text_projection {cfg.text_projection!r}: expected 'linear' or 'mlp'")
        if cfg.context_length > cfg.text.max_position_embeddings:
            raise ValueError(f"ExpertConfig.context_length {cfg.context_length} > the text tower's "
                             f"max_position_embeddings {cfg.text.max_position_embeddings}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.processing = processing or ImageProcessing(size=cfg.vision.image_size)  # OpenAI CLIP's by default
        self.visual = VisionTower(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.embed_dim, bias=False)
        self.text = Bert(cfg.text) if isinstance(cfg.text, BertConfig) else ClipText(cfg.text)
        d, e = cfg.text.hidden_size, cfg.embed_dim
        if cfg.text_projection == "mlp":
            self.text_projection = nn.Sequential(nn.Linear(d, (d + e) // 2, bias=False), nn.GELU(),
                                                 nn.Linear((d + e) // 2, e, bias=False))
        else:
            self.text_projection = nn.Linear(d, e, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_images(self, pixel_values):
        """(B, C, S, S) preprocessed pixels -> (B, E) unit-norm embeddings (class token, projected)."""
        return F.normalize(self.visual_projection(self.visual.pooled(pixel_values)), dim=-1)

    def encode_texts(self, input_ids, attention_mask):
        """(B, T) token ids and mask -> (B, E) unit-norm embeddings: BERT pools [CLS], CLIP its end-of-text token."""
        hidden = self.text(input_ids, attention_mask)  # (B, T, D)
        pooled = hidden[:, 0] if isinstance(self.text, Bert) else self.text.pooled(hidden, input_ids)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def tokenize(self, texts):
        return tokenize(self.tokenizer, texts)

    @torch.no_grad()
    def similarity(self, images, reports, max_text_tokens=16384, max_images=32):
        """images: B X-rays (paths, PIL images, or a (B, C, S, S) preprocessed tensor); reports: B lists of G
        strings -> (B, G) cosine similarities in [-1, 1], float32, on the CPU. Each image is encoded once for its
        group, each distinct report once.
        Reports are sorted by length and encoded in chunks of at most max_text_tokens padded tokens (the memory
        cap); images in chunks of max_images."""
        if len(images) != len(reports) or len({len(group) for group in reports}) > 1:
            raise ValueError(f"similarity(): expected B images and B lists of G reports, got {len(images)} images "
                             f"and groups of sizes {sorted({len(group) for group in reports})}")
        B, G = len(reports), len(reports[0]) if len(reports) else 0
        if B * G == 0:
            return torch.zeros(B, G)
        was_training, device = self.training, self.logit_scale.device
        self.eval()
        try:
            if not torch.is_tensor(images):
                images = preprocess([load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in images],
                                    self.processing)  # (B, C, S, S)
            image_emb = torch.cat([self.encode_images(images[i:i + max_images].to(device))
                                   for i in range(0, B, max_images)])  # (B, E)
            # Each distinct token sequence is encoded once: cheaper (a group often repeats a report), and reports that
            # read the same after truncation get identical scores whatever else is in the batch (padding to another
            # width moves a score by ~1e-7, which rank advantages would turn into a whole rank step).
            encoded = self.tokenizer.encode_batch([r for group in reports for r in group])  # B*G, padded alike
            keys = [(tuple(e.ids), tuple(e.attention_mask)) for e in encoded]
            distinct = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # U distinct rows, first seen first
            ids, mask = (torch.tensor([key[j] for key in distinct]) for j in (0, 1))  # (U, T) each
            which = torch.tensor([distinct[key] for key in keys])  # (B*G,): the distinct row of each report
            text_emb = self._encode_sorted(ids.to(device), mask.to(device), max_text_tokens)  # (U, E)
            cosines = image_emb.float() @ text_emb.float().T  # (B, U): every X-ray against every distinct report
        finally:
            self.train(was_training)
        # Each X-ray's own group, read on the host: rewards live beside the text rewards and the group bookkeeping,
        # whatever device scores them.
        return cosines.cpu().gather(1, which.view(B, G))  # (B, G)

    def _encode_sorted(self, ids, mask, max_tokens):
        # Longest first, so each chunk is padded only to its own longest report and holds <= max_tokens tokens.
        lengths = mask.sum(1)
        order = lengths.argsort(descending=True)
        out = torch.empty(len(ids), self.cfg.embed_dim, device=ids.device, dtype=self.logit_scale.dtype)
        start = 0
        while start < len(ids):
            width = int(lengths[order[start]])
            rows = order[start:start + max(1, max_tokens // width)]
            out[rows] = self.encode_texts(ids[rows, :width], mask[rows, :width]).to(out.dtype)
            start += len(rows)
        return out


# -----------------------------------------------------------------------------
# Checkpoints. Each reader returns (ExpertConfig, state dict in our names, tokenizer, ImageProcessing, source:
# the weights file, or the folder of an HF layout that may be sharded).

FORMAT = "nanovalor-expert"
IGNORED = re.compile(r".*embeddings\.(position_ids|token_type_ids)$")  # buffers older HF checkpoints carry


def contrastive_loss(expert, pixel_values, input_ids, attention_mask):
    """CLIP's symmetric InfoNCE over B matching (image, report) pairs, the other B - 1 in the batch as negatives
    (Radford et al. 2021): how `train.py --stage expert` trains an expert for a new domain or the phantom world."""
    images = expert.encode_images(pixel_values)  # (B, E)
    texts = expert.encode_texts(input_ids, attention_mask)  # (B, E)
    logits = expert.logit_scale.exp().clamp(max=100) * images @ texts.T  # (B, B); CLIP caps the scale at 100
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _read_ours(folder, d):
    where = folder / "config.json"
    text_cls = {"bert": BertConfig, "clip": ClipTextConfig}.get(d.get("text_kind"))
    if text_cls is None:
        raise ValueError(f"{where}: text_kind {d.get('text_kind')!r}: expected 'bert' or 'clip'")
    try:
        cfg = ExpertConfig(vision=VisionConfig(**d["vision"]), text=text_cls(**d["text"]), embed_dim=d["embed_dim"],
                           text_projection=d["text_projection"], context_length=d["context_length"])
        proc = ImageProcessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["processing"].items()})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a {FORMAT} config ({e})") from None
    load_tokenizer = load_bert_tokenizer if text_cls is BertConfig else load_clip_tokenizer
    source = folder / "model.safetensors"
    return cfg, read_weights(source), load_tokenizer(folder, cfg.context_length), proc, source


HF_CLIP_KEYS = [("vision_model.", "visual."), ("text_model.", "text."), ("", "")]  # the rest as they are


def _read_hf_clip(folder, d):
    """HF CLIPModel (OpenAI CLIP, CheXzero converted): config.json, model.safetensors (or pytorch_model.bin, or
    shards), tokenizer.json, preprocessor_config.json. Names: vision_model.* -> visual.*, text_model.* -> text.*."""
    vision = vision_config_from_hf({"model_type": "clip_vision_model", **d.get("vision_config", {})})
    text = clip_text_config_from_hf(d.get("text_config", {}))
    cfg = ExpertConfig(vision=vision, text=text, embed_dim=d.get("projection_dim", 512), text_projection="linear",
                       context_length=text.max_position_embeddings)
    sd, _ = read_checkpoint(folder, HF_CLIP_KEYS)
    proc = read_preprocessor_config(folder) if (folder / "preprocessor_config.json").exists() else None
    return cfg, sd, load_clip_tokenizer(folder, cfg.context_length), proc, folder


OPEN_CLIP_NAMES = [  # (open_clip key prefix as a regex, ours); timm's fused attn.qkv is split in _from_open_clip
    (r"visual\.trunk\.cls_token", "visual.embeddings.class_embedding"),  # (1, 1, D) -> (D,)
    (r"visual\.trunk\.pos_embed", "visual.embeddings.position_embedding.weight"),  # (1, 1+P, D) -> (1+P, D)
    (r"visual\.trunk\.patch_embed\.proj\.", "visual.embeddings.patch_embedding."),
    (r"visual\.trunk\.blocks\.(\d+)\.norm1\.", r"visual.encoder.layers.\1.layer_norm1."),
    (r"visual\.trunk\.blocks\.(\d+)\.attn\.proj\.", r"visual.encoder.layers.\1.self_attn.out_proj."),
    (r"visual\.trunk\.blocks\.(\d+)\.norm2\.", r"visual.encoder.layers.\1.layer_norm2."),
    (r"visual\.trunk\.blocks\.(\d+)\.mlp\.", r"visual.encoder.layers.\1.mlp."),
    (r"visual\.trunk\.norm\.", "visual.post_layernorm."),  # timm norms every token, we only the class token
    (r"visual\.head\.proj\.", "visual_projection."),
    (r"text\.transformer\.", "text."),  # an HF BertModel
    (r"text\.proj\.", "text_projection."),  # Linear, or Sequential(Linear, GELU, Linear): .0 and .2
]


def _from_open_clip(sd):
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", k):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):  # (3D, ...) -> 3 x (D, ...)
                out[f"visual.encoder.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        pattern, ours = next(((p, o) for p, o in OPEN_CLIP_NAMES if re.match(p, k)), ("", ""))
        out[re.sub("^" + pattern, ours, k) if pattern else k] = v
    for k, keep in (("visual.embeddings.class_embedding", 1), ("visual.embeddings.position_embedding.weight", 2)):
        if k in out and out[k].dim() == 3:
            out[k] = out[k].reshape(out[k].shape[-keep:])
    return out


def _read_open_clip(folder):
    """open_clip's BiomedCLIP layout: a timm ViT (class-token pooling, linear head) + an HF BERT ([CLS] pooling,
    linear or MLP projection), open_clip_config.json + open_clip_pytorch_model.bin (or .safetensors). The config
    names the towers but not their shapes (open_clip fetches those from the hub), so the shapes are read off the
    tensors, with 64-wide attention heads as in every timm ViT and BERT size."""
    where = folder / "open_clip_config.json"
    d = json.loads(where.read_text())
    model = d.get("model_cfg", {})
    vision, text = model.get("vision_cfg", {}), model.get("text_cfg", {})
    for key, value, allowed in (
            ("vision_cfg.timm_pool", vision.get("timm_pool", ""), ("", "token")),
            ("vision_cfg.timm_proj", vision.get("timm_proj", "linear"), ("linear",)),
            ("text_cfg.hf_pooler_type", text.get("hf_pooler_type"), ("cls_last_hidden_state_pooler",)),
            ("text_cfg.hf_proj_type", text.get("hf_proj_type"), ("linear", "mlp"))):
        if value not in allowed:
            raise ValueError(f"{where}: model_cfg.{key} = {value!r}: expected one of {allowed}")
    source = checkpoint_files(folder, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))[0]  # one file
    sd = _from_open_clip(read_weights(source))
    try:
        patch = sd["visual.embeddings.patch_embedding.weight"]  # (D, C, p, p)
        vision_cfg = VisionConfig(
            image_size=vision.get("image_size", 224), patch_size=patch.shape[-1], hidden_size=patch.shape[0],
            intermediate_size=sd["visual.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_layers=count_layers(sd, "visual.encoder.layers."), num_heads=patch.shape[0] // 64,
            layer_norm_eps=1e-6, act="gelu", class_token=True, pre_norm=False, patch_bias=True,
            num_channels=patch.shape[1])
        text_cfg = bert_config_from_state(sd, "text.")
    except KeyError as e:
        raise ValueError(f"{source}: not a timm ViT + BERT open_clip checkpoint ({e} missing)") from None
    cfg = ExpertConfig(vision=vision_cfg, text=text_cfg, embed_dim=model.get("embed_dim", 512),
                       text_projection=text["hf_proj_type"], context_length=text.get("context_length", 77))
    # open_clip's eval transform: resize (bicubic) + centre crop to image_size, mean / std from preprocess_cfg
    pre = d.get("preprocess_cfg", {})
    mode = {"shortest": "crop", "squash": "resize"}.get(pre.get("resize_mode", "shortest"))
    resample = {"bicubic": 3, "bilinear": 2}.get(pre.get("interpolation", "bicubic"))  # PIL Image.Resampling
    if mode is None or resample is None:
        raise ValueError(f"{where}: preprocess_cfg resize_mode {pre.get('resize_mode')!r} / interpolation "
                         f"{pre.get('interpolation')!r}: expected shortest or squash / bicubic or bilinear")
    proc = ImageProcessing(size=vision_cfg.image_size, mode=mode, resample=resample,
                           **{k: tuple(pre[k]) for k in ("mean", "std") if k in pre})
    return cfg, sd, load_bert_tokenizer(folder, cfg.context_length), proc, source


def load(path_or_repo_id, device="cpu"):
    """An Expert in eval mode (float32) from a local folder or a hub id: our layout, open_clip, or HF CLIPModel."""
    folder = resolve(path_or_repo_id, ["*.json", "vocab.txt", "*.safetensors", "open_clip_pytorch_model.bin"])
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if config.get("format") == FORMAT:
        cfg, sd, tokenizer, proc, source = _read_ours(folder, config)
    elif (folder / "open_clip_config.json").exists():
        cfg, sd, tokenizer, proc, source = _read_open_clip(folder)
    elif config.get("model_type") == "clip":
        cfg, sd, tokenizer, proc, source = _read_hf_clip(folder, config)
    else:
        raise ValueError(f"{folder}: not an expert checkpoint (expected our config.json with format {FORMAT!r}, "
                         "open_clip_config.json, or an HF CLIPModel config.json)")
    if proc is not None and proc.size != cfg.vision.image_size:
        raise ValueError(f"{folder}: images are processed to {proc.size} px, the vision tower takes "
                         f"{cfg.vision.image_size} px")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        expert = Expert(cfg, tokenizer, proc)  # proc None: OpenAI CLIP's processing
    load_checked(expert, {k: v for k, v in sd.items() if not IGNORED.match(k)}, source, cast=_float)
    return expert.to(device).eval()


def _float(t):  # weights to float32; integer buffers (a BatchNorm's num_batches_tracked) as they are
    return t.float() if t.is_floating_point() else t


def save(expert, folder):
    """Our layout: config.json (towers, projection, context, processing), model.safetensors, tokenizer.json.
    Atomic (checkpoint.atomic_folder): a reader never sees half an expert."""
    cfg = expert.cfg
    meta = dict(format=FORMAT, text_kind="bert" if isinstance(cfg.text, BertConfig) else "clip",
                vision=asdict(cfg.vision), text=asdict(cfg.text), embed_dim=cfg.embed_dim,
                text_projection=cfg.text_projection, context_length=cfg.context_length,
                processing=asdict(expert.processing))
    tensors = {k: v.detach().cpu().contiguous() for k, v in expert.state_dict().items()}

    def fill(path):
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        save_file(tensors, str(path / "model.safetensors"))
        expert.tokenizer.save(str(path / "tokenizer.json"))

    atomic_folder(folder, fill)
