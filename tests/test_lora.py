"""nanovalor.lora: B = 0 gives the base model exactly, merged weights equal the adapters within float error, what
policy.save writes loads in transformers, the adapters alone round-trip, only the adapters train, and GRPO's
reference is the base (adapters off) at no copy of the decoder.

    python -m pytest -q tests/test_lora.py
"""
import json

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from nanovalor import lora
from nanovalor.decoder import DecoderConfig
from nanovalor.grpo import CompletionLogprobs, reference_model
from nanovalor.policy import Llava, LlavaConfig, load, save
from nanovalor.vit import VisionConfig

IMAGE = 100  # the image token id; 5 x 5 patches of a 35 px image


def tiny(seed=0):
    """A random tiny LLaVA (Qwen2 decoder: q/k/v biases; GQA; odd sizes), weights scaled so logits are O(1)."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision=VisionConfig(image_size=35, patch_size=7, hidden_size=36, intermediate_size=50,
                                          num_layers=2, num_heads=3),
                      text=DecoderConfig(model_type="qwen2", vocab_size=101, hidden_size=48, intermediate_size=80,
                                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, qkv_bias=True),
                      image_token_id=IMAGE, eos_token_id=[99])
    model = Llava(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 99, (2, 3), generator=g), torch.full((2, 25), IMAGE),
                     torch.randint(0, 99, (2, 6), generator=g)], 1)  # (2, 34)
    return ids, torch.randn(2, 3, 35, 35, generator=g)


def train_adapters(model, steps=3):
    """A few AdamW steps on a made-up loss: A and B move away from their start (B from 0)."""
    ids, pixels = inputs(1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(ids, pixels).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_zero_B_gives_the_base_logits_exactly():
    model = tiny()
    ids, pixels = inputs()
    with torch.no_grad():
        base = model(ids, pixels)
        lora.apply(model, rank=4, alpha=8)
        adapted = model(ids, pixels)
    assert all(m.lora_A.abs().sum() > 0 and not m.lora_B.any() for m in lora.adapters(model).values())
    assert torch.equal(adapted, base)


def test_only_the_adapters_and_what_else_trains_train():
    model = tiny()
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    with pytest.raises(ValueError, match="leaves language_model frozen"):
        lora.apply(model, 4, 8)
    model.language_model.requires_grad_(True)
    with pytest.raises(ValueError, match=r"no linear layer of the decoder is named \['qkv'\]"):
        lora.apply(model, 4, 8, "q_proj,qkv")
    n = lora.apply(model, 4, 8, "q_proj,down_proj")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    per_layer = 4 * (48 + 48) + 4 * (80 + 48)  # q_proj 48 -> 48, down_proj 80 -> 48: r * (in + out) each
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    assert n == 2 * per_layer + projector
    assert trained == set(lora.adapter_names(model)) | {f"multi_modal_projector.{k}" for k, _ in
                                                        model.multi_modal_projector.named_parameters()}
    assert len(lora.adapters(model)) == 4
    assert all(k.endswith(("mlp.down_proj", "self_attn.q_proj")) for k in lora.adapters(model))
    assert not any(isinstance(m, lora.LoRALinear) for m in model.vision_tower.modules())  # its q_proj untouched
    with pytest.raises(ValueError, match="already applied"):
        lora.apply(model, 4, 8)


def test_merged_equals_unmerged_and_transformers_loads_the_merged_save(tmp_path):
    model = tiny()
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)  # only the adapters will train
    lora.apply(model, rank=4, alpha=12)
    train_adapters(model)
    assert all(m.lora_B.abs().max() > 1e-3 for m in lora.adapters(model).values())
    ids, pixels = inputs()
    with torch.no_grad():
        unmerged = model(ids, pixels)
        plain = Llava(model.cfg).eval()
        plain.load_state_dict(lora.merged_state_dict(model))
        torch.testing.assert_close(plain(ids, pixels), unmerged, rtol=0, atol=1e-5)
        with lora.disabled(model):  # the base: the adapters moved the logits
            assert (model(ids, pixels) - unmerged).abs().max() > 1e-2
    save(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text()) == {
        "rank": 4, "alpha": 12, "targets": "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"}
    with torch.no_grad():
        hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(load(tmp_path / "saved")(ids, pixels), unmerged, rtol=0, atol=1e-5)
    # the adapters alone, onto the base model: the trained model again, exactly
    again = tiny()
    lora.apply(again, rank=4, alpha=12, seed=5)
    lora.load_adapter(again, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids, pixels), unmerged)


def test_the_reference_is_the_base_with_the_starting_projector():
    """With LoRA, GRPO's reference (grpo.reference_model) turns the adapters off and swaps in the starting values of
    the other trained parameters (the projector here): the starting policy, with no copy of the decoder."""
    model = tiny()
    ids, pixels = inputs()
    tokens, mask = torch.tensor([[5, 7, 99], [8, 99, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    scorer = CompletionLogprobs(model)
    with torch.no_grad():
        start = scorer(pixels, ids, torch.ones_like(ids), tokens, mask)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    model.language_model.requires_grad_(True)
    lora.apply(model, 4, 8)
    reference = reference_model(model)
    train_adapters(model)
    with torch.no_grad():
        moved = scorer(pixels, ids, torch.ones_like(ids), tokens, mask)
        with reference(scorer):
            ref = scorer(pixels, ids, torch.ones_like(ids), tokens, mask)
        assert torch.equal(scorer(pixels, ids, torch.ones_like(ids), tokens, mask), moved)  # restored
    assert (moved - start).abs().max() > 1e-2
    torch.testing.assert_close(ref, start, rtol=0, atol=0)
