"""nanovalor.policy against transformers: logits, padding, the training API, checkpoint layouts; and the prompts
(tokenizer, chat formats) of nanovalor.generate.

    python -m pytest -q tests/test_policy.py

Tiny random LLaVA models are built with transformers from a config (no download), saved to a temporary folder and
loaded with nanovalor.policy.load. Shapes are odd on purpose (vocab 1031, hidden 60 or 63, 6 heads over 2 KV heads).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig,
                          Qwen2Config, SiglipVisionConfig)

from nanovalor.generate import (chat_prompt, chatml_prompt, encode_prompt, load_tokenizer, mistral_prompt,
                                vicuna_prompt)
from nanovalor.decoder import DECODER_DEFAULTS, DecoderConfig, decoder_config_from_hf
from nanovalor.policy import Llava, config_from_hf, config_to_hf, load, save
from nanovalor.policy import LlavaConfig as OurConfig
from nanovalor.vit import VisionConfig

VOCAB, IMAGE, P = 1031, 1030, 25  # the image token is the last id; 5 x 5 patches of a 35 px image
VISION = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3, image_size=35,
              patch_size=7)
TEXT = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2)
KINDS = {
    "clip_llama": lambda: LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                                      text_config=LlamaConfig(**TEXT, rope_theta=500.0).to_dict()),
    # SigLIP (no class token) + Qwen2 (q/k/v bias, tied embeddings), all patches from the last layer
    "siglip_qwen2": lambda: LlavaConfig(vision_config=SiglipVisionConfig(**VISION).to_dict(),
                                        text_config=Qwen2Config(**{**TEXT, "num_key_value_heads": 3},
                                                                tie_word_embeddings=True).to_dict(),
                                        vision_feature_select_strategy="full", vision_feature_layer=-1),
    # Mistral with an odd hidden size, head_dim != hidden / heads and its large RoPE theta
    "clip_mistral": lambda: LlavaConfig(vision_config=CLIPVisionConfig(**VISION).to_dict(),
                                        text_config=MistralConfig(**{**TEXT, "hidden_size": 63,
                                                                     "num_attention_heads": 4},
                                                                  head_dim=14, rope_theta=1e6).to_dict()),
}


def build(kind, folder, seed=0):
    """A random transformers LLaVA of `kind`, saved to `folder`; weights perturbed so that logits are O(1)."""
    torch.manual_seed(seed)
    config = KINDS[kind]()
    config.image_token_index, config.image_seq_length = IMAGE, P
    hf = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    return hf


def prompt_ids(n_before, n_after, seed=0):  # text, the image tokens, text
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, IMAGE, (n_before,), generator=g), torch.full((P,), IMAGE),
                      torch.randint(0, IMAGE, (n_after,), generator=g)])


def batch(B=2, seed=0):
    ids = torch.stack([prompt_ids(3, 9, seed + b) for b in range(B)])  # (B, 37)
    return ids, torch.randn(B, 3, 35, 35, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (transformers model, our model, folder)}, built once for the module."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = build(kind, folder), load(folder), folder
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(models, kind):
    hf, ours, _ = models[kind]
    ids, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        logits = ours(ids, pixels)
        from_embeds = ours(ids, image_embeds=ours.encode_images(pixels))
    assert logits.shape == (2, 37, VOCAB) and ref.abs().max() > 1  # a test on near-zero logits proves little
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_embeds, ref, rtol=0, atol=1e-5)


def test_config_read_from_the_checkpoint(models):
    qwen = models["siglip_qwen2"][1]
    assert qwen.cfg.text.qkv_bias and not qwen.cfg.text.o_bias and qwen.cfg.text.tie_embeddings
    assert qwen.lm_head.weight is qwen.language_model.embed_tokens.weight  # tied after load
    assert qwen.cfg.num_image_tokens == P and qwen.cfg.feature_select == "full"
    mistral = models["clip_mistral"][1].cfg.text
    assert (mistral.head_dim, mistral.num_heads, mistral.num_kv_heads, mistral.rope_theta) == (14, 4, 2, 1e6)
    assert mistral.sliding_window == 4096


def test_decoder_defaults_mirror_transformers():
    """Old llava-hf configs omit most text_config fields: the gaps are filled with transformers' defaults."""
    for kind, Config in [("llama", LlamaConfig), ("mistral", MistralConfig), ("qwen2", Qwen2Config)]:
        hf = Config().to_dict()
        ours = decoder_config_from_hf({"model_type": kind}, "test")
        assert set(DECODER_DEFAULTS[kind]) <= set(hf)
        assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size, ours.num_layers, ours.num_heads,
                ours.num_kv_heads, ours.rms_norm_eps, ours.rope_theta) == (
            hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"],
            hf["rope_parameters"]["rope_theta"])


def test_padding_left_right_and_inner_gives_the_same_logits(models):
    """Positions count real tokens only: padding on either side, or between prompt and completion, changes
    nothing at the real tokens (GRPO scores left-padded prompts followed by right-padded completions)."""
    hf, ours, _ = models["clip_llama"]
    long, short = prompt_ids(3, 9, 1), prompt_ids(2, 4, 2)  # 37 and 31 tokens
    pixels = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        alone = [ours(x[None], pixels[i:i + 1])[0] for i, x in enumerate((long, short))]
        ref_short = hf(input_ids=short[None], pixel_values=pixels[1:]).logits[0]
        torch.testing.assert_close(alone[1], ref_short, rtol=0, atol=1e-5)
        pad, zeros, ones = torch.zeros(6, dtype=torch.long), [0] * 6, lambda n: [1] * n
        for row, row_mask in [(torch.cat([pad, short]), zeros + ones(31)),  # left
                              (torch.cat([short, pad]), ones(31) + zeros),  # right
                              (torch.cat([short[:20], pad, short[20:]]), ones(20) + zeros + ones(11))]:  # inner
            mask = torch.tensor([ones(37), row_mask])
            logits = ours(torch.stack([long, row]), pixels, attention_mask=mask)
            torch.testing.assert_close(logits[0], alone[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(logits[1][mask[1].bool()], alone[1], rtol=0, atol=1e-5)


def test_hidden_states_at_chosen_positions(models):
    """The fused log-prob op gets (N, D) final-norm hidden states and the LM-head weight: they give the logits."""
    for kind in ("clip_llama", "siglip_qwen2"):
        _, ours, _ = models[kind]
        ids, pixels = batch()
        select = torch.zeros(ids.shape, dtype=torch.bool)
        select[0, 30:36], select[1, 33:] = True, True
        with torch.no_grad():
            hidden = ours.hidden_states(ids, pixels, select=select)
            logits = ours(ids, pixels)
            selected_logits = ours(ids, pixels, select=select)
        assert hidden.shape == (10, 60)
        torch.testing.assert_close(hidden @ ours.lm_head.weight.T, logits[select], rtol=0, atol=1e-5)
        torch.testing.assert_close(selected_logits, logits[select], rtol=0, atol=1e-5)


def test_frozen_vit_keeps_no_graph_and_the_projector_trains(models):
    _, ours, _ = models["clip_llama"]
    ids, pixels = batch()
    seen = []
    hook = ours.vision_tower.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    try:
        ours.vision_tower.requires_grad_(False)
        ours(ids, pixels).square().mean().backward()
        assert seen == [False]  # the ViT ran under no_grad
        assert ours.multi_modal_projector.linear_1.weight.grad is not None
        assert all(p.grad is None for p in ours.vision_tower.parameters())
        ours.vision_tower.requires_grad_(True)
        ours.zero_grad()
        ours(ids, pixels).square().mean().backward()
        assert seen[-1] and ours.vision_tower.embeddings.patch_embedding.weight.grad is not None
    finally:
        hook.remove()
        ours.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    _, ours, _ = models["clip_mistral"]
    ids, pixels = batch()
    grads = []
    for on in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.language_model.gradient_checkpointing = on
        ours(ids, pixels).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.language_model.parameters()])
    ours.language_model.gradient_checkpointing = False
    ours.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_image_token_count_mismatch_is_an_error(models):
    _, ours, _ = models["clip_llama"]
    ids, pixels = batch()
    with pytest.raises(ValueError, match="hold 48 image tokens .* but 50 image features"):
        ours(torch.where(torch.arange(37) == 3, 5, ids), pixels)  # the first image token of each row made text
    with pytest.raises(ValueError, match="hold 50 image tokens .* but 0 image features"):
        ours(ids)


def _to_original_layout(hf_folder, folder, vision_inside, projector_linear=False):
    """Rewrite a saved transformers LLaVA into the original LLaVA / LLaVA-Med layout: flat config with mm_* fields,
    model.* / lm_head.* / model.mm_projector.{0,2}.* keys; the CLIP tower inside or as its own repo."""
    tensors, cfg = load_file(hf_folder / "model.safetensors"), json.loads((hf_folder / "config.json").read_text())
    text, out, vision = cfg["text_config"], {}, {}
    for k, v in tensors.items():
        if k.startswith("language_model.model."):
            out["model." + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out["lm_head." + k[len("language_model.lm_head."):]] = v
        elif k.startswith("multi_modal_projector.linear_"):
            layer = {"1": "0", "2": "2"}[k[len("multi_modal_projector.linear_")]]
            out[f"model.mm_projector.{layer}.{k.rsplit('.', 1)[1]}"] = v
        elif k.startswith("vision_tower."):
            vision["vision_model." + k[len("vision_tower."):]] = v
    if projector_linear:
        out = {k: v for k, v in out.items() if "mm_projector" not in k}
        out["model.mm_projector.weight"] = torch.randn(60, 36)
        out["model.mm_projector.bias"] = torch.randn(60)
    vision_folder = folder / "clip"
    vision_folder.mkdir(parents=True)
    clip_config = {"model_type": "clip", "vision_config": cfg["vision_config"]}
    (vision_folder / "config.json").write_text(json.dumps(clip_config))
    (vision_folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": 35, "image_mean": [0.5] * 3}))
    vision["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 4)  # a CLIPModel repo: text half unused
    save_file(vision, vision_folder / "model.safetensors")
    if vision_inside:
        out.update({"model.vision_tower.vision_tower." + k: v for k, v in vision.items() if k.startswith("vision_")})
    save_file(out, folder / "model.safetensors")
    config = {**text, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(vision_folder),
              "mm_projector_type": "linear" if projector_linear else "mlp2x_gelu",
              "mm_hidden_size": 36, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "image_aspect_ratio": "pad"}
    (folder / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("vision_inside", [True, False])
def test_original_llava_layout(models, tmp_path, vision_inside):
    hf, _, hf_folder = models["clip_llama"]
    _to_original_layout(hf_folder, tmp_path, vision_inside)
    ours = load(tmp_path)
    assert ours.cfg.image_token_id == VOCAB  # original LLaVA has no <image> token: an id outside the vocabulary
    assert ours.preprocessor_config == {"crop_size": 35, "image_mean": [0.5] * 3, "do_pad": True}
    ids, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        logits = ours(ids.masked_fill(ids == IMAGE, VOCAB), pixels)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)


def test_original_llava_linear_projector(models, tmp_path):
    _, _, hf_folder = models["clip_llama"]
    tensors = _to_original_layout(hf_folder, tmp_path, vision_inside=True, projector_linear=True)
    ours = load(tmp_path)
    assert ours.multi_modal_projector.linear_2 is None
    x = torch.randn(2, 5, 36)
    with torch.no_grad():
        torch.testing.assert_close(ours.multi_modal_projector(x),
                                   x @ tensors["model.mm_projector.weight"].T + tensors["model.mm_projector.bias"])
    with pytest.raises(ValueError, match="only the mlp2x_gelu projector"):
        save(ours, tmp_path / "saved")


@pytest.mark.parametrize("kind", ["clip_llama", "siglip_qwen2"])
def test_save_then_transformers_and_load_read_it(models, tmp_path, kind):
    hf, ours, _ = models[kind]
    ours.preprocessor_config = {"crop_size": 35}
    save(ours, tmp_path / "saved")
    save(ours, tmp_path / "saved")  # over an existing folder: swapped, never half written
    assert not [p for p in tmp_path.iterdir() if p.name != "saved"]  # no temporary folder left behind
    ids, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        hf_again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
        torch.testing.assert_close(hf_again(input_ids=ids, pixel_values=pixels).logits, ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(load(tmp_path / "saved")(ids, pixels), ref, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text()) == {"crop_size": 35}
    ours.preprocessor_config = None


def test_a_model_built_from_our_config_is_initialised_and_saved_for_transformers(tmp_path):
    """The from-scratch path (the phantom world's tiny policy): transformers' initialisation, then save()."""
    cfg = OurConfig(vision=VisionConfig(image_size=35, patch_size=7, hidden_size=36, intermediate_size=50, num_layers=2,
                                        num_heads=3),
                    text=DecoderConfig(model_type="qwen2", vocab_size=101, hidden_size=48, intermediate_size=80,
                                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, qkv_bias=True,
                                       tie_embeddings=True),
                    image_token_id=100, eos_token_id=[99])
    torch.manual_seed(0)
    ours = Llava(cfg).eval()
    weight = ours.language_model.layers[0].mlp.up_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002 and (ours.language_model.layers[0].self_attn.q_proj.bias == 0).all()
    save(ours, tmp_path / "m")
    ids = torch.cat([torch.tensor([5, 6]), torch.full((25,), 100), torch.tensor([7, 8, 9])])[None]
    pixels = torch.randn(1, 3, 35, 35)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == [99]


def test_sharded_safetensors_and_pytorch_bin(models, tmp_path):
    hf, _, _ = models["clip_mistral"]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    tensors = load_file(models["clip_mistral"][2] / "model.safetensors")
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    ids, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        for folder in ("sharded", "bin"):
            torch.testing.assert_close(load(tmp_path / folder)(ids, pixels), ref, rtol=0, atol=1e-5)


def _copy_with(src, dst, tensors=None, config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    save_file(tensors(load_file(src / "model.safetensors")) if tensors else load_file(src / "model.safetensors"),
              dst / "model.safetensors")
    return dst


def test_bad_checkpoints_give_one_clear_error(models, tmp_path):
    src = models["clip_llama"][2]
    norm = "language_model.model.norm.weight"
    cases = [
        (dict(tensors=lambda t: {k: v for k, v in t.items() if k != norm}), ValueError,
         r"missing \['language_model.norm.weight'\], unexpected \[\], wrong shape \[\]"),
        (dict(tensors=lambda t: {**t, norm: torch.ones(61)}), ValueError,
         r"wrong shape \['language_model.norm.weight: \(61,\) in the checkpoint, \(60,\) in the model'\]"),
        (dict(tensors=lambda t: {**t, "extra.weight": torch.ones(2)}), ValueError, r"unexpected \['extra.weight'\]"),
        (dict(config=lambda c: {**c, "model_type": "blip"}), ValueError, "model_type 'blip' is not a LLaVA model"),
        (dict(config=lambda c: {**c, "text_config": {**c["text_config"], "model_type": "gemma"}}), ValueError,
         "text_config: model_type 'gemma'"),
        (dict(config=lambda c: {**c, "architectures": ["LlavaNextForConditionalGeneration"]}), ValueError,
         "architectures"),
        (dict(config=lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": "60"}}), ValueError,
         r"config.json text_config: hidden_size = '60': expected a positive integer"),
        (dict(config=lambda c: {**c, "vision_config": {**c["vision_config"], "patch_size": 0}}), ValueError,
         r"config.json vision_config: patch_size = 0: expected a positive integer"),
        (dict(config=lambda c: {**c, "text_config": {**c["text_config"], "rope_theta": True}}), ValueError,
         r"rope_theta = True: expected a number"),
        (dict(config=lambda c: {**c, "text_config": {k: v for k, v in c["text_config"].items() if k != "hidden_size"}}),
         ValueError, r"config.json: vocab_size 1031 and hidden_size 4096 \(a field it omits takes transformers' llama "
                     r"default\) do not fit the checkpoint's embed_tokens of shape \(1031, 60\)"),
    ]
    for i, (change, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            load(_copy_with(src, tmp_path / str(i), **change))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.st"}}))
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) \['x.st'\]"):
        load(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load(tmp_path / "does-not-exist")
    cut = _copy_with(src, tmp_path / "truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"truncated/model.safetensors: not a readable safetensors file"):
        load(cut)
    (cut / "model.safetensors").write_bytes(data)
    (cut / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"truncated/tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(cut)


def test_hub_id_in_offline_mode_is_a_clear_error(tmp_path):
    """Hub ids go through snapshot_download, which honours HF_HUB_OFFLINE (read when huggingface_hub is imported,
    hence a fresh process). Tests never touch the network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from nanovalor.policy import load; load('nobody/no-such-model')"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert ("nobody/no-such-model: not a local folder, and fetching it from the hub failed (HF_HUB_OFFLINE=1)"
            in run.stderr)


# -----------------------------------------------------------------------------
# Tokenizer and prompts

def _tokenizer(folder, with_image_token):
    """A tiny word-level tokenizer.json with a BOS post-processor, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = ["<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", "describe", "the", "x-ray", "[INST]", "[/INST]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if with_image_token:
        tok.add_special_tokens(["<image>"])  # id 10
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_encode_prompt_both_tokenizer_kinds(models, tmp_path):
    cfg = models["clip_llama"][1].cfg  # image token 1030, 25 image tokens
    text = vicuna_prompt("describe the x-ray", system="")
    assert text == "USER: <image>\ndescribe the x-ray ASSISTANT:"
    words = [3, 5, 6, 7, 4]  # USER: describe the x-ray ASSISTANT:
    # original LLaVA: no <image> in the vocabulary; pieces encoded apart, BOS only on the first
    plain = load_tokenizer(_tokenizer(tmp_path / "plain", False))
    assert encode_prompt(plain, text, cfg) == [1, 3] + [1030] * 25 + words[1:]
    # llava-hf: <image> is a token of the vocabulary with the config's id
    cfg_hf = type(cfg)(**{**cfg.__dict__, "image_token_id": 10})
    known = load_tokenizer(_tokenizer(tmp_path / "known", True))
    assert encode_prompt(known, text, cfg_hf) == [1, 3] + [10] * 25 + words[1:]


def test_encode_prompt_matches_transformers_processor(models, tmp_path):
    """Same ids as transformers' LlavaProcessor, which expands <image> to image_seq_length tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast
    from PIL import Image
    folder = _tokenizer(tmp_path / "tok", True)
    cfg = models["clip_llama"][1].cfg
    cfg = type(cfg)(**{**cfg.__dict__, "image_token_id": 10})
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="<unk>", bos_token="<s>")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 35},
                                                                      crop_size={"height": 35, "width": 35}),
                               tokenizer=hf_tok, patch_size=7, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    text = mistral_prompt("describe the x-ray")
    ref = processor(images=Image.new("RGB", (35, 35)), text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert encode_prompt(load_tokenizer(folder), text, cfg) == ref
    assert ref.count(10) == 25


def test_chat_formats():
    assert mistral_prompt("Q?") == "[INST] <image>\nQ? [/INST]"
    assert vicuna_prompt("Q?").startswith("A chat between a curious human") and vicuna_prompt("Q?").endswith(
        ". USER: <image>\nQ? ASSISTANT:")
    assert chatml_prompt("Q?") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                   "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n")
    cfg = OurConfig()
    for family, expected in (("llama", vicuna_prompt), ("mistral", mistral_prompt), ("qwen2", chatml_prompt)):
        cfg.text.model_type = family
        assert chat_prompt(cfg, "Q?") == expected("Q?")
    cfg.chat_format = "short"
    assert chat_prompt(cfg, "Q?") == "USER: <image>\nQ? ASSISTANT:"
    cfg.chat_format = "alpaca"
    with pytest.raises(ValueError, match="chat_format 'alpaca'"):
        chat_prompt(cfg, "Q?")


def test_chat_format_travels_with_the_checkpoint(tmp_path):
    cfg = config_from_hf(config_to_hf(OurConfig(chat_format="short")), "test")
    assert cfg.chat_format == "short" and "nanovalor_chat_format" not in config_to_hf(OurConfig())


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing"):
        load_tokenizer(tmp_path)
