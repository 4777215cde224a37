"""BERT (Devlin et al. 2019, arXiv 1810.04805): the encoder, its WordPiece tokenizer, and CheXbert.

    bert = Bert(bert_config_from_hf(json.load(open("config.json"))))   # transformers' BertModel names, one to one
    tokenizer = load_bert_tokenizer(folder)                              # tokenizer.json, or vocab.txt
    chexbert = load_chexbert("chexbert.pth", folder)                     # 14 CheXpert labels per report
    chexbert.label(["No acute cardiopulmonary process."])

BERT is the text tower of BiomedCLIP's PubMedBERT (expert.py) and CheXbert's backbone; CheXbert (Smit et al. 2020)
labels reports with the same 1.0 / 0.0 / -1.0 / None values as the rule labeler (chexpert.py), and rewards.py
scores with either.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from nanovalor.weights import read_tokenizer, read_weights

# -----------------------------------------------------------------------------
# BERT encoder (Devlin et al. 2019): post-LayerNorm blocks, learned absolute positions, exact GELU.
# Parameter names mirror transformers' BertModel one to one, so an HF state dict (BiomedCLIP's PubMedBERT under
# `text.transformer.`, CheXbert's bert-base-uncased under `bert.`) loads with nothing but a prefix strip.


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooler: bool = False  # BertModel's tanh(dense([CLS])) head; CheXbert and BiomedCLIP do not use it


def bert_config_from_hf(d, pooler=False):
    """BertConfig from an HF BERT `config.json` dict."""
    if d.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json model_type {d.get('model_type')!r}: expected 'bert'")
    if d.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json hidden_act {d.get('hidden_act')!r}: expected 'gelu' (exact GELU, as BERT)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json position_embedding_type {d['position_embedding_type']!r}: expected 'absolute'")
    return BertConfig(
        vocab_size=d.get("vocab_size", 30522), hidden_size=d.get("hidden_size", 768),
        num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
        intermediate_size=d.get("intermediate_size", 3072),
        max_position_embeddings=d.get("max_position_embeddings", 512), type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12), pad_token_id=d.get("pad_token_id") or 0, pooler=pooler)


def bert_config_from_state(sd, prefix):
    """BertConfig read off the shapes of a BERT state dict whose keys are `prefix` + HF BertModel names, for
    checkpoints that ship no BERT config (open_clip's BiomedCLIP, CheXbert): 64-wide heads, as in every BERT size.
    A KeyError names a missing tensor."""
    words = sd[prefix + "embeddings.word_embeddings.weight"]  # (V, H)
    return BertConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1], num_layers=count_layers(sd, prefix + "encoder.layer."),
        num_heads=max(1, words.shape[1] // 64),
        intermediate_size=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0])


def _linear_norm(d_in, d_out, eps):  # BERT's "output" sub-modules: a projection, then LayerNorm(x + residual)
    return nn.ModuleDict(dict(dense=nn.Linear(d_in, d_out), LayerNorm=nn.LayerNorm(d_out, eps=eps)))


class BertLayer(nn.Module):
    """One post-LN block. The nested ModuleDicts exist only to reproduce HF's parameter names
    (attention.self.query, attention.output.dense, intermediate.dense, output.LayerNorm, ...)."""

    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.num_heads = cfg.num_heads
        qkv = nn.ModuleDict(dict(query=nn.Linear(d, d), key=nn.Linear(d, d), value=nn.Linear(d, d)))
        self.attention = nn.ModuleDict({"self": qkv, "output": _linear_norm(d, d, eps)})
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(d, cfg.intermediate_size)))
        self.output = _linear_norm(cfg.intermediate_size, d, eps)

    def forward(self, x, keep):
        """x (B, T, D); keep (B, 1, 1, T) bool, True where a key may be attended to (not padding)."""
        B, T, D = x.shape
        qkv = self.attention["self"]
        q, k, v = (qkv[n](x).view(B, T, self.num_heads, -1).transpose(1, 2) for n in ("query", "key", "value"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(B, T, D)
        out = self.attention["output"]
        x = out["LayerNorm"](out["dense"](y) + x)
        h = F.gelu(self.intermediate["dense"](x))  # (B, T, intermediate)
        return self.output["LayerNorm"](self.output["dense"](h) + x)


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(cfg.vocab_size, d),
            position_embeddings=nn.Embedding(cfg.max_position_embeddings, d),
            token_type_embeddings=nn.Embedding(cfg.type_vocab_size, d),
            LayerNorm=nn.LayerNorm(d, eps=cfg.layer_norm_eps)))
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))))
        self.pooler = nn.ModuleDict(dict(dense=nn.Linear(d, d))) if cfg.pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = padding -> last hidden state (B, T, H)."""
        B, T = input_ids.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"BERT input of {T} tokens: at most max_position_embeddings = "
                             f"{self.cfg.max_position_embeddings} (truncate when tokenizing)")
        e = self.embeddings
        x = e["word_embeddings"](input_ids) + e["position_embeddings"].weight[:T]  # (B, T, D)
        x = x + (e["token_type_embeddings"].weight[0] if token_type_ids is None
                 else e["token_type_embeddings"](token_type_ids))
        x = e["LayerNorm"](x)
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.encoder["layer"]:
            x = layer(x, keep)
        return x

    def pooled(self, hidden):
        """BertModel's pooler_output: tanh(dense(hidden[:, 0])), (B, T, H) -> (B, H)."""
        if self.pooler is None:
            raise ValueError("pooled(): this BERT was built without a pooler (BertConfig.pooler=False)")
        return torch.tanh(self.pooler["dense"](hidden[:, 0]))


def load_bert_tokenizer(folder, max_length=512):
    """BERT WordPiece tokenizer from `tokenizer.json` (as saved by HF fast tokenizers) or, failing that, from
    `vocab.txt` with the bert-base-uncased pipeline: clean text, lower-case and strip accents (unless
    tokenizer_config.json says do_lower_case: false), split on whitespace and punctuation, WordPiece with '##'
    continuations, [CLS] ... [SEP]. Longer inputs are truncated to max_length tokens, specials included."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return finish_tokenizer(read_tokenizer(folder / "tokenizer.json"), folder, max_length, "[PAD]")
    if not (folder / "vocab.txt").exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt for the BERT tokenizer")
    lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(lines)}  # one token per line, its id = its line number
    missing = [t for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]") if t not in vocab]
    if missing:
        raise ValueError(f"{folder / 'vocab.txt'}: special tokens {missing} not in the vocabulary")
    config = folder / "tokenizer_config.json"
    lower = json.loads(config.read_text()).get("do_lower_case", True) if config.exists() else True
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lower)  # None: follows lowercase
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return finish_tokenizer(tok, folder, max_length, "[PAD]")


def finish_tokenizer(tok, folder, max_length, pad):
    """The expert's tokenizer settings: truncated to max_length tokens, padded to the longest in a batch with `pad`
    (or the padding token tokenizer.json sets); an error naming `folder` if the vocabulary lacks it."""
    pad = (tok.padding or {}).get("pad_token", pad)  # a tokenizer.json that sets its own padding keeps it
    if tok.token_to_id(pad) is None:
        raise ValueError(f"{folder}: the tokenizer has no padding token {pad!r}")
    # Truncation counts the post-processor's special tokens, so [SEP] / <|endoftext|> always stays the last token.
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)  # to the longest in the batch
    return tok


def tokenize(tokenizer, texts):
    """list of B strings -> input_ids (B, T), attention_mask (B, T), padded to the longest (after truncation)."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, T)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # (B, T)
    return ids, mask

def count_layers(sd, prefix):
    """How many blocks `prefix`N. numbers in a state dict."""
    return len({m[1] for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


# -----------------------------------------------------------------------------
# CheXbert

class CheXbert(nn.Module):
    """CheXbert (Smit et al. 2020, github.com/stanfordmlgroup/CheXbert): BERT-base, then on the [CLS] vector 13
    linear heads with 4 classes (blank, positive, negative, uncertain) and one with 2 (blank, positive) for
    No Finding. Parameter names follow the released chexbert.pth (bert.*, linear_heads.N.*)."""

    CLASS_TO_LABEL = (None, 1.0, 0.0, -1.0)  # CheXbert's class index -> our label value

    def __init__(self, cfg):
        super().__init__()
        self.bert = Bert(cfg)
        h = cfg.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(h, 4) for _ in range(13)] + [nn.Linear(h, 2)])
        self.tokenizer = None

    def forward(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> list of 14 logit tensors, (B, 4) x 13 and (B, 2)."""
        cls = self.bert(input_ids, attention_mask)[:, 0]  # (B, H)
        return [head(cls) for head in self.linear_heads]

    @torch.no_grad()
    def label(self, texts, batch_size=32) -> list:
        """14-label tuples (1.0 / 0.0 / -1.0 / None) for each text; reports longer than 512 tokens are truncated."""
        if self.tokenizer is None:
            raise ValueError("CheXbert.label: no tokenizer (load the model with load_chexbert)")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [" ".join(str(t).split()) for t in texts[start:start + batch_size]]  # CheXbert's cleaning
            ids, mask = tokenize(self.tokenizer, chunk)
            classes = torch.stack([x.argmax(-1) for x in self(ids.to(device), mask.to(device))], 1)  # (b, 14)
            out += [tuple(self.CLASS_TO_LABEL[c] for c in row) for row in classes.tolist()]
        return out


def load_chexbert(checkpoint, tokenizer_folder=None, device="cpu") -> CheXbert:
    """CheXbert from `chexbert.pth` (a dict with `model_state_dict`, keys prefixed `module.`), loaded with
    torch.load(weights_only=True), and the bert-base-uncased WordPiece tokenizer in `tokenizer_folder`
    (tokenizer.json or vocab.txt; default: the checkpoint's own folder). The BERT shape is read from the weights
    (heads = hidden / 64, as BERT-base)."""
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: no such file (expected CheXbert's chexbert.pth)")
    tokenizer_folder = Path(checkpoint).parent if tokenizer_folder is None else tokenizer_folder
    state = {k.removeprefix("module."): v for k, v in read_weights(checkpoint, key="model_state_dict").items()}
    state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.") and not k.endswith("position_ids")}
    try:
        cfg = bert_config_from_state(state, "bert.")
    except (KeyError, ValueError) as e:
        raise ValueError(f"{checkpoint}: not a CheXbert checkpoint (missing or odd BERT weights: {e})") from None
    model = CheXbert(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: CheXbert weights do not match: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tokenizer = load_bert_tokenizer(tokenizer_folder, max_length=512)
    return model.to(device).eval()
