"""The rules of the CheXpert-14 labeler (chexpert.label_report): what counts as a mention of each observation, the
negation and uncertainty cues, and how far a cue reaches.

They follow how the CheXpert labeler decides (Irvin et al. 2019, github.com/stanfordmlgroup/chexpert-labeler:
phrases/mention, phrases/unmention, patterns/pre_negation_uncertainty, negation, post_negation_uncertainty; NegBio,
github.com/ncbi-nlp/NegBio), with NegEx's idea of a cue scope that ends at a terminator (Chapman et al. 2001) in
place of NegBio's dependency parse, so that the labeler stays weight-free and fast:

- one regex scan turns a report into a sequence of events: mentions, cues, list separators (, and or), verbs and
  clause breaks; words that are none of these are dropped;
- a clause ends at . ; : ! ? and at terminators ("but", "however", "which", "otherwise", "status post", ...);
- a cue before a mention reaches it through a list ("no consolidation, suspicious opacity, effusion, or
  pneumothorax") but not past a verb ("no effusion is seen and ..."); as in CheXpert, a negation beats an
  uncertainty in the same scope, except "cannot exclude" / "not excluded", which are uncertain;
- a cue after a mention reaches back over its subject list ("X and Y are not seen", "X has resolved",
  "X and Y appear within normal limits", "X cannot be excluded");
- anatomy (heart, heart size, cardiac silhouette, mediastinum, ...) states nothing by itself: its size qualifier
  decides ("enlarged" positive; "normal", "upper limits of normal" negative as in CheXpert's negation patterns;
  "borderline" uncertain);
- unmentions: phrases that contain a mention word but are not that finding ("pericardial effusion", "calcified
  nodule", "septal lines", "granulomatous infection").

The labels of one report come from label_text (chexpert.label_report caches it).
"""
import re

CARDIOMEGALY, EDEMA, SUPPORT_DEVICES, NO_FINDING, OTHER = 1, 4, 12, 13, 14  # OTHER: findings outside the 14

# Mention phrases (regex fragments, lower case, " " = any whitespace) per observation, index = position in
# CHEXPERT_LABELS; after CheXpert's phrases/mention lists, with radiologists' synonyms, typos and abbreviations.
FINDINGS = {
    0: [r"mediastinal (?:widening|enlargement)", r"enlarged cardiomediastinum"],
    1: [r"cardiomegal\w*", r"cardiomeg[ae]ly", r"cardiac enlargement", r"cardiomyopathy"],
    2: [r"opaci\w*", r"opactiy", r"opacites", r"infiltrat\w*", r"air[- ]?space (?:disease|process|abnormalit\w*)",
        r"increased densit\w*", r"decreased translucency", r"interstitial (?:marking|pattern|prominence|"
        r"abnormalit\w*|lung disease|disease|thickening)s?", r"reticula\w*", r"reticulonodular\w*", r"reticulation",
        r"(?:parenchymal )?scar(?:s|ring)?", r"peribronchial (?:thickening|cuffing)", r"ground[- ]?glass",
        r"haziness", r"hazy"],
    3: [r"mass(?:es)?", r"nodul(?:e|es|ar|arity)", r"nodular (?:densit\w*|opacit\w*|opacification)", r"lump",
        r"lesions?", r"carcinoma", r"neoplas\w*", r"tumou?rs?", r"malignan\w*", r"cavitary lesion", r"cavitation"],
    4: [r"o?edema\w*", r"edmea", r"(?:vascular|venous) engorgement", r"congestive", r"fluid overload",
        r"kerley(?: b)?[- ]lines?", r"b[- ]lines"],
    5: [r"consolidat\w*", r"consolidaton", r"consolodation", r"consoldation"],
    6: [r"pneumonias?", r"bronchopneumonia", r"pneumonitis", r"pnuemonia", r"pneumona", r"pnemonia", r"pna",
        r"infections?", r"infectious(?: process)?"],
    7: [r"atelecta\w*", r"atelactasis", r"atelectsis", r"atlectasis", r"ateletasis", r"atx", r"collapsed?"],
    8: [r"(?:hydro)?pneumothora(?:x|ces)", r"pnuemothorax", r"pneumothroax", r"pneumothorx", r"pnemothorax",
        r"ptx"],
    9: [r"effusions?", r"effusoin", r"efusion", r"effussion", r"pleural fluid", r"hydrothorax"],
    10: [r"pleural (?:thickening|scar\w*|plaques?|fibrosis|reaction)", r"pleur(?:al|o)[- ]?parenchymal scar\w*",
         r"pleuro-?pericardial scar\w*", r"fibrothorax", r"fibrosis"],
    11: [r"fractures?", r"fractured", r"fracure", r"fractue", r"fx"],
    # Devices that support or monitor the patient (CheXpert's support_devices list). Surgical clips, stents,
    # sutures and sternotomy wires are not on it: they are other findings (below).
    12: [r"pacers?", r"pacemakers?", r"pacing (?:leads?|wires?)", r"lines?", r"picc", r"tubes?", r"valves?",
         r"catheters?", r"hardware", r"arthroplast\w*", r"icd", r"defibrillator", r"devices?", r"drains?",
         r"plates?", r"screws?", r"anchors?", r"cannula", r"apparatus", r"coils?", r"leads", r"electrodes?",
         r"generator", r"stimulator", r"mediport", r"port-a-cath", r"ports?", r"ett", r"ngt", r"endotracheal",
         r"nasogastric", r"orogastric", r"swan[- ]ganz", r"tips?"],
    # Other findings: they make No Finding blank (CheXpert's phrases/mention/no_finding.txt), nothing else.
    OTHER: [r"calcified (?:nodul\w*|lymph nodes?)",  # a granuloma, not a lung lesion (CheXpert's unmention)
         r"(?:thyroid|breast|soft[- ]tissue|neck|chest wall|liver|hepatic|renal|adrenal|abdominal|mediastinal|"
         r"pericardial) (?:mass(?:es)?|lesions?|nodules?)",  # not in the lung
         r"(?:granulomatous|prior|previous|old|remote|healed) (?:infection|infectious \w+)",  # not pneumonia
         r"sequelae? of (?:\w+ )?(?:infection|granulomatous \w+)", r"emphysema\w*", r"hyperinfla\w*",
         r"hyperexpan\w*", r"granulom\w*", r"calcifi\w*", r"\w*scolio\w*", r"kypho\w*", r"curvature",
         r"degenerat\w*", r"osteopeni\w*", r"osteophyt\w*", r"spondylosis", r"arthrit\w*", r"hernia", r"copd",
         r"bronchiectasis", r"plaques?", r"atheroscler\w*", r"thickening", r"cephalization", r"aspiration",
         r"bullae?", r"bullous", r"contusions?", r"metasta\w*", r"pneumomediastinum", r"pneumoperitoneum",
         r"inflam\w*", r"elevat\w*", r"eventration", r"flatten\w*", r"blunt\w*", r"densit(?:y|ies)", r"lucenc\w*",
         r"volume loss", r"deformit\w*", r"hemorrhage", r"hematoma", r"hypertension", r"bronchitis",
         r"bronchiolitis", r"airways? disease", r"osteodystrophy", r"arthropathy", r"tracheostomy", r"thoracentesis",
         r"bullet", r"fragments?", r"tortuo\w*", r"ectasia", r"ectatic", r"unfold\w*", r"aneurysm\w*",
         r"\w*adenopathy", r"(?:hilar|bihilar) (?:prominence|enlargement|fullness)",
         r"clips?", r"stents?", r"sutures?", r"wires?"],  # foreign material that does not support the patient
}
# Mentions that are at most uncertain: CheXpert reads vascular congestion or prominence and indistinctness as a
# possible edema (patterns/post_negation_uncertainty.txt); a negation still makes them negative.
UNCERTAIN_FINDINGS = {
    EDEMA: [r"(?:vascular|venous) (?:congestion|prominence)", r"(?:pulmonary )?congestion", r"indistinct\w*",
        r"prominen\w* (?:of )?(?:the )?(?:\w+ )?(?:pulmonary |lung )?vascula\w*"],
}
# Anatomical mentions (0: mediastinum, 1: heart): labelled only through a size qualifier.
ANATOMY = {
    0: [r"cardiomediastin\w*(?: (?:silhouette|contours?|shadow|width|structures))?",
        r"mediastinum", r"mediastinal (?:contours?|silhouette|width|configuration|shadow|structures)",
        r"(?:hilar and )?mediastinal and hilar (?:contours?|silhouettes?|structures)",
        r"hilar and mediastinal (?:contours?|silhouettes?|structures)",
        r"pericardial silhouette"],
    1: [r"heart size", r"heart", r"cardiac (?:silhouette|size|shadow|contours?)", r"cardiac(?= and mediastinal)"],
}
# Cue phrases by kind. At one position the first matching kind wins, in this order, so that longer phrases beat the
# shorter ones they contain ("no change" before "no", "suspicious for" before "suspicious").
CUES = {
    # Unmentions: a mention word that is not that finding, and positions that are not the heart itself.
    "skip": [r"(?:behind|over|overlying|projecting over|through|beyond|obscur\w*|along|left of|right of|near|"
             r"adjacent to|at) the heart", r"(?:left |right )?heart borders?", r"cardiac borders?",
             r"pericardial effusions?", r"pleural line",
             r"massive", r"(?:lytic|sclerotic|blastic|osseous|bony|skin) lesions?", r"plate-?like",
             r"(?:septal|lung|fissural?|suture|skin|azygo\w*|junction(?:al)?|paraspinal|paratracheal|"
             r"air[- ]fluid|mach)[- ]lines?",
             r"previously (?:seen|noted|described|demonstrated|visualized|identified)"],
    # Pseudo-negations (NegEx): "no change in the effusion" states the effusion.
    "pseudo": [r"no (?:significant |appreciable |substantial |interval |definite |other )*(?:change|increase|"
               r"decrease|progression|worsening|improvement)", r"not (?:significantly )?changed",
               r"without (?:significant |interval )?change", r"not only", r"gram negative"],
    # Uncertain although negated (CheXpert's pre-negation uncertainty): "cannot exclude", "is not excluded".
    "uncneg": [r"(?:cannot|can not|can't|could not|not|unable to) (?:be )?(?:entirely |completely |definitely )?"
               r"(?:excluded?|ruled? out)", r"difficult to (?:exclude|rule out)",
               r"not well (?:seen|visualized|assessed|evaluated)", r"poorly (?:seen|visualized)",
               r"incompletely (?:seen|visualized|evaluated)"],
    # Negations after the mention: "X is not seen", "X has resolved", "X has been removed".
    "negpost": [r"not (?:definitely |clearly |convincingly )?(?:seen|identified|present|evident|appreciated|"
                r"demonstrated|visualized|noted|detected|visible|apparent)", r"no longer (?:seen|present|"
                r"visualized|evident|identified|apparent|visible)", r"absent", r"(?:has|have) (?:resolved|cleared)",
                r"(?:has |have )?been removed", r"removed"],
    # Uncertainty after the mention: "pneumonia is suspected", "effusion may be present".
    "uncpost": [r"(?:is|are|was|were) (?:also |again )?(?:possible|likely|suspected|questioned|questionable|"
                r"a consideration|not excluded)", r"(?:may|might|could) (?:also )?be (?:present|seen)"],
    "resolved": [r"resolved", r"cleared"],  # a negation before ("resolved effusion") and after ("X resolved")
    "versus": [r"versus", r"vs\.?"],  # "atelectasis versus pneumonia": both uncertain
    # Negations before the mention.
    "neg": [r"no", r"not", r"without", r"w/o", r"negative for", r"free of", r"absence of", r"resolution of",
            r"clear of", r"rather than", r"never", r"none", r"neither", r"nor", r"lack of",
            r"removal of"],
    # Uncertainty that a mention's own negation overrides: "no suspicious opacity" (but "suspicious for" is "unc").
    "softunc": [r"(?:suspicious|concerning|worrisome)(?! for| of)"],
    # "suggestive of X" is uncertain, but an earlier negation wins ("no consolidation to suggest pneumonia").
    "uncweak": [r"(?:to )?suggest\w*", r"(?:to )?indicat\w*", r"to represent"],
    "unc": [r"possible", r"possibly", r"probable", r"probably", r"likely", r"may", r"might", r"could", r"perhaps",
            r"maybe", r"questionabl[ey]", r"question(?: of)?", r"suspicious", r"suspect\w*", r"concern\w*",
            r"worrisome", r"differential", r"consider\w*", r"presum\w*", r"indeterminate", r"equivocal", r"uncertain",
            r"favou?r\w*", r"evaluat\w* for", r"assess\w* for", r"correlat\w* (?:clinically )?for", r"rule out",
            r"r/o", r"borderline"],
    # Size qualifiers of anatomy. "upper limits of normal" is negative (CheXpert's negation patterns); "normal"
    # after a finding's verb negates it too ("vascular engorgement appears within normal limits").
    "borderline": [r"prominen\w*"],
    "normal": [r"(?:(?:at|near|within) )?(?:the )?(?:upper|top|high)[- ](?:limits? (?:of )?)?normal(?: limits)?",
               r"within (?:the )?(?:normal limits|limits of normal)", r"wnl", r"normal", r"unremarkable"],
    "abnormal": [r"enlarg\w*", r"widen\w*", r"increased in size", r"large", r"big"],
    # Verbs: the end of a subject, where a cue before it stops.
    "copula": [r"is", r"are", r"was", r"were", r"remains?", r"appears?", r"seems?", r"has been", r"have been",
               r"there"],
    "affirm": [r"present", r"seen", r"noted", r"identified", r"demonstrated", r"visualized", r"evident",
               r"appreciated", r"observed", r"visible", r"detected"],
    # Clause terminators (NegEx's termination terms, and "which", "otherwise", "status post").
    "term": [r"but", r"however", r"although", r"though", r"except", r"aside from", r"apart from", r"which",
             r"whereas", r"while", r"where", r"otherwise", r"following", r"after", r"status post", r"s/p"],
    "conj": [r"and/or", r"and", r"or"],  # and "/" ("scarring/atelectasis")
}
_HEAD = ("skip", "pseudo", "uncneg")  # matched before the heart failure and finding mentions


def _compile():
    """One regex finds every event of a report in one scan, each as a named group; at one position the first
    group that matches wins."""
    def group(name, fragments):
        return f"(?P<{name}>" + "|".join(f.replace(" ", r"\s+") for f in fragments) + ")"
    words = [group(kind, CUES[kind]) for kind in _HEAD]
    words += [group("hf", [r"heart failure", r"chf"])]  # edema, and an uncertain Cardiomegaly (CheXpert rule)
    words += [group(f"u{i}", frags) for i, frags in UNCERTAIN_FINDINGS.items()]  # before "prominent" the cue
    words += [group(kind, frags) for kind, frags in CUES.items() if kind not in _HEAD + ("conj",)]
    words += [group(f"m{i}", frags) for i, frags in FINDINGS.items()]
    words += [group(f"a{i}", frags) for i, frags in ANATOMY.items()]
    return re.compile(r"(?P<stop>(?<!\d)\.|\.(?!\d)|[;:!?]|\n\s*\n)|(?P<qmark>(?<![\w?])\?(?=[a-z]))|(?P<comma>,)"
                      r"|(?P<slash>/)|\b(?:" + "|".join(words + [group("conj", CUES["conj"])]) + r")(?!\w)")


EVENTS = _compile()
_KIND = {"qmark": "unc", "slash": "conj"}  # group name -> kind where they differ ("?pneumonia" is uncertain)
MENTIONS = {"hf"} | {f"{kind}{i}" for kind, table in (("m", FINDINGS), ("u", UNCERTAIN_FINDINGS), ("a", ANATOMY))
                     for i in table}

# Cues reach at most this many events away: long lists still fit, and a 100,000-character "clause" without
# punctuation stays linear in time.
_WINDOW = 24


def _pre_cue(kinds, i):
    """Label from the cues before position i of a clause, walking back until a verb: 0, -1 or None.
    A negation wins over the soft uncertainty of an adjective in its list ("no suspicious opacity")."""
    soft = False
    for j in range(i - 1, max(-1, i - 1 - _WINDOW), -1):
        k = kinds[j]
        if k == "affirm" and kinds[j + 1] in MENTIONS:  # an adjective: "no visible pneumothorax or effusion"
            continue
        if k in ("copula", "affirm", "negpost"):
            break
        if k in ("neg", "resolved"):
            return 0.0
        if k in ("unc", "uncneg", "uncpost", "versus"):  # "there is suspected X"
            return -1.0
        if k == "softunc":
            soft = True
        elif k == "uncweak":  # "no consolidation to suggest pneumonia": negated; "suggestive of pneumonia": uncertain
            return 0.0 if "neg" in kinds[max(0, j - _WINDOW):j] else -1.0
    return -1.0 if soft else None


_PREDICATE = {"copula", "affirm", "negpost", "resolved", "uncneg", "uncpost"}


def _predicate(kinds, i):
    """The index of the predicate of mention i when i heads a subject list ("X, Y and Z are ...", "X resolved",
    "X and Y within normal limits"), else None. A comma without "and"/"or" does not make a list ("effusion, lungs
    are clear"); a qualifier followed by a mention modifies that mention ("effusion and normal heart size")."""
    comma = conj = False
    for j in range(i + 1, min(len(kinds), i + 1 + _WINDOW)):
        k = kinds[j]
        if k in _PREDICATE or (k == "normal" and (j + 1 == len(kinds) or kinds[j + 1] == "comma")):
            return None if comma and not conj else j
        if k == "comma":
            comma = True
        elif k == "conj":
            conj = True
        elif k not in MENTIONS and k not in ("softunc", "normal", "abnormal", "borderline"):
            return None
    return None


def _post_cue(kinds, i):
    """Label from the predicate of a finding mention ("X and Y are not seen", "X has resolved", "X appears within
    normal limits", "X cannot be excluded", "X versus Y"): 0, -1 or None."""
    if i + 1 < len(kinds) and kinds[i + 1] == "versus":
        return -1.0
    j = _predicate(kinds, i)
    if j is None:
        return None
    if kinds[j] == "copula":  # the word after the verb decides: "is not seen", "appears normal", "may be present"
        j += 1
        while j < len(kinds) and kinds[j] == "copula":
            j += 1
        if j == len(kinds):
            return None
    k = kinds[j]
    if k in ("unc", "uncpost") and j + 1 < len(kinds) and kinds[j + 1] in MENTIONS:
        return None  # "the opacity is likely atelectasis" states the opacity
    return 0.0 if k in ("negpost", "resolved", "normal") else -1.0 if k in ("unc", "uncneg", "uncpost") else None


def _anatomy_label(kinds, i):
    """An anatomical mention: labelled by the first size qualifier after it (or the one right before it)."""
    q, unsure, seen_verb = None, False, False
    for j in range(i + 1, min(len(kinds), i + 1 + _WINDOW)):
        k = kinds[j]
        if k in ("normal", "abnormal", "borderline"):
            q = j
            break
        if k in MENTIONS and (seen_verb or (k[0] != "a" and kinds[j - 1] != "conj")):
            break  # the subject of another predicate, or a finding that is not in this subject list
        seen_verb |= k == "copula"
        unsure |= k == "unc"
    if q is None and unsure:  # "the heart is borderline in size"
        return -1.0
    if q is None:  # "normal heart size", "enlarged cardiac silhouette", "normal heart size and mediastinal contours"
        q = i - 1
        while q >= 0 and kinds[q] in ("a0", "a1", "conj", "comma"):
            q -= 1
        if q >= 0 and kinds[q] == "unc":  # "borderline heart size"
            return -1.0
        if q < 0 or kinds[q] not in ("normal", "abnormal", "borderline"):
            return None
        between, before = (), q
    else:
        between, before = kinds[i + 1:q], i
    if kinds[q] == "normal":
        return 0.0
    if "neg" in between or "negpost" in between:  # "the heart is not enlarged"
        return 0.0
    if "unc" in between:  # "the heart may be enlarged"
        return -1.0
    pre = _pre_cue(kinds, before)
    if pre is not None:
        return pre
    return -1.0 if kinds[q] == "borderline" else 1.0


def _label_clause(names, found):
    kinds = [_KIND.get(n, n) for n in names]
    for i, name in enumerate(names):
        if name not in MENTIONS:
            continue
        if name[0] == "a":
            label = _anatomy_label(kinds, i)
            if label is not None:
                found.setdefault(int(name[1:]), []).append(label)
            continue
        label = _post_cue(kinds, i)
        if label is None:
            label = _pre_cue(kinds, i)
        label = (-1.0 if name[0] == "u" else 1.0) if label is None else label
        obs = EDEMA if name == "hf" else int(name[1:])
        found.setdefault(obs, []).append(label)
        if name == "hf" and label != 0.0:
            found.setdefault(CARDIOMEGALY, []).append(-1.0)


def label_text(text: str) -> tuple:
    """The 14 CheXpert labels of one report, in CHEXPERT_LABELS order: 1.0, 0.0, -1.0 or None (blank).
    Aggregation (CheXpert): positive beats uncertain beats negative; No Finding is 1.0 when nothing but Support
    Devices is positive or uncertain (other findings such as emphysema included), blank otherwise."""
    found, clause = {}, []
    for m in EVENTS.finditer(str(text).lower()):
        name = m.lastgroup
        if name in ("stop", "term"):
            if clause:
                _label_clause(clause, found)
            clause = []
        elif name not in ("skip", "pseudo"):
            clause.append(name)
    if clause:
        _label_clause(clause, found)
    labels = [None] * 14
    for obs, values in found.items():
        if obs != OTHER:
            labels[obs] = 1.0 if 1.0 in values else -1.0 if -1.0 in values else 0.0
    if not any(1.0 in v or -1.0 in v for obs, v in found.items() if obs != SUPPORT_DEVICES):
        labels[NO_FINDING] = 1.0
    return tuple(labels)
