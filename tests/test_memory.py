"""nanovalor.memory, the dry run's memory plan: the LLaVA-Med v1.5 Mistral-7B configuration has its known size, the
plan's numbers equal hand-computed ones on a tiny model, and `train.py --dry_run` prints it from config files alone.

    python -m pytest -q tests/test_memory.py
"""
import json

import pytest
import torch

import train
from nanovalor import lora, memory
from nanovalor.decoder import DecoderConfig
from nanovalor.policy import Llava, LlavaConfig, build
from nanovalor.vit import VisionConfig

# microsoft/llava-med-v1.5-mistral-7b's config.json (the fields that set its size) and its mm_vision_tower's,
# openai/clip-vit-large-patch14-336 (the vision half of its CLIPModel config)
LLAVA_MED = dict(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral", hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
                 mm_projector_type="mlp2x_gelu", mm_hidden_size=1024, mm_vision_select_layer=-2,
                 mm_vision_select_feature="patch", mm_use_im_start_end=False, image_aspect_ratio="pad")
CLIP_L_336 = dict(model_type="clip", vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                        num_attention_heads=16, image_size=336, patch_size=14))


def llava_med(folder):
    (folder / "clip").mkdir(parents=True)
    (folder / "clip" / "config.json").write_text(json.dumps(CLIP_L_336))
    (folder / "config.json").write_text(json.dumps({**LLAVA_MED, "mm_vision_tower": str(folder / "clip")}))
    return folder


def test_llava_med_7b_has_its_known_size(tmp_path):
    """7.57 B = Mistral-7B 7.24 B + CLIP ViT-L/14-336 0.30 B + the mlp2x_gelu projector 0.02 B, each part counted by
    transformers' own classes on the meta device: the sum must be exact, and 7.57 B to the 0.005 B that rounding
    the total to two decimals allows."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM
    model = build(llava_med(tmp_path))
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        mistral = count(MistralForCausalLM(MistralConfig(**{k: LLAVA_MED[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")})))
        clip = count(CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336["vision_config"])))
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert (mistral, clip, projector) == (7_241_732_096, 303_507_456, 20_979_712)
    assert count(model) == mistral + clip + projector
    assert count(model) == pytest.approx(7.57e9, abs=0.005e9)
    assert model.cfg.num_image_tokens == 576 and model.cfg.text.num_kv_heads == 8


def tiny():
    """ViT: 14 px / 7 px patches -> 4 image tokens, width 8, one block; decoder: vocabulary 11 (odd: FSDP pads its
    rows), D = 8, I = 12, 2 layers, 2 heads of 4 over 1 KV head. 3176 parameters (ViT 1856, projector 144,
    decoder 1088, LM head 88); sharded over 2 GPUs 1600 per GPU (the position embedding's 5 rows and the 11-row
    embedding and LM head are padded to 3 and 6 rows per GPU)."""
    cfg = LlavaConfig(vision=VisionConfig(image_size=14, patch_size=7, hidden_size=8, intermediate_size=16,
                                          num_layers=1, num_heads=2),
                      text=DecoderConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                                         num_kv_heads=1, head_dim=4), image_token_id=10)
    with torch.device("meta"):
        model = Llava(cfg)
    assert sum(p.numel() for p in model.parameters()) == 3176
    return model


def text_stage(model):
    train.set_trainable(model, train.STAGES["text"]["train"])
    return model


def test_the_plan_on_hand_computed_numbers():
    # FSDP over 2 GPUs, the text stage (projector + decoder + LM head train: 144 + 1088 + 88 = 1320 parameters, 668
    # per GPU sharded), 4 studies per step (2 per GPU), micro-batch 1, G = 3, 5 new tokens, Tp = 4 image + 64 text
    # tokens
    plan = memory.plan(text_stage(tiny()), gpus=2, fsdp=True, batch_size=4, micro_batch=1, group_size=3,
                       max_new_tokens=5, beta=0.01)
    layer = 26 * 8 + 6 * 8 + 4 * 4 + 8 * 12  # a trained block's activation bytes per token: 368
    expected = {
        "parameters": 1600 * 4,
        "AdamW states": 2 * 668 * 4,
        "reference copy": 668 * 4,
        "rollout: gathered parameters": 3176 * 4,
        "rollout: KV cache": (2 * 2 * 1 * 4 * 4) * (2 * 68 + 2 * 3 * 5),  # L * (k, v) * Dkv * fp32, per token
        "update: gradients": 668 * 4,
        # the root unit (ViT 1856 + projector 144 + embedding 88 + norm 8 + LM head 88 = 2184; 328 of them train),
        # and 2 blocks of 496 (all train), each gathered with its gradients
        "update: gathered units + their gradients": (2184 + 328) * 4 + 2 * (496 + 496) * 4,
        # 2 layers x (Tp + G Tc = 83 tokens x 368 + the shared-prefix probabilities G H (Tc - 1)(Tp + Tc) x 6)
        "update: activations": 2 * (83 * layer + 3 * 2 * 4 * 73 * 6),
    }
    assert layer == 368
    expected["peak"] = expected["parameters"] + expected["AdamW states"] + expected["reference copy"] + max(
        expected["rollout: gathered parameters"] + expected["rollout: KV cache"],
        expected["update: gradients"] + expected["update: gathered units + their gradients"]
        + expected["update: activations"])
    assert plan == expected
    # gradient checkpointing: each completion with its own prompt (G (Tp + Tc - 1) = 216 tokens), a block's fp32 input
    # per token and layer, one block's activations at a time
    checkpointed = memory.plan(text_stage(tiny()), 2, True, 4, 1, 3, 5, grad_checkpointing=True)
    assert checkpointed["update: activations"] == 2 * 216 * 4 * 8 + 216 * layer
    # DDP over 2 GPUs: everything whole, gradients twice (DDP's all-reduce buckets), nothing gathered
    ddp = memory.plan(text_stage(tiny()), 2, False, 4, 1, 3, 5)
    assert (ddp["parameters"], ddp["update: gradients"]) == (3176 * 4, 2 * 1320 * 4)
    assert ddp["rollout: gathered parameters"] == 0


def test_what_trains_sets_gradients_reference_and_activations():
    # the visual stage: the projector alone trains, the decoder's activations are kept only for the input gradient
    model = tiny()
    train.set_trainable(model, "multi_modal_projector")
    visual = memory.plan(model, 1, False, 2, 1, 3, 5)
    assert (visual["AdamW states"], visual["reference copy"], visual["update: gradients"]) == (2 * 576, 576, 576)
    frozen_layer = 8 * 8 + 2 * (2 * 8 + 2 * 4) + 6 * 12  # 184: the norms' inputs, SDPA's tensors, SwiGLU's
    assert visual["update: activations"] == 2 * (83 * frozen_layer + 3 * 2 * 4 * 73 * 6)
    assert memory.plan(model, 1, False, 2, 1, 3, 5, beta=0)["reference copy"] == 0
    # LoRA on every linear layer of the decoder: the adapters train, the reference copies only the projector
    # and LM head (the decoder's reference is its base), activations keep each adapted layer's input
    model = text_stage(tiny())
    lora.apply(model, rank=2, alpha=4)
    with_lora = memory.plan(model, 1, False, 2, 1, 3, 5)
    adapters = 2 * 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + 2 * (8 + 12) + (12 + 8))  # r (in + out), 2 layers
    assert with_lora["AdamW states"] == 2 * (144 + 88 + adapters) * 4  # projector, LM head (norm, embedding frozen)
    assert with_lora["reference copy"] == (144 + 88) * 4
    assert with_lora["update: activations"] == 2 * (83 * (frozen_layer + 2 * (6 * 8 + 12)) + 3 * 2 * 4 * 73 * 6)


def test_dry_run_prints_the_plan_from_config_files_alone(tmp_path, capsys):
    folder = llava_med(tmp_path / "llava-med")  # config.json only: no weights, no tokenizer
    train.main(train.Config(stage="visual", model=str(folder), fsdp=True, dry_run=8, batch_size=64, micro_batch=2,
                            grad_checkpointing=True, gpu_memory_gb=80))
    out = capsys.readouterr().out
    assert "7.566B parameters (0.021B trained: multi_modal_projector)" in out and "8 GPU(s), FSDP2" in out
    assert "fits" in out and "DOES NOT FIT" not in out
    train.main(train.Config(stage="text", model=str(folder), dry_run=1, gpu_memory_gb=80))
    assert "DOES NOT FIT" in capsys.readouterr().out  # 7.6 B trained in fp32 with AdamW on one GPU: 120 GB
