"""The frozen expert (nanovalor.expert) against transformers' BertModel / CLIPModel and hand-computed cases.

    python -m pytest -q tests/test_expert.py
"""
import pytest
import torch
from transformers import BertConfig as HFBertConfig, BertModel
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from nanovalor.expert import Bert, bert_config_from_hf, load_bert_tokenizer, tokenize

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
