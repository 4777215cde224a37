"""Natural-language metrics of report generation, numerically identical to pycocoevalcap on the same tokens.

clean_report is the one text normaliser of nanovalor (metrics, rewards and data.py all use it).

    python -m pytest -q tests/test_rewards.py
"""
import re

# A word is a run of letters/digits (any script), optionally joined by inner hyphens ("left-sided", "t-spine");
# a decimal number keeps its point ("2.5"). Everything else (punctuation, underscores of de-identified "___",
# symbols) separates words and is dropped, as PTBTokenizer + pycocoevalcap's punctuation filter do.
_WORD = re.compile(r"\d+(?:\.\d+)+|[^\W_]+(?:-[^\W_]+)*")
# Sentence ends for the r2gen style: . ? ! except a point inside a decimal number.
_SENTENCE_END = re.compile(r"(?<!\d)\.|\.(?!\d)|[?!]")
# List markers such as "1. " or "2) " at the start of the text or after a space carry no content.
_LIST_MARKER = re.compile(r"(?:^|(?<=\s))\d{1,2}[.)](?=\s|$)")


def clean_report(text: str, style: str = "coco") -> str:
    """Lower-case `text` and return its words joined by single spaces.

    style "coco": words only, punctuation dropped (what PTBTokenizer + pycocoevalcap's filter feed the scorers).
    style "r2gen": sentences joined by " . " with a final " ." so that the period is a token that counts in
    n-grams, as R2Gen's cleaner does (cuhksz-nlp/R2Gen modules/tokenizers.py). Unlike R2Gen we keep decimal
    points ("2.5" stays, R2Gen writes "25") and drop empty sentences. Apostrophes are removed ("patient's" ->
    "patients") in both styles. Never raises on odd text; returns "" for a text without words.
    """
    if style not in ("coco", "r2gen"):
        raise ValueError(f"clean_report: style must be 'coco' or 'r2gen', got {style!r}")
    text = _LIST_MARKER.sub(" ", str(text).lower().replace("'", "").replace("\u2019", ""))
    if style == "coco":
        return " ".join(_WORD.findall(text))
    sentences = [" ".join(_WORD.findall(s)) for s in _SENTENCE_END.split(text)]
    sentences = [s for s in sentences if s]
    return " . ".join(sentences) + " ." if sentences else ""
