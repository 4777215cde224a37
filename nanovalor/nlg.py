"""Natural-language metrics of report generation, numerically identical to pycocoevalcap on the same tokens.

clean_report is the one text normaliser of nanovalor (metrics, rewards and data.py all use it). The metric
functions take already-normalised strings (words separated by spaces) and follow pycocoevalcap 1.2
(github.com/salaniz/pycocoevalcap) operation for operation, so that corpus and per-sample values agree to 1e-9:

- bleu:    BLEU-1..4, clipped n-gram counts, "closest" reference length, corpus counts summed over segments,
           the +1e-15 / +1e-9 guards; per-sample values each with their own brevity penalty (bleu/bleu_scorer.py).
- rouge_l: LCS-based F-measure with beta = 1.2, max precision and max recall over references, tokens from
           split(" ") (rouge/rouge.py). The LCS is the bit-parallel algorithm of Allison & Dix (1986) on Python
           integers: one add / and / or per hypothesis word instead of a len(hyp) x len(ref) table.
- CiderD:  CIDEr-D (Vedantam et al. 2015), tf-idf n-gram vectors (n = 1..4), document frequencies from a
           reference corpus given once, clipped similarity, Gaussian length penalty (sigma = 6) on the number of
           *bigrams* (pycocoevalcap's quirk), x10 (cider/cider_scorer.py).
- meteor:  METEOR 1.5 (Denkowski & Lavie 2014) with exact and Porter-stem matching only: WordNet synonyms and
           paraphrase tables are data we do not ship, so scores are lower than the jar's (which also stems with
           Snowball English and uses its own function-word list); see tests/test_rewards.py for the correlation.
"""
import heapq
import math
import re
from collections import Counter
from functools import lru_cache

import numpy as np

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


def read_reports(path) -> list:
    """One report per line of a UTF-8 text file. Lines end at "\n" (or "\r\n") only: str.splitlines() would also
    split at form feeds, \x1c-\x1e, \x85 and U+2028/2029, which may sit inside a report, and shift every later
    report against its reference. A clear error (SystemExit) for a missing, non-file or non-UTF-8 path."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file") from None
    except IsADirectoryError:
        raise SystemExit(f"error: {path}: a folder, expected a text file with one report per line") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = 1 + data[:e.start].count(b"\n")
        raise SystemExit(f"error: {path}, line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":  # a final newline ends the last line; it does not start an empty one
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def as_ref_lists(refs):
    """Each sample's references as a list: "a b" -> ["a b"]; ["a b", "c"] stays."""
    return [[r] if isinstance(r, str) else list(r) for r in refs]


def ngram_counts(text, n=4):
    """(number of words, [Counter of the k-grams of text.split(), as tuples of words, for k = 1..n])."""
    words = text.split()
    return len(words), [Counter(zip(*(words[i:] for i in range(k)))) for k in range(1, n + 1)]


# ----------------------------------------------------------------------------------------------------------- BLEU

def _bleu_ref_stats(ref_list, n):
    """Lengths of the references and the max count of every n-gram over them (BLEU's clipping)."""
    lengths, max_counts = [], {}
    for ref in ref_list:
        length, counts = ngram_counts(ref, n)
        lengths.append(length)
        for counter in counts:
            for gram, c in counter.items():
                if c > max_counts.get(gram, 0):
                    max_counts[gram] = c
    return lengths, max_counts


def bleu(hyps, refs, n=4, hyp_counts=None):
    """BLEU-1..n. Returns (corpus [n floats], per_sample array (N, n)); refs: one str or a list per sample."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's guards against 0/0
    ref_lists, cache = as_ref_lists(refs), {}
    per_sample = np.zeros((len(hyps), n))
    total_correct, total_guess, total_test, total_ref = [0] * n, [0] * n, 0, 0
    for i, (hyp, ref_list) in enumerate(zip(hyps, ref_lists)):
        key = tuple(ref_list)  # a GRPO group shares its reference: its n-grams are counted once
        ref_lengths, max_counts = cache[key] if key in cache else cache.setdefault(key, _bleu_ref_stats(ref_list, n))
        test_len, counts = hyp_counts[i] if hyp_counts is not None else ngram_counts(hyp, n)
        ref_len = min((abs(length - test_len), length) for length in ref_lengths)[1]  # "closest", ties -> shorter
        get = max_counts.get
        correct = [sum(min(get(gram, 0), c) for gram, c in counts[k].items()) for k in range(n)]
        guess = [max(0, test_len - k) for k in range(n)]
        score = 1.0
        for k in range(n):
            score *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per_sample[i, k] = score ** (1.0 / (k + 1))
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:  # brevity penalty
            per_sample[i] *= math.exp(1 - 1 / ratio)
        total_test += test_len
        total_ref += ref_len
    corpus, score = [], 1.0
    for k in range(n):
        score *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [c * math.exp(1 - 1 / ratio) for c in corpus]
    return corpus, per_sample


# -------------------------------------------------------------------------------------------------------- ROUGE-L

def _positions(b):
    """token -> integer with bit j set where b[j] is that token."""
    masks = {}
    for j, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << j)
    return masks


def lcs_length(a, b, b_positions=None):
    """Length of the longest common subsequence of token lists a and b (bit-parallel, Allison & Dix 1986).

    Bit j of `row` is 1 while b[j] is still unmatched; each token of a adds the match mask of its positions in b
    and the carries propagate the LCS recurrence along b in one integer addition.
    """
    if not a or not b:
        return 0
    masks = b_positions if b_positions is not None else _positions(b)
    full = (1 << len(b)) - 1
    row = full
    for tok in a:
        m = masks.get(tok)
        if m:
            u = row & m
            row = ((row + u) | (row - u)) & full
    return len(b) - row.bit_count()


def rouge_l(hyps, refs, beta=1.2):
    """ROUGE-L F (beta = 1.2). Returns (corpus mean, per_sample array (N,))."""
    scores, cache = np.zeros(len(hyps)), {}
    for i, (hyp, ref_list) in enumerate(zip(hyps, as_ref_lists(refs))):
        hyp_tokens = hyp.split(" ")  # split(" "), not split(): "" is one empty token, as in pycocoevalcap
        prec, rec = [], []
        for ref in ref_list:
            if ref not in cache:
                tokens = ref.split(" ")
                cache[ref] = tokens, _positions(tokens)
            ref_tokens, positions = cache[ref]
            lcs = lcs_length(hyp_tokens, ref_tokens, positions)
            prec.append(lcs / float(len(hyp_tokens)))
            rec.append(lcs / float(len(ref_tokens)))
        p, r = max(prec), max(rec)
        if p != 0 and r != 0:
            scores[i] = ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p)
    return float(np.mean(scores)) if len(scores) else 0.0, scores


# -------------------------------------------------------------------------------------------------------- CIDEr-D

class CiderD:
    """CIDEr-D with document frequencies from a reference corpus, computed once and reused.

    corpus: one entry per image, a reference string or a list of them. pycocoevalcap takes the document
    frequencies from the evaluated corpus itself; for GRPO pass the training references once and score every
    step's samples against them (an n-gram unseen in the corpus gets the largest idf, log(len(corpus))).
    """

    def __init__(self, corpus, n=4, sigma=6.0):
        self.n, self.sigma = n, sigma
        df = Counter()
        documents = Counter(tuple(ref_list) for ref_list in as_ref_lists(corpus))  # a GRPO batch repeats them
        for ref_list, times in documents.items():
            for gram in {gram for ref in ref_list for counter in ngram_counts(ref, n)[1] for gram in counter}:
                df[gram] += times
        self.ref_len = float(np.log(float(max(1, len(corpus)))))  # log(#documents)
        # idf of every n-gram of the corpus, computed once; an unseen n-gram has df = 0 -> idf = ref_len.
        grams = list(df)
        logs = np.log(np.maximum(1.0, np.array([df[g] for g in grams], dtype=np.float64)))
        self.idf = dict(zip(grams, (self.ref_len - logs).tolist()))

    def _vector(self, counts):
        """tf-idf vector per n (dicts), their L2 norms, and the "length" (number of bigrams, as pycocoevalcap)."""
        idf, ref_len = self.idf, self.ref_len
        vec = [{gram: float(tf) * idf.get(gram, ref_len) for gram, tf in counter.items()} for counter in counts]
        norm = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norm, sum(counts[1].values()) if self.n > 1 else 0

    def _sim(self, hyp, ref):
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        delta = float(len_h - len_r)
        penalty = math.e ** (-(delta ** 2) / (2 * self.sigma ** 2))  # Gaussian length penalty
        val = []
        for k in range(self.n):
            vr, total = vec_r[k], 0.0
            for gram, w in vec_h[k].items():
                r = vr.get(gram)
                if r is not None:
                    total += min(w, r) * r  # clipped: repeating a word does not pay
            if norm_h[k] != 0 and norm_r[k] != 0:
                total /= norm_h[k] * norm_r[k]
            val.append(total * penalty)
        return val

    def __call__(self, hyps, refs, hyp_counts=None):
        """Per-sample CIDEr-D, array (N,); refs: one str or a list per sample."""
        cache, scores = {}, np.zeros(len(hyps))  # a group's reference is vectorised once per call
        for i, (hyp, ref_list) in enumerate(zip(hyps, as_ref_lists(refs))):
            counts = hyp_counts[i][1] if hyp_counts is not None else ngram_counts(hyp, self.n)[1]
            vec = self._vector(counts[:self.n])
            score = [0.0] * self.n
            for ref in ref_list:
                ref_vec = cache[ref] if ref in cache else cache.setdefault(
                    ref, self._vector(ngram_counts(ref, self.n)[1]))
                score = [a + b for a, b in zip(score, self._sim(vec, ref_vec))]
            scores[i] = sum(score) / self.n / len(ref_list) * 10.0  # mean over n, over references, x10
        return scores


def cider_d(hyps, refs):
    """Corpus CIDEr-D as pycocoevalcap computes it (document frequencies from these refs): (mean, per_sample)."""
    scores = CiderD(refs)(hyps, refs)
    return float(np.mean(scores)) if len(scores) else 0.0, scores


# ------------------------------------------------------------------------------------------------- Porter stemmer

def _consonant_pattern(word):
    """'c'/'v' per letter: a, e, i, o, u are vowels, and y after a consonant (Porter 1980, section 2)."""
    out = []
    for i, ch in enumerate(word):
        vowel = ch in "aeiou" or (ch == "y" and i > 0 and out[i - 1] == "c")
        out.append("v" if vowel else "c")
    return "".join(out)


def _measure(stem):
    """m in [C](VC)^m[V]: the number of vowel-consonant transitions."""
    return _consonant_pattern(stem).count("vc")


def _has_vowel(stem):
    return "v" in _consonant_pattern(stem)


def _double_consonant(stem):
    return len(stem) >= 2 and stem[-1] == stem[-2] and _consonant_pattern(stem)[-1] == "c"


def _cvc(stem):
    """*o: the stem ends consonant-vowel-consonant and the last consonant is not w, x or y."""
    return len(stem) >= 3 and _consonant_pattern(stem)[-3:] == "cvc" and stem[-1] not in "wxy"


def _apply_first(word, rules, min_measure):
    """Steps 2-4: the first rule whose suffix matches decides; it applies only if the stem's m is big enough."""
    for suffix, repl in rules:
        if word.endswith(suffix):
            stem = word[:len(word) - len(suffix)]
            if suffix == "ion" and not stem.endswith(("s", "t")):
                return word
            return stem + repl if _measure(stem) > min_measure else word
    return word


_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("abli", "able"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
          ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
          ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
          ("ness", "")]
_STEP4 = [(s, "") for s in ("al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
                            "ou", "ism", "ate", "iti", "ous", "ive", "ize")]


@lru_cache(maxsize=65536)
def porter_stem(word: str) -> str:
    """The Porter (1980) stemmer, as published ("An algorithm for suffix stripping", Program 14(3)).

    Words of one or two letters are returned unchanged (as Porter's own implementations do).
    """
    w = word
    if len(w) <= 2:
        return w
    # Step 1a: plurals.
    if w.endswith("sses") or w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    # Step 1b: -eed, -ed, -ing.
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    else:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and _has_vowel(w[:-len(suffix)]):
                w = w[:-len(suffix)]
                if w.endswith(("at", "bl", "iz")):
                    w += "e"
                elif _double_consonant(w) and w[-1] not in "lsz":
                    w = w[:-1]
                elif _measure(w) == 1 and _cvc(w):
                    w += "e"
                break
    # Step 1c: y -> i after a vowel in the stem.
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    w = _apply_first(w, _STEP2, 0)
    w = _apply_first(w, _STEP3, 0)
    w = _apply_first(w, _STEP4, 1)
    # Step 5: a final -e, a final double l.
    if w.endswith("e"):
        m = _measure(w[:-1])
        if m > 1 or (m == 1 and not _cvc(w[:-1])):
            w = w[:-1]
    if _measure(w) > 1 and _double_consonant(w) and w.endswith("l"):
        w = w[:-1]
    return w


# --------------------------------------------------------------------------------------------------------- METEOR

# METEOR 1.5 defaults for English, task "rank" (Denkowski & Lavie 2014): alpha, beta, gamma, delta; module weights.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.20, 0.60, 0.75
METEOR_EXACT, METEOR_STEM = 1.0, 0.6
# Function words weigh 1 - delta in precision and recall, content words delta. Our own list of English
# determiners, pronouns, prepositions, conjunctions and auxiliaries (the jar ships a frequency-derived one).
FUNCTION_WORDS = frozenset("""
a an the this that these those there here it its i we you he she they them their his her our your who whom which
what when where why how of to in on at by for with from into onto over under about after before between through
during without within than as per via up out off and or nor but if then so also not no yes is are was were be been
being am has have had do does did can could may might will would should shall must all any some each both other
such more most very only just own same too s t""".split())


# METEOR reads the first this many words of each text: real reports are far shorter, and it bounds the work on a
# degenerate rollout ("no no no ..." x 10,000) to a fraction of a second.
METEOR_MAX_WORDS = 256


def _align(hs, rs):
    """Pairs (i, j) of equal stems, each word in at most one pair, as many pairs as possible, in few chunks.

    Runs of consecutive equal stems along a diagonal j - i are taken longest first (fewest chunks), ties to the
    smallest shift |i - j| (METEOR's last tie-break); a run partly taken is split into its free pieces, which go
    back in the queue. With one-word matches the result is a maximum matching, as METEOR's aligner requires.
    """
    where = {}
    for j, s in enumerate(rs):
        where.setdefault(s, []).append(j)
    pairs = {(i, j) for i, s in enumerate(hs) for j in where.get(s, ())}
    queue = []
    for i, j in pairs:
        if (i - 1, j - 1) not in pairs:  # a run starts here
            length = 1
            while (i + length, j + length) in pairs:
                length += 1
            queue.append((-length, abs(i - j), i, j))
    heapq.heapify(queue)
    h_free, r_free, taken = [True] * len(hs), [True] * len(rs), []
    while queue:
        neg_length, shift, i, j = heapq.heappop(queue)
        free = [h_free[i + t] and r_free[j + t] for t in range(-neg_length)]
        if all(free):
            for t in range(-neg_length):
                h_free[i + t] = r_free[j + t] = False
                taken.append((i + t, j + t))
            continue
        t = 0
        while t < len(free):  # push back the free pieces of a run that another run crossed
            if free[t]:
                start = t
                while t < len(free) and free[t]:
                    t += 1
                heapq.heappush(queue, (start - t, shift, i + start, j + start))
            t += 1
    return taken


def _meteor_stats(hyp, ref):
    """Sufficient statistics of one aligned pair (in the spirit of the jar's -ssOut):
    [hyp content len, hyp function len, ref content len, ref function len, weighted hyp content matches,
     weighted hyp function matches, weighted ref content matches, weighted ref function matches, chunks,
     matches, hyp len, ref len]."""
    h, r = hyp.split()[:METEOR_MAX_WORDS], ref.split()[:METEOR_MAX_WORDS]
    pairs = _align([porter_stem(w) for w in h], [porter_stem(w) for w in r])
    pairs.sort()
    chunks = sum(1 for k, (i, j) in enumerate(pairs) if k == 0 or (i, j) != (pairs[k - 1][0] + 1, pairs[k - 1][1] + 1))
    stats = np.zeros(12)
    stats[0] = sum(w not in FUNCTION_WORDS for w in h)
    stats[1] = len(h) - stats[0]
    stats[2] = sum(w not in FUNCTION_WORDS for w in r)
    stats[3] = len(r) - stats[2]
    for i, j in pairs:
        weight = METEOR_EXACT if h[i] == r[j] else METEOR_STEM
        stats[4 if h[i] not in FUNCTION_WORDS else 5] += weight
        stats[6 if r[j] not in FUNCTION_WORDS else 7] += weight
    stats[8], stats[9], stats[10], stats[11] = chunks, len(pairs), len(h), len(r)
    return stats


def _meteor_score(st):
    d = METEOR_DELTA
    p_den, r_den = d * st[0] + (1 - d) * st[1], d * st[2] + (1 - d) * st[3]
    p = (d * st[4] + (1 - d) * st[5]) / p_den if p_den > 0 else 0.0
    r = (d * st[6] + (1 - d) * st[7]) / r_den if r_den > 0 else 0.0
    if p == 0 or r == 0:
        return 0.0
    fmean = p * r / (METEOR_ALPHA * p + (1 - METEOR_ALPHA) * r)
    chunks, matches = st[8], st[9]
    perfect = matches == st[10] and matches == st[11] and chunks == 1  # no fragmentation penalty
    frag = 0.0 if perfect else chunks / matches
    return float(fmean * (1 - METEOR_GAMMA * frag ** METEOR_BETA))


def meteor(hyps, refs):
    """METEOR 1.5 with exact + Porter-stem matching, on the first METEOR_MAX_WORDS words of each text.
    Returns (corpus, per_sample (N,)).

    With several references the best-scoring one counts; the corpus score comes from the summed statistics of
    those best pairs (as the jar's EVAL line), not from the mean of the segment scores.
    """
    scores, total = np.zeros(len(hyps)), np.zeros(12)
    for i, (hyp, ref_list) in enumerate(zip(hyps, as_ref_lists(refs))):
        best = max(((_meteor_score(st), k, st) for k, st in enumerate(_meteor_stats(hyp, r) for r in ref_list)),
                   key=lambda x: (x[0], -x[1]))
        scores[i] = best[0]
        total += best[2]
    return (_meteor_score(total) if len(hyps) else 0.0), scores
