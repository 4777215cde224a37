"""Write chest X-ray reports with a trained policy, and show where in the image the report looked.

    python sample.py --model out/text/checkpoint --image a.png --image b.png
    python sample.py --model out/visual/checkpoint --image a.png --heatmap attention.png
    python sample.py --model microsoft/llava-med-v1.5-mistral-7b --image a.png --temperature 0.7 --seed 1

Prints one "<image>: <report>" line per image on stdout (greedy by default; --temperature > 0 samples, seeded by
--seed). The prompt and the length cap are those the checkpoint was trained with (its train_config.json), unless
--prompt / --max_new_tokens say otherwise.

--heatmap OUT.png writes one PNG with a panel per image, side by side, each the X-ray as the model sees it (resized
and cropped by its preprocessing: S x S pixels, S = the ViT's image_size) coloured by the decoder's attention from
the report to the image patches. How: prompt + generated report are teacher-forced through the policy; the decoder
uses SDPA, which returns no probabilities, so forward hooks catch each layer's q and k projections and the
probabilities softmax(q k^T / sqrt(d)) are rebuilt with the model's RoPE, GQA head sharing and causal mask, at the
queries that predicted each generated token (EOS included: the position before it). They are averaged over heads,
layers and those queries; the image-token columns, in the ViT's row-major patch order, become the
(image_size / patch_size)^2 grid, which is upsampled bilinearly and drawn blue to red over the X-ray, opacity
growing with attention. Each panel is scaled to its own min..max; stderr gives the attention share on the image.
"""
import io
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from nanovalor import policy as policies
from nanovalor.checkpoint import write_atomic
from nanovalor.config import checked, parse
from nanovalor.data import load_image, preprocess, read_preprocessor_config
from nanovalor.evaluation import generation_settings, training_config
from nanovalor.generate import decode_completions, encode_prompts, load_tokenizer, sample
from nanovalor.decoder import apply_rope, rope_cos_sin


@dataclass
class Config:
    model: str = ""  # a policy checkpoint folder (train.py's out/<stage>/checkpoint) or hub id
    image: list[str] = field(default_factory=list)  # X-ray files; give --image once per image
    prompt: str = ""  # "": the prompt the checkpoint was trained with, else data.DEFAULT_PROMPT
    max_new_tokens: int = 0  # 0: the checkpoint's training max_new_tokens, else 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling when --temperature > 0 (1: off)
    seed: int = 0  # the sampling seed (--temperature > 0)
    heatmap: str = ""  # write the attention map PNG here
    device: str = ""  # "": cuda when available, else cpu


@torch.no_grad()
def attention_probs(model, input_ids, pixel_values, queries):
    """Each decoder layer's attention probabilities (L, H, n, T) from the positions `queries` (n,) of one unpadded
    sequence input_ids (1, T) (its image: pixel_values (1, 3, S, S)) to all T positions; fp32 (fp64 models: fp64)."""
    cfg, T = model.cfg.text, input_ids.shape[1]
    caught, hooks = {}, []  # (layer, "q" | "k") -> that projection's output, (1, T, heads * head_dim)
    for i, block in enumerate(model.language_model.layers):
        for name in ("q", "k"):
            hook = lambda module, args, out, key=(i, name): caught.__setitem__(key, out)
            hooks.append(getattr(block.self_attn, f"{name}_proj").register_forward_hook(hook))
    try:
        model.hidden_states(input_ids, pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    dtype = torch.promote_types(caught[0, "q"].dtype, torch.float32)  # fp32 at least (bf16 models on GPU)
    positions = torch.arange(T, device=input_ids.device)
    cos, sin = rope_cos_sin(positions[None], cfg.head_dim, cfg.rope_theta, dtype)  # (1, T, hd)
    future = positions[None, :] > queries[:, None]  # (n, T): keys a query may not see (causal mask)
    probs = []
    for i in range(cfg.num_layers):
        q = caught[i, "q"].to(dtype).view(1, T, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (1, H, T, hd)
        k = caught[i, "k"].to(dtype).view(1, T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # (1, H_kv, T, hd)
        q = apply_rope(q, cos, sin)[0][:, queries]  # (H, n, hd)
        k = apply_rope(k, cos, sin)[0].repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 0)  # (H, T, hd): GQA
        scores = q @ k.transpose(1, 2) * cfg.head_dim ** -0.5  # (H, n, T)
        probs.append(scores.masked_fill(future, float("-inf")).softmax(-1))
    return torch.stack(probs)  # (L, H, n, T)


def image_attention(model, probs, input_ids):
    """probs (L, H, n, T) -> the mean attention on each image patch (g, g), g = image_size / patch_size, and the
    mean share of the queries' attention that goes to the image."""
    on_image = probs[..., input_ids[0] == model.cfg.image_token_id].mean((0, 1, 2))  # (P,) or (1 + P,)
    g = model.cfg.vision.image_size // model.cfg.vision.patch_size
    if on_image.numel() not in (g * g, g * g + 1):
        raise ValueError(f"{on_image.numel()} image tokens for a {g} x {g} patch grid: one image per prompt only")
    return on_image[-g * g:].view(g, g), float(on_image.sum())  # a class token (feature_select "full") comes first


COLOURS = np.array([[0, 0, .5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [.5, 0, 0]])  # blue -> red, "jet"-like


def overlay(view, heat, opacity=0.6):
    """view: RGB PIL image (S, S); heat (g, g) numpy -> the X-ray in grey with the heat map coloured over it."""
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)  # 0..1 within this image
    up = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(view.size, Image.Resampling.BILINEAR))
    up = up.clip(0, 1)[..., None]  # (S, S, 1)
    colour = np.stack([np.interp(up[..., 0], np.linspace(0, 1, len(COLOURS)), c) for c in COLOURS.T], -1) * 255
    grey = np.asarray(view.convert("L").convert("RGB"), dtype=np.float64)  # (S, S, 3)
    alpha = opacity * up  # where the report did not look, the X-ray shows as it is
    return Image.fromarray(np.rint((1 - alpha) * grey + alpha * colour).astype(np.uint8))


def model_view(pixels, processing):
    """Normalised pixels (3, S, S) -> the RGB image the model saw (exactly: normalisation inverted, rounded)."""
    x = pixels.permute(1, 2, 0).double() * torch.tensor(processing.std) + torch.tensor(processing.mean)
    return Image.fromarray(np.rint(x.clamp(0, 1).numpy() * 255).astype(np.uint8))


def main(cfg):
    if not cfg.model or not cfg.image:
        raise SystemExit("error: give --model DIR and at least one --image FILE")
    images = [checked(load_image, path) for path in cfg.image]  # a missing or unreadable image is named
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = checked(policies.load, cfg.model, device=device)
    tok = checked(load_tokenizer, model.source)
    trained = checked(training_config, model.source)  # {} for a checkpoint not written by train.py
    prompt, cap = generation_settings(trained, cfg.prompt, cfg.max_new_tokens)
    processing = checked(read_preprocessor_config, model.preprocessor_config or {})
    if cfg.heatmap and not isinstance(model, policies.Llava):
        raise SystemExit("error: --heatmap reads a fixed patch grid: LLaVA-family policies only, not Qwen2.5-VL")
    pixels = preprocess(images, processing).to(device)  # (n, 3, S, S), or PackedImages (Qwen2.5-VL)
    ids, mask = encode_prompts(tok, model.cfg, [prompt] * len(images), pixels)  # (n, T0): LLaVA: no padding
    ids, mask = ids.to(device), mask.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = sample(model, ids, mask, pixels, max_new_tokens=cap,
                 temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
    for path, report in zip(cfg.image, decode_completions(tok, out)):
        print(f"{path}: {report}", flush=True)
    if not cfg.heatmap:
        return
    panels = []
    for i, path in enumerate(cfg.image):
        generated = out.tokens[i][out.mask[i]]  # (m,) the report's tokens, EOS included when it stopped
        seq = torch.cat([ids[i], generated])[None]  # (1, T0 + m)
        queries = torch.arange(m := len(generated), device=device) + ids.shape[1] - 1  # each predicted a token
        probs = attention_probs(model, seq, pixels[i:i + 1], queries)  # (L, H, m, T0 + m)
        heat, share = image_attention(model, probs, seq)
        print(f"{path}: {share:.1%} of the attention of the report's {m} queries is on the image", file=sys.stderr)
        panels.append(overlay(model_view(pixels[i].cpu(), processing), heat.cpu().numpy()))
    S = panels[0].size[0]
    canvas = Image.new("RGB", (S * len(panels), S))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * S, 0))
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    checked(write_atomic, cfg.heatmap, png.getvalue())
    print(f"attention map ({len(panels)} panel(s) of {S} x {S}) -> {cfg.heatmap}", file=sys.stderr)


if __name__ == "__main__":
    main(checked(parse, Config))
