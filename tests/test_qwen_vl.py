"""nanovalor.qwen_vl (Qwen2.5-VL) against transformers: image preprocessing, the chat prompt, logits, greedy
decoding, the group sampler's log-probs and the trainer's shared-prefix pass, checkpoints both ways, one error per
bad checkpoint, and the visual stage of train.py (only the merger moves).

    python -m pytest -q tests/test_qwen_vl.py

A tiny random Qwen2_5_VLForConditionalGeneration is built by transformers from a config (no download): a 4-block
ViT (full attention in blocks 1 and 3) whose 56-px windows are smaller than the test images, so that windows, the
partial windows at the edges and the full-attention blocks all count; a 2-layer decoder with M-RoPE sections
(2, 3, 3); a byte-level BPE with Qwen's special tokens. The test images are 112 x 168 and 140 x 84 px after
smart_resize: 4 x 6 and 5 x 3 merged tokens.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nanovalor import data, policy, qwen_vl
from nanovalor.generate import (encode_prompt, encode_prompts, left_pad, load_tokenizer, repeat_for_group, sample,
                                sample_naive)
from nanovalor.grpo import CompletionLogprobs

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
PAD, IM_START, IM_END, VISION_START, VISION_END, _, IMAGE, VIDEO = range(8)
PIXELS = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 40)
PREPROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor", patch_size=14, temporal_patch_size=2, merge_size=2,
                    **PIXELS)
VISION = dict(depth=4, hidden_size=32, intermediate_size=40, num_heads=2, window_size=56, fullatt_block_indexes=[1, 3],
              out_hidden_size=64)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]))
# Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json (the model's data, rendered by transformers' processor)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QUESTIONS = ["Describe the findings of the chest X-ray.", "Any effusion?"]


def make_tokenizer(folder):
    """A byte-level BPE with Qwen's special tokens as ids 0..7, saved as folder/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(QUESTIONS + ["You are a helpful assistant.", "system user assistant",
                                         "The heart size is normal. No pleural effusion or pneumothorax."] * 5, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def build(folder, seed=0, tie=False):
    """A random transformers Qwen2.5-VL saved in `folder` with its tokenizer and preprocessor config; weights
    perturbed so that logits are O(1)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(folder).get_vocab_size()
    config = Qwen2_5_VLConfig(vision_config=VISION, text_config=dict(**TEXT, vocab_size=vocab, eos_token_id=IM_END),
                              image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
                              vision_end_token_id=VISION_END, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return hf


def pictures():
    """Two RGB images of different sizes and aspect ratios (landscape, portrait)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(170, 110), (90, 150)]]


def hf_inputs(ids, mask, images):
    """transformers' inputs for the same batch; without mm_token_type_ids its Qwen2.5-VL silently falls back on
    1-D positions."""
    return dict(input_ids=ids, attention_mask=mask, pixel_values=images.data, image_grid_thw=images.grid,
                mm_token_type_ids=(ids == IMAGE).long())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    hf = build(folder)
    return hf, policy.load(folder), folder


@pytest.fixture(scope="module")
def batch(models):
    """The chat prompts of two questions with their images (different sizes), left-padded."""
    _, ours, folder = models
    images = data.preprocess(pictures(), data.read_preprocessor_config(ours.preprocessor_config))
    ids, mask = encode_prompts(load_tokenizer(folder), ours.cfg, QUESTIONS, images)
    return ids, mask, images


# ----------------------------------------------------------------------------- preprocessing and prompts

@pytest.mark.parametrize("pixels", [dict(min_pixels=3136, max_pixels=12845056),  # Qwen2.5-VL-3B's limits
                                    PIXELS, dict(min_pixels=200 * 28 * 28, max_pixels=400 * 28 * 28)])
def test_preprocess_is_bit_identical_to_qwen2vl_processor(pixels, tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(333, 217), (97, 401)]]
    Image.fromarray(rng.integers(0, 256, (250, 190), dtype=np.uint8)).save(tmp_path / "gray.png")  # an 8-bit X-ray
    images += [data.load_image(tmp_path / "gray.png"), Image.open(tmp_path / "gray.png"), images[0].resize((30, 20))]
    ref = Qwen2VLImageProcessorPil(**pixels)(images, return_tensors="pt")
    ours = data.preprocess(images, data.read_preprocessor_config({**PREPROCESSOR, **pixels}))
    assert torch.equal(ours.grid, ref["image_grid_thw"]) and len(set(map(tuple, ours.grid.tolist()))) >= 3
    assert torch.equal(ours.data, ref["pixel_values"])


def test_smart_resize_and_preprocessor_config():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    assert data.smart_resize(20, 30, 28, 56 * 56, 28 * 28 * 1280) == (56, 84)  # up to min_pixels
    # down to max_pixels: beta = sqrt(2e6 / 12544) = 12.63; 1000 / beta / 28 = 2.8 -> 56, 2000 / beta / 28 = 5.7 -> 140
    assert data.smart_resize(1000, 2000, 28, 56 * 56, 28 * 28 * 16) == (56, 140)
    for h, w in np.random.default_rng(0).integers(10, 3000, (300, 2)).tolist():
        for lo, hi in [(3136, 12845056), (56 * 56, 28 * 28 * 40), (256 * 28 * 28, 512 * 28 * 28)]:
            assert data.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi)
    with pytest.raises(data.DataError, match="aspect ratios up to 200"):
        data.smart_resize(10, 2010)
    hub = data.read_preprocessor_config({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                                         "temporal_patch_size": 2, "merge_size": 2,
                                         "image_processor_type": "Qwen2VLImageProcessor"})
    v5 = data.read_preprocessor_config({"size": {"shortest_edge": 3136, "longest_edge": 12845056},
                                        "image_processor_type": "Qwen2VLImageProcessor"})  # transformers 5's save
    assert hub == v5 == data.QwenImageProcessing(min_pixels=3136, max_pixels=12845056)
    with pytest.raises(data.DataError, match="min_pixels 10, max_pixels 5"):
        data.read_preprocessor_config({"min_pixels": 10, "max_pixels": 5, "temporal_patch_size": 2})


def test_packed_images_index_like_a_batch_of_images(batch):
    _, _, images = batch
    rows = images.rows().tolist()  # patches of each image
    swapped = images[torch.tensor([1, 0])]
    assert torch.equal(swapped.grid, images.grid.flip(0)) and len(images) == 2
    assert torch.equal(swapped.data, torch.cat([images.data[rows[0]:], images.data[:rows[0]]]))
    assert torch.equal(images[1:].data, images.data[rows[0]:]) and torch.equal(images[[0, 0]].grid[1], images.grid[0])
    half = images.to(torch.float16)
    assert half.data.dtype == torch.float16 and half.grid.dtype == torch.long


def test_chat_prompt_matches_the_qwen_processor(models, batch, monkeypatch):
    """Our ids = Qwen2_5_VLProcessor's for Qwen2.5-VL's chat template: one <|image_pad|> per merged token."""
    from transformers import PreTrainedTokenizerFast
    from transformers.processing_utils import ProcessorMixin
    _, ours, folder = models
    ids, mask, images = batch
    check = ProcessorMixin.check_argument_for_proper_class  # its video-processor check needs torchvision
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<|endoftext|>",
                                  padding_side="left")
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**PIXELS), tokenizer=tok,
                                    video_processor=None, chat_template=CHAT_TEMPLATE)
    texts = [processor.apply_chat_template([{"role": "user",
                                             "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in QUESTIONS]
    ref = processor(text=texts, images=pictures(), return_tensors="pt", padding=True)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert torch.equal(images.data, ref["pixel_values"]) and (ids == IMAGE).sum(1).tolist() == [24, 15]
    with pytest.raises(ValueError, match="pass the images"):
        encode_prompts(load_tokenizer(folder), ours.cfg, QUESTIONS)


# ----------------------------------------------------------------------------- the model against transformers

def test_mrope_positions_on_hand_numbers(models):
    """Left pad, 2 text tokens, a 2 x 3 image, 2 text tokens: the image's tokens share time position 2 and add
    their row and column; the text after it continues at 2 + max(2, 3) = 5, so the rope delta is 5 - 8 = -3."""
    cfg = models[1].cfg
    ids = torch.tensor([[PAD, 9, 9] + [IMAGE] * 6 + [9, 9]])
    mask = torch.tensor([[0] + [1] * 10])
    grid = torch.tensor([[1, 4, 6]])  # in patches: 2 x 3 merged tokens
    positions, deltas = qwen_vl.mrope_positions(ids, mask, data.PackedImages(torch.zeros(6, 64), grid, 4), cfg)
    assert positions[:, 0].tolist() == [[0, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                                        [0, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                                        [0, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    assert deltas.tolist() == [-3]


def test_logits_match_transformers(models, batch):
    """Two images of different sizes and aspect ratios, batched with left padding; then a batch with two images
    in one prompt and a prompt without any (the deltas add up per row)."""
    hf, ours, folder = models
    ids, mask, images = batch
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, images)).logits
        logits = ours(ids, images, attention_mask=mask)
        from_embeds = ours(ids, image_embeds=ours.encode_images(images), attention_mask=mask)
        flat = hf(input_ids=ids, attention_mask=mask, pixel_values=images.data, image_grid_thw=images.grid).logits
        ref_tokens = torch.cat(hf.model.get_image_features(images.data, images.grid).pooler_output)
    real = mask.bool()
    assert ref.abs().max() > 1  # a test on near-zero logits proves little
    torch.testing.assert_close(logits[real], ref[real], rtol=0, atol=2e-5)
    torch.testing.assert_close(from_embeds, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.encode_images(images).data, ref_tokens, rtol=0, atol=1e-5)
    assert (logits[real] - flat[real]).abs().max() > 1e-2  # 1-D positions are not what we compute

    tok, cfg = load_tokenizer(folder), ours.cfg
    two = ("<|im_start|>user\n<|vision_start|><image><|vision_end|>front<|vision_start|><image><|vision_end|>side"
           "<|im_end|>\n<|im_start|>assistant\n")
    n = cfg.image_tokens(images)
    ids, mask = left_pad([encode_prompt(tok, two, cfg, [n[1], n[0]]), encode_prompt(tok, "no image at all", cfg),
                          encode_prompt(tok, "<|vision_start|><image><|vision_end|>x", cfg, n[:1])])
    images = images[[1, 0, 0]]
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, images)).logits
        logits = ours(ids, images, attention_mask=mask)
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], rtol=0, atol=2e-5)


def test_greedy_matches_transformers_generate(models, batch):
    hf, ours, _ = models
    ids, mask, images = batch
    hf.generation_config.eos_token_id = None  # no EOS: 20 tokens each
    with torch.no_grad():  # our sampler never draws the image token; transformers' suppress_tokens does the same
        ref = hf.generate(**hf_inputs(ids, mask, images), do_sample=False, max_new_tokens=20, pad_token_id=PAD,
                          suppress_tokens=[IMAGE])[:, ids.shape[1]:]
    out = sample(ours, ids, mask, pixel_values=images, max_new_tokens=20, temperature=0, eos_token_id=[])
    assert ref.shape == (2, 20) and (ref[:, 1:] != ref[:, :-1]).any()  # not one token repeated
    assert torch.equal(out.tokens, ref) and out.mask.all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_sampler_logprobs_equal_teacher_forced_and_the_shared_prefix_pass(models, batch, temperature):
    """The prompt (with its image) is prefilled once per group and decoding continues the M-RoPE positions: the
    recorded log-probs equal transformers' teacher-forced ones, the naive sampler's, and grpo's training pass
    (shared prefix or not), so the first GRPO ratio is 1."""
    hf, ours, _ = models
    ids, mask, images = batch
    G, T = 3, ids.shape[1]
    kw = dict(group_size=G, max_new_tokens=12, temperature=temperature, eos_token_id=list(range(8, 120)))
    out = sample(ours, ids, mask, images, generator=torch.Generator().manual_seed(1), **kw)
    naive = sample_naive(ours, ids, mask, images, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out.tokens, naive.tokens) and torch.equal(out.mask, naive.mask)
    torch.testing.assert_close(out.logprobs, naive.logprobs, rtol=0, atol=1e-5)
    assert 0 < (~out.mask).sum() and out.mask[:, 0].all() and not torch.equal(out.tokens[0], out.tokens[1])
    full = torch.cat([ids.repeat_interleave(G, 0), out.tokens], 1)  # (B*G, T + N)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), out.mask.long()], 1)
    with torch.no_grad():
        logits = hf(**hf_inputs(full, full_mask, repeat_for_group(images, ids, ours.cfg, G))).logits[:, T - 1:-1]
        teacher = F.log_softmax(logits / temperature, -1).gather(2, out.tokens[..., None])[..., 0]
        trained = [CompletionLogprobs(ours, share)(images, ids, mask, out.tokens, out.mask, G, temperature)
                   for share in (True, False)]
    torch.testing.assert_close(out.logprobs[out.mask], teacher[out.mask], rtol=0, atol=1e-5)
    for logp in trained:
        torch.testing.assert_close(logp, out.logprobs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("tie", [False, True])
def test_save_then_transformers_and_we_load_it(models, batch, tmp_path, tie):
    hf, ours, _ = models
    if tie:
        hf = build(tmp_path / "tied", seed=3, tie=True)
        ours = policy.load(tmp_path / "tied")
        assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    ids, mask, images = batch
    policy.save(ours, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "text_config" not in config and config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert ("lm_head.weight" in load_file(tmp_path / "saved" / "model.safetensors")) != tie
    assert (tmp_path / "saved" / "tokenizer.json").exists()
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    again = policy.load(tmp_path / "saved")
    with torch.no_grad():
        ref = hf(**hf_inputs(ids, mask, images)).logits
        torch.testing.assert_close(reloaded(**hf_inputs(ids, mask, images)).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(again(ids, images, attention_mask=mask), ours(ids, images, attention_mask=mask),
                                   rtol=0, atol=0)
    assert again.preprocessor_config == PREPROCESSOR


def test_loads_the_hub_layout_sharded(models, batch, tmp_path):
    """The hub's config.json (decoder fields at the top level, rope_scaling mrope, in_chans) and weights in two
    safetensors shards with an index, as Qwen/Qwen2.5-VL-3B-Instruct ships them."""
    hf, ours, folder = models
    ids, mask, images = batch
    hub = tmp_path / "hub"
    shutil.copytree(folder, hub)
    tensors = load_file(hub / "model.safetensors")
    (hub / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, hub / file)
    (hub / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    text = {k: v for k, v in hf.config.text_config.to_dict().items() if k in
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "eos_token_id")}
    v = hf.config.vision_config
    (hub / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", **text, hidden_act="silu",
        rope_theta=1e4, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, sliding_window=32768,
        use_sliding_window=False, tie_word_embeddings=False, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        vision_config=dict(depth=v.depth, hidden_act="silu", hidden_size=v.hidden_size, num_heads=v.num_heads,
                           intermediate_size=v.intermediate_size, in_chans=3, out_hidden_size=v.out_hidden_size,
                           patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=56,
                           fullatt_block_indexes=[1, 3], tokens_per_second=2, temporal_patch_size=2))))
    loaded = policy.load(hub)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images, attention_mask=mask), ours(ids, images, attention_mask=mask),
                                   rtol=0, atol=0)
        reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hub).eval()  # transformers reads it alike
        torch.testing.assert_close(reference(**hf_inputs(ids, mask, images)).logits,
                                   hf(**hf_inputs(ids, mask, images)).logits, rtol=0, atol=0)


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


BAD = {
    "missing tensor": (lambda f: edit_weights(f, lambda t: t.pop("visual.merger.ln_q.weight")),
                       r"missing \['multi_modal_projector.ln_q.weight'\]"),
    "unexpected tensor": (lambda f: edit_weights(f, lambda t: t.update({"visual.extra.weight": torch.zeros(2)})),
                          r"unexpected \['vision_tower.extra.weight'\]"),
    "wrong shape": (lambda f: edit_weights(f, lambda t: t.update({"model.norm.weight": torch.zeros(63)})),
                    r"language_model.norm.weight: \(63,\) in the checkpoint, \(64,\) in the model"),
    "Qwen2-VL": (lambda f: edit_config(f, lambda c: c.update(model_type="qwen2_vl")), "not a LLaVA model"),
    "missing field": (lambda f: edit_config(f, lambda c: (c["text_config"].pop("hidden_size"),
                                                          c["vision_config"].pop("depth"))),
                      r"missing field\(s\) \['hidden_size', 'vision_config.depth'\]"),
    "M-RoPE sections": (lambda f: edit_config(f, lambda c: c["text_config"]["rope_parameters"].update(
        mrope_section=[2, 3, 2])), r"mrope_section \[2, 3, 2\] must sum to head_dim / 2 = 8"),
    "sliding window": (lambda f: edit_config(f, lambda c: c["text_config"].update(use_sliding_window=True)),
                       "no sliding window"),
    "preprocessor": (lambda f: (f / "preprocessor_config.json").write_text(
                         json.dumps({**PREPROCESSOR, "patch_size": 16})),
                     r"preprocessor_config.json: \{'patch_size': 16\} do not fit the ViT"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_one_clear_error_per_bad_checkpoint(models, tmp_path, kind):
    broken = tmp_path / "broken"
    shutil.copytree(models[2], broken)
    change, message = BAD[kind]
    change(broken)
    with pytest.raises(ValueError, match=message) as error:
        policy.load(broken)
    assert str(broken) in str(error.value)  # names the file or folder


# ----------------------------------------------------------------------------- the visual stage of train.py

def test_visual_stage_moves_only_the_merger(tmp_path):
    """train.py, unchanged for Qwen2.5-VL: the phantom world's X-rays through Qwen's preprocessing, prompts with
    as many image tokens as each image has, G rollouts scored by the frozen expert, one GRPO step: only
    multi_modal_projector (the merger) changes, and it does."""
    import train
    from nanovalor import phantom_expert, phantoms
    tiny = dict(out=str(tmp_path), eval_n=2, eval_every=0, max_new_tokens=6, group_size=2, warmup=1)
    phantoms.generate(tmp_path / "phantoms", 8, 4, 4, seed=0, progress=False)  # the phantom world and its expert
    phantom_expert.train(tmp_path / "phantoms", tmp_path / "expert" / "checkpoint", steps=1, batch_size=4, warmup=1)
    build(tmp_path / "qwen", seed=4)
    train.main(train.Config(stage="visual", model=str(tmp_path / "qwen"),
                            expert=str(tmp_path / "expert" / "checkpoint"),
                            data=str(tmp_path / "phantoms" / "annotation.json"), steps=1, batch_size=2, lr=1e-2,
                            **tiny))
    before = load_file(tmp_path / "qwen" / "model.safetensors")
    after = load_file(tmp_path / "visual" / "checkpoint" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("visual.merger.") for k in moved), sorted(moved)
    log = json.loads((tmp_path / "visual" / "metrics.jsonl").read_text().splitlines()[0])
    assert log["ratio_err"] < 1e-4 and log["skipped"] == 0  # the trainer's log-probs are the sampler's
