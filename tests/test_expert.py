"""The frozen expert (nanovalor.expert) against transformers' BertModel / CLIPModel and hand-computed cases.

    python -m pytest -q tests/test_expert.py
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig as HFBertConfig, BertModel
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from nanovalor.bert import Bert, BertConfig, bert_config_from_hf, load_bert_tokenizer, tokenize
from nanovalor.expert import ClipText, ClipTextConfig, Expert, ExpertConfig, load, save
from nanovalor.vit import VisionConfig

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "normal", "size", ".", ",", "no",
         "pleural", "effusion", "lung", "##s", "are", "clear", "card", "##io", "##me", "##galy", "mild", "left",
         "right", "-", "sided", "cafe", "x", "ray", "e"]


def _vocab_folder(tmp_path, lower=None):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    if lower is not None:
        (tmp_path / "tokenizer_config.json").write_text(f'{{"do_lower_case": {str(lower).lower()}}}')
    return tmp_path


# ----------------------------------------------------------------------------- BERT


def _tiny_bert(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = HFBertConfig(vocab_size=len(VOCAB), hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=50, max_position_embeddings=40, type_vocab_size=2, **kw)
    hf = BertModel(cfg).eval()
    for p in hf.parameters():  # HF initialises LayerNorm to (1, 0) and biases to 0: perturb so every term counts
        p.data.add_(0.1 * torch.randn_like(p))
    return hf


def test_bert_matches_transformers_with_padding_and_token_types():
    hf = _tiny_bert()
    ours = Bert(bert_config_from_hf(hf.config.to_dict(), pooler=True)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(5, len(VOCAB), (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # padded rows: every position must match anyway (padded queries still see real keys)
    mask[2, 3:] = 0
    types = (torch.arange(11) >= 5).long().expand(3, -1)
    with torch.no_grad():
        for kwargs in (dict(attention_mask=mask), dict(attention_mask=mask, token_type_ids=types), {}):
            ref = hf(input_ids=ids, **kwargs)
            h = ours(ids, **kwargs)
            assert h.shape == (3, 11, 36)
            torch.testing.assert_close(h, ref.last_hidden_state, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours.pooled(h), ref.pooler_output, rtol=0, atol=1e-5)


def test_bert_state_dict_names_are_hf_names():
    hf = _tiny_bert()
    ours = Bert(bert_config_from_hf(hf.config.to_dict(), pooler=True))
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "encoder.layer.1.attention.self.query.weight" in ours.state_dict()
    no_pool = Bert(bert_config_from_hf(hf.config.to_dict()))
    assert not any(k.startswith("pooler.") for k in no_pool.state_dict())
    with pytest.raises(ValueError, match="without a pooler"):
        no_pool.pooled(torch.zeros(1, 2, 36))


def test_bert_config_errors_name_the_field():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        bert_config_from_hf({"model_type": "bert", "hidden_act": "relu"})
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        bert_config_from_hf({"model_type": "roberta"})
    bert = Bert(bert_config_from_hf(_tiny_bert().config.to_dict()))
    with pytest.raises(ValueError, match="41 tokens"):
        bert(torch.zeros(1, 41, dtype=torch.long))


def test_wordpiece_tokenizer_by_hand(tmp_path):
    tok = load_bert_tokenizer(_vocab_folder(tmp_path), max_length=8)
    ids, mask = tokenize(tok, ["Cardiomegaly. Café", "Heart"])
    # [CLS] card ##io ##me ##galy . cafe [SEP]: lower-cased, accent stripped, truncated to 8 with [SEP] kept
    assert ids.tolist() == [[2, 19, 20, 21, 22, 10, 28, 3], [2, 6, 3, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    ids, _ = tokenize(tok, ["", "xylophone"])  # empty report: just [CLS] [SEP]; unknown word: one [UNK]
    assert ids.tolist() == [[2, 3, 0], [2, 1, 3]]


TEXTS = ["The heart is normal size.", "No left-sided pleural effusion, lungs are clear.", "Café X-ray",
         "  MILD   cardiomegaly\t\n", "", "unknownword heart", "e" * 150, "lungs " * 40]


@pytest.mark.parametrize("lower", [None, False])
def test_wordpiece_matches_transformers_python_tokenizer(tmp_path, lower):
    folder = _vocab_folder(tmp_path, lower)
    ref = BertTokenizerLegacy(str(folder / "vocab.txt"), do_lower_case=lower is not False)
    ours = load_bert_tokenizer(folder, max_length=16)
    ids, mask = tokenize(ours, TEXTS)
    for text, row, m in zip(TEXTS, ids.tolist(), mask.tolist()):
        want = ref(text, truncation=True, max_length=16)["input_ids"]
        assert row[:sum(m)] == want, text


def test_tokenizer_json_is_used_when_present(tmp_path):
    folder = _vocab_folder(tmp_path)
    from transformers import BertTokenizer  # the fast one: save_pretrained writes tokenizer.json
    BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(str(tmp_path / "fast"))
    (tmp_path / "fast" / "vocab.txt").unlink(missing_ok=True)  # prove tokenizer.json alone is enough
    ids, _ = tokenize(load_bert_tokenizer(tmp_path / "fast", 16), TEXTS)
    ref, _ = tokenize(load_bert_tokenizer(folder, 16), TEXTS)
    assert ids.tolist() == ref.tolist()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        load_bert_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"vocab.txt: special tokens \['\[CLS\]'"):
        load_bert_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- CLIP (HF CLIPModel layout)

REPORTS = [["The heart is normal size.", "No pleural effusion, lungs are clear.", "", "mild cardiomegaly"],
           ["Right-sided effusion.", "lungs " * 60, "café x-ray", "The heart is normal size."]]


def _clip_tokenizer_folder(folder):
    """A tiny byte-level BPE in HF CLIPTokenizer's format (transformers writes tokenizer.json)."""
    from transformers import CLIPTokenizer
    from tokenizers.pre_tokenizers import ByteLevel
    chars = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for the bytes
    merges = [tuple(m.split()) for m in ("t h", "th e</w>", "h e", "a r", "l u", "lu n", "lun g", "e f", "ef f")]
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "he", "ar", "lu", "lun", "lung", "ef", "eff"]
    vocab = {t: i for i, t in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder)), len(vocab)


def _tiny_clip(folder, seed=0):
    from transformers import CLIPConfig, CLIPModel
    hf_tok, vocab_size = _clip_tokenizer_folder(folder)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=24,
                                      eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.bos_token_id,
                                      pad_token_id=hf_tok.pad_token_id),
                     vision_config=dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                                        num_attention_heads=3, image_size=35, patch_size=7), projection_dim=20)
    hf = CLIPModel(cfg).eval()
    for p in hf.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(str(folder))
    return hf, hf_tok


def test_clip_expert_matches_transformers(tmp_path):
    hf, hf_tok = _tiny_clip(tmp_path)
    expert = load(tmp_path)
    assert expert.cfg.context_length == 24 and not expert.training
    texts = [r for group in REPORTS for r in group]
    ids, mask = expert.tokenize(texts)
    ref = hf_tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert ids.tolist() == ref["input_ids"].tolist() and mask.tolist() == ref["attention_mask"].tolist()
    assert ids.shape[1] == 24 and ids[5, -1] == hf_tok.eos_token_id  # the long report: truncated, EOS kept last
    pixels = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        out = hf(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], pixel_values=pixels)
        torch.testing.assert_close(expert.encode_images(pixels), out.image_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(expert.encode_texts(ids, mask), out.text_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(expert.logit_scale, hf.logit_scale)
    # similarity: (B, G) = each image against its own group, the diagonal blocks of HF's all-pairs cosine
    cos = (out.logits_per_image / hf.logit_scale.exp()).view(2, 2, 4)  # (B, B', G)
    want = torch.stack([cos[0, 0], cos[1, 1]])
    got = expert.similarity(pixels, REPORTS, max_text_tokens=30)  # a cap this small: one report per text chunk
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(expert.similarity(pixels, REPORTS), want, rtol=0, atol=1e-5)


def test_clip_text_left_padding_and_legacy_eos():
    torch.manual_seed(0)
    text = ClipText(ClipTextConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=20,
                                   max_position_embeddings=8, eos_token_id=2))
    ids = torch.tensor([[0, 0, 7, 5, 49, 3], [7, 5, 49, 0, 0, 0]])  # legacy rule: pool at the highest id (49)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        h = text(ids, mask)
        assert torch.isfinite(h).all()  # a fully padded query row must not turn into NaN
        torch.testing.assert_close(text.pooled(h, ids)[0], h[0, 4])
        alone = text(ids[1:, :3])  # right padding changes nothing before it (causal), with or without a mask
        torch.testing.assert_close(text.pooled(h, ids)[1], alone[0, 2], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- BiomedCLIP (open_clip layout)

TIMM_NAMES = [("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
              ("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("layers.", "blocks."),
              ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("attention.o_proj", "attn.proj"),
              ("layernorm.", "norm.")]


def _biomedclip_folder(folder, seed=0):
    """A tiny BiomedCLIP written the way open_clip saves it: transformers' ViTModel (the timm ViT: class token,
    no pre-norm, biased patch conv, exact GELU, final norm) renamed to timm's names with q, k, v fused into qkv,
    and a BertModel under text.transformer. Returns the reference image / text encoders."""
    from transformers import ViTConfig, ViTModel
    folder.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    vit = ViTModel(ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                             image_size=32, patch_size=8, layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    bert = BertModel(HFBertConfig(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=80, max_position_embeddings=40),
                     add_pooling_layer=False).eval()
    for p in [*vit.parameters(), *bert.parameters()]:
        p.data.add_(0.1 * torch.randn_like(p))
    w_image, w_hidden, w_out = torch.randn(24, 128) / 11, torch.randn(76, 128) / 11, torch.randn(24, 76) / 9
    sd = {"logit_scale": torch.tensor(4.2), "visual.head.proj.weight": w_image, "text.proj.0.weight": w_hidden,
          "text.proj.2.weight": w_out, "text.transformer.embeddings.position_ids": torch.arange(40)[None]}
    vit_sd = vit.state_dict()
    for k, v in vit_sd.items():
        if ".attention.k_proj." in k or ".attention.v_proj." in k:
            continue
        if ".attention.q_proj." in k:  # timm: one (3D, D) qkv projection
            v = torch.cat([vit_sd[k.replace("q_proj", n)] for n in ("q_proj", "k_proj", "v_proj")])
            k = k.replace("attention.q_proj", "attn.qkv")
        for hf_name, timm_name in TIMM_NAMES:
            k = k.replace(hf_name, timm_name)
        sd["visual.trunk." + k] = v
    sd.update({"text.transformer." + k: v for k, v in bert.state_dict().items()})
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 24,
                      "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                     "timm_pool": "", "timm_proj": "linear", "image_size": 32},
                      "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                   "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                   "context_length": 16}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    _vocab_folder(folder)

    def image_ref(pixels):
        return F.normalize(vit(pixel_values=pixels).last_hidden_state[:, 0] @ w_image.T, dim=-1)

    def text_ref(ids, mask):
        cls = bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return F.normalize(F.gelu(cls @ w_hidden.T) @ w_out.T, dim=-1)

    return image_ref, text_ref


def test_biomedclip_layout_matches_vit_and_bert_references(tmp_path):
    image_ref, text_ref = _biomedclip_folder(tmp_path)
    expert = load(tmp_path)
    assert expert.cfg.vision.num_heads == 2 and expert.cfg.text.num_heads == 2 and expert.cfg.context_length == 16
    assert expert.logit_scale.item() == pytest.approx(4.2)
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = expert.tokenize([r for group in REPORTS for r in group])
    assert ids.shape == (8, 16) and (ids[:, 0] == 2).all()  # truncated to the context, [CLS] first
    with torch.no_grad():
        image, text = image_ref(pixels), text_ref(ids, mask)
        torch.testing.assert_close(expert.encode_images(pixels), image, rtol=0, atol=1e-5)
        torch.testing.assert_close(expert.encode_texts(ids, mask), text, rtol=0, atol=1e-5)
    want = torch.einsum("be,bge->bg", image, text.view(2, 4, -1))
    torch.testing.assert_close(expert.similarity(pixels, REPORTS), want, rtol=0, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    _biomedclip_folder(tmp_path / "biomedclip")
    expert = load(tmp_path / "biomedclip")
    save(expert, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors",
                                                                       "tokenizer.json"]
    again = load(tmp_path / "ours")
    assert again.cfg == expert.cfg and again.processing == expert.processing
    for k, v in expert.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.similarity(pixels, REPORTS), expert.similarity(pixels, REPORTS))
    save(again, tmp_path / "ours")  # overwriting an existing expert folder
    assert not list(tmp_path.glob(".ours.*"))
    weights = tmp_path / "ours" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])  # an interrupted copy: one line naming the file
    with pytest.raises(ValueError, match=r"ours/model.safetensors: not a readable safetensors file"):
        load(tmp_path / "ours")
    weights.write_bytes(good)
    (tmp_path / "ours" / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"ours/tokenizer.json: not a readable tokenizer.json"):
        load(tmp_path / "ours")


def test_mismatched_checkpoint_lists_every_key(tmp_path):
    _biomedclip_folder(tmp_path)
    sd = torch.load(tmp_path / "open_clip_pytorch_model.bin", weights_only=True)
    del sd["text.proj.2.weight"]
    sd["visual.trunk.blocks.0.ls1.gamma"] = torch.ones(128)  # a LayerScale our ViT does not have
    sd["visual.head.proj.weight"] = torch.zeros(24, 127)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load(tmp_path)
    msg = str(err.value)
    assert "open_clip_pytorch_model.bin" in msg
    assert "missing ['text_projection.2.weight']" in msg
    assert "unexpected ['visual.trunk.blocks.0.ls1.gamma']" in msg
    assert "wrong shape ['visual_projection.weight: (24, 127) in the checkpoint, (24, 128) in the model']" in msg


class _Payload:  # unpickling this calls open(path, "w"): code execution, which weights_only must refuse
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_carrying_code_is_refused(tmp_path):
    _biomedclip_folder(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"logit_scale": torch.tensor(1.0), "evil": _Payload(str(marker))}
    torch.save(evil, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="open_clip_pytorch_model.bin: refused or unreadable"):
        load(tmp_path)
    assert not marker.exists()


def test_open_clip_config_errors(tmp_path):
    _biomedclip_folder(tmp_path)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_pooler_type"] = "mean_pooler"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="text_cfg.hf_pooler_type = 'mean_pooler'"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        load(tmp_path / "no" / "such" / "folder")
    with pytest.raises(ValueError, match="not an expert checkpoint"):
        load(tmp_path / "..")


# ----------------------------------------------------------------------------- images and the scorer


def test_similarity_reads_xray_files_of_every_kind(tmp_path):
    from PIL import Image
    _biomedclip_folder(tmp_path / "expert")
    expert = load(tmp_path / "expert")
    assert expert.processing.size == 32 and expert.processing.mode == "crop"
    assert expert.processing.mean == (0.48145466, 0.4578275, 0.40821073)
    gray = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)  # not square: resize + crop
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # the same X-ray at 16 bits
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    paths = [tmp_path / n for n in ("rgb.png", "gray.png", "rgba.png", "gray16.png")]
    got = expert.similarity(paths, [REPORTS[0]] * 4)
    assert got.shape == (4, 4) and got.dtype == torch.float32 and got.abs().max() <= 1
    for row in got[1:]:  # all four files hold the same picture
        torch.testing.assert_close(row, got[0], rtol=0, atol=1e-6)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt.png"):
        expert.similarity([paths[0], tmp_path / "corrupt.png"], [REPORTS[0]] * 2)
    with pytest.raises(ValueError, match="B images and B lists of G reports"):
        expert.similarity(paths[:2], [REPORTS[0], REPORTS[1][:3]])


def test_long_reports_are_truncated_to_the_context(tmp_path):
    _biomedclip_folder(tmp_path)
    expert = load(tmp_path)  # context 16 tokens: [CLS] + 14 + [SEP]
    head = "the heart is normal size . no pleural effusion , lungs are clear . mild"  # exactly 14 word pieces
    long_report = head + " left-sided effusion" * 30
    ids, mask = expert.tokenize([long_report, head])
    assert ids.tolist()[0] == ids.tolist()[1] and mask.sum(1).tolist() == [16, 16]
    pixels = torch.randn(1, 3, 32, 32)
    scores = expert.similarity(pixels, [[long_report, head, ""]])
    assert scores[0, 0] == scores[0, 1] and scores[0, 0] != scores[0, 2]  # the rule: truncate; empty: [CLS][SEP]


def test_frozen_scorer_leaves_training_state_alone(tmp_path):
    _biomedclip_folder(tmp_path)
    expert = load(tmp_path).train()
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    scores = expert.similarity(pixels, REPORTS)
    assert expert.training and not scores.requires_grad  # no graph; mode restored for a caller that trains
    ids, mask = expert.tokenize(REPORTS[0])
    loss = (expert.encode_images(pixels) @ expert.encode_texts(ids, mask).T * expert.logit_scale.exp()).sum()
    loss.backward()  # called directly, the towers are differentiable (contrastive training of a tiny expert)
    assert pixels.grad.abs().sum() > 0 and expert.text.embeddings["word_embeddings"].weight.grad.abs().sum() > 0


def test_identical_reports_tie_under_any_chunking_and_any_split_over_ranks(tmp_path):
    """Rank advantages turn any score difference into a rank step: identical reports must score identically however
    the batch is chunked (max_text_tokens) and however its groups are split over ranks (separate calls)."""
    from nanovalor.grpo import rank
    _biomedclip_folder(tmp_path)
    expert = load(tmp_path)
    pixels = torch.randn(4, 3, 32, 32)
    short, long = "no effusion", "mild cardiomegaly with a small left pleural effusion and basal atelectasis"
    groups = [[short] * 5 + [long, "lungs clear", long], [long] * 3 + [short] * 5,
              ["x"] * 8, [short, long] * 4]  # the third group: all tied, advantage 0
    runs = {"one call": expert.similarity(pixels, groups)}
    for cap in (8, 20, 64):  # chunks padded to different widths
        runs[f"chunks of {cap}"] = expert.similarity(pixels, groups, max_text_tokens=cap)
    runs["2 ranks"] = torch.cat([expert.similarity(pixels[:2], groups[:2]), expert.similarity(pixels[2:], groups[2:])])
    runs["4 ranks"] = torch.cat([expert.similarity(pixels[i:i + 1], groups[i:i + 1]) for i in range(4)])
    base = rank(runs.pop("one call").double())
    assert base[0, :5].unique().numel() == 1 and base[0, 5] == base[0, 7] and (base[2] == 0).all()
    for name, scores in runs.items():
        assert torch.equal(rank(scores.double()), base), name


def test_similarity_is_on_the_host_whatever_device_scores_it(tmp_path, monkeypatch):
    """The expert's scores meet the text rewards (numpy, on the CPU) in the visual stage's advantages. Checked
    without a GPU: under FakeTensorMode the towers return tensors that claim to be on CUDA, with CUDA's device
    checks and no arithmetic, and similarity's own steps run on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nanovalor.expert import Expert
    from nanovalor.grpo import group_advantages
    _biomedclip_folder(tmp_path)
    expert = load(tmp_path)
    E = expert.cfg.embed_dim
    monkeypatch.setattr(Expert, "encode_images", lambda self, x: torch.empty(len(x), E, device="cuda"))
    monkeypatch.setattr(Expert, "_encode_sorted", lambda self, ids, mask, cap: torch.empty(len(ids), E, device="cuda"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        monkeypatch.setattr(expert.logit_scale, "data", torch.empty((), device="cuda"))  # the expert's device
        scores = expert.similarity(torch.randn(2, 3, 32, 32), REPORTS)
        assert scores.device.type == "cpu" and scores.shape == (2, 4)
        text = torch.as_tensor(np.zeros((2, 4), dtype=np.float32))  # what train.py makes of the text rewards
        group_advantages(scores, "rank", text, 0.5)  # raised "Expected all tensors to be on the same device" before


SCENES = {"opacity in the left upper lung .": (0, 0), "opacity in the right upper lung .": (0, 1),
          "opacity in the left lower lung .": (1, 0), "opacity in the right lower lung .": (1, 1),
          "the lungs are clear .": None}


def _scene(where, rng):
    """A 32 x 32 grey 'X-ray': noise, plus a bright blob in one quadrant (image left = patient's right)."""
    x = 0.1 * rng.standard_normal((32, 32))
    if where is not None:
        r, c = where[0] * 16 + rng.integers(2, 7), (1 - where[1]) * 16 + rng.integers(2, 7)
        x[r:r + 8, c:c + 8] += 1.0
    return torch.from_numpy(np.stack([x] * 3)).float()  # (3, 32, 32)


def test_trained_tiny_expert_ranks_the_matching_report_first(tmp_path):
    words = sorted({w for report in SCENES for w in report.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words))
    torch.manual_seed(0)
    cfg = ExpertConfig(vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=2, act="gelu", class_token=True, pre_norm=False,
                                           patch_bias=True, layer_norm_eps=1e-6),
                       text=BertConfig(vocab_size=len(words) + 4, hidden_size=32, num_layers=1, num_heads=2,
                                       intermediate_size=64, max_position_embeddings=16),
                       embed_dim=16, text_projection="mlp", context_length=16)
    expert = Expert(cfg, load_bert_tokenizer(tmp_path, 16))
    reports = list(SCENES)
    ids, mask = expert.tokenize(reports)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(expert.parameters(), lr=1e-3)  # (3e-3 stalls on some seeds, 1e-3 learned 10 of 10)
    target = torch.arange(len(reports)).repeat_interleave(8)
    for _ in range(150):  # InfoNCE, image -> report: 8 fresh images of each scene a step (one thread: conftest.py)
        images = torch.stack([_scene(SCENES[r], rng) for r in reports for _ in range(8)])  # (40, 3, 32, 32)
        logits = expert.encode_images(images) @ expert.encode_texts(ids, mask).T * expert.logit_scale.exp()
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = np.random.default_rng(1)
    images = torch.stack([_scene(SCENES[r], held_out) for r in reports for _ in range(3)])  # (15, 3, 32, 32)
    shuffled = [reports[2:] + reports[:2]] * 15  # the right answer is never first in the list
    scores = expert.similarity(images, shuffled)  # (15, 5)
    assert (scores.argmax(1) == torch.tensor([(i // 3 - 2) % 5 for i in range(15)])).all(), scores


def test_clip_images_processed_as_the_checkpoint_says(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor
    hf, hf_tok = _tiny_clip(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 35}, crop_size={"height": 35, "width": 35}).save_pretrained(tmp_path)
    expert = load(tmp_path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50, 41, 3), dtype=np.uint8)) for _ in range(2)]
    pixels = CLIPImageProcessor.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 35, 35)
    torch.testing.assert_close(expert.similarity(images, REPORTS), expert.similarity(pixels, REPORTS),
                               rtol=0, atol=1e-6)


def test_hub_ids_go_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub
    _biomedclip_folder(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):  # no network in tests: serve the local folder
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    expert = load("someone/tiny-biomedclip")
    assert expert.cfg.text_projection == "mlp" and calls[0][0] == "someone/tiny-biomedclip"
    assert "open_clip_pytorch_model.bin" in calls[0][1] and "*.bin" not in calls[0][1]  # not every weight format
