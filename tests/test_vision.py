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


def test_conv_stem_equals_a_hand_written_float64_reference():
    """Early convolutions (VisionConfig.conv_stem): 3x3 stride-2 conv, BatchNorm (eval: running statistics), exact
    GELU, per width; then the patch embedding over what is left of the patch (8 px / 2^2 = 2 px)."""
    from nanovalor.vit import VisionConfig
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=12, intermediate_size=20, num_layers=1, num_heads=2,
                       conv_stem=[4, 6])  # a JSON list, as a saved config holds it
    tower = VisionTower(cfg).double().eval()
    assert cfg.conv_stem == (4, 6) and cfg.num_patches == 16
    for bn in (m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as if trained
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    h, e = x, tower.embeddings
    for conv, bn in ((e.stem[0], e.stem[1]), (e.stem[3], e.stem[4])):
        h = torch.nn.functional.conv2d(h, conv.weight, stride=2, padding=1)  # (2, C, S/2, S/2)
        h = (h - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
        h = h * bn.weight[:, None, None] + bn.bias[:, None, None]
        h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))
    assert h.shape == (2, 6, 8, 8)
    patches = torch.nn.functional.conv2d(h, e.patch_embedding.weight, stride=2).flatten(2).transpose(1, 2)  # (2,16,12)
    want = torch.cat([e.class_embedding.expand(2, 1, 12), patches], 1) + e.position_embedding.weight
    with torch.no_grad():
        torch.testing.assert_close(e(x), want, rtol=0, atol=1e-12)
        assert tower(x).shape == (2, 17, 12)
    for patch, stem in ((10, (4, 6)), (2, (4, 6))):  # 10 px is not 2^2 * k; 2 px leaves nothing after two strides
        with pytest.raises(ValueError, match="conv stem"):
            VisionTower(VisionConfig(image_size=40, patch_size=patch, conv_stem=stem))
