"""The one ViT of the project (nanovalor.vit.VisionTower) against transformers' CLIP and SigLIP vision models.

    python -m pytest -q tests/test_vision.py
"""
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from nanovalor.vit import VisionTower, vision_config_from_hf

# Odd sizes on purpose: hidden 36 with 3 heads, intermediate 50, 5x5 patches of 7 px.
SHAPE = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3, image_size=35,
             patch_size=7)


def _ours(hf):
    cfg = vision_config_from_hf(hf.config.to_dict())
    tower = VisionTower(cfg).eval()
    missing, unexpected = tower.load_state_dict(hf.state_dict(), strict=False)
    unexpected = [k for k in unexpected if not k.startswith("head.")]  # SigLIP's pooling head is not ours
    assert not missing and not unexpected, (missing, unexpected)
    return tower


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hidden_states_match_transformers(kind):
    torch.manual_seed(0)
    if kind == "clip":
        hf = CLIPVisionModel(CLIPVisionConfig(**SHAPE)).eval()
    else:
        hf = SiglipVisionModel(SiglipVisionConfig(**SHAPE, vision_use_head=False)).eval()
    tower = _ours(hf)
    x = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings + one per block
        assert len(ref) == 4
        for layer in (0, 1, -2, -1):
            ours = tower(x, feature_layer=layer)
            assert ours.shape == ref[layer].shape == (2, 25 + (kind == "clip"), 36)
            torch.testing.assert_close(ours, ref[layer], rtol=0, atol=1e-5)


def test_clip_pooled_matches_transformers():
    torch.manual_seed(1)
    hf = CLIPVisionModel(CLIPVisionConfig(**SHAPE, hidden_act="quick_gelu")).eval()
    tower = _ours(hf)
    x = torch.randn(3, 3, 35, 35)
    with torch.no_grad():
        torch.testing.assert_close(tower.pooled(x), hf(pixel_values=x).pooler_output, rtol=0, atol=1e-5)


def test_siglip_has_no_pooled_class_token():
    cfg = vision_config_from_hf(SiglipVisionConfig(**SHAPE).to_dict())
    with pytest.raises(ValueError, match="no class token"):
        VisionTower(cfg).pooled(torch.zeros(1, 3, 35, 35))


def test_unknown_vision_model_type_is_an_error():
    with pytest.raises(ValueError, match="model_type 'dinov2'"):
        vision_config_from_hf({"model_type": "dinov2"})
