"""The phantom world's report writer: findings -> a findings-style report and the CheXpert-14 labels it states.

Reports are written from many phrasings per finding (PHRASES), in varied order, with pertinent negatives,
laterality, severity and normal-limits sentences, in the style of real findings sections; every sentence carries the
labels a CheXpert-style labeler reads from it, and aggregate_labels applies CheXpert's rules. phantoms.py draws the
findings and the images; tests: `python -m pytest -q tests/test_phantoms.py`.
"""
from nanovalor.chexpert import CHEXPERT_LABELS

# ----------------------------------------------------------------------------------------------------------------
# reports. PHRASES lines: "bank [labels]: sentence | sentence ..." (an indented line continues the one above). The
# labels are what a CheXpert-style labeler reads from each of those sentences: observations, positive unless marked
# "?" (uncertain) or "-" (negative). Banks "no X Y" hold pertinent negatives and normal-limits sentences, true when
# the findings X and Y are absent.

PHRASES = """
cardiomegaly [Cardiomegaly]: {grade} cardiomegaly. | There is {grade} cardiomegaly. | The heart is {adverb} enlarged.
    Heart size is {adverb} enlarged. | The cardiac silhouette is {adverb} enlarged.
    {grade} enlargement of the cardiac silhouette.
mediastinum [Enlarged Cardiomediastinum]: The mediastinum is widened. | Widening of the mediastinum.
    The superior mediastinum is widened. | Widened mediastinal contours. | The mediastinal silhouette is widened.
effusion [Pleural Effusion]: {size} {side} pleural effusion. | There is a {size} {side} pleural effusion.
    A {size} {side} pleural effusion is present. | {size} {side}-sided pleural effusion.
    {size} {side} effusion with blunting of the costophrenic angle.
    There is a {size} layering {side} pleural effusion.
bilateral effusion [Pleural Effusion]: {size} bilateral pleural effusions. | {size} pleural effusions bilaterally.
    There are {size} bilateral pleural effusions. | Bilateral {size} pleural effusions are present.
    {size} right and left pleural effusions.
pneumothorax [Pneumothorax]: {size} {side} pneumothorax. | There is a {size} {side} pneumothorax.
    A {size} {side}-sided pneumothorax is present. | {side} pneumothorax, {size} in size.
    A {size} pneumothorax is seen on the {side}.
small pneumothorax [Pneumothorax]: Small {side} apical pneumothorax.
consolidation [Consolidation]: Focal consolidation in the {lobe}. | There is {lobe} consolidation.
    {lobe} airspace consolidation.
consolidation [Lung Opacity]: Airspace opacity in the {lobe}. | There is a patchy opacity in the {lobe}.
consolidation [Consolidation, Pneumonia?]: {lobe} consolidation, concerning for pneumonia.
consolidation [Lung Opacity, Pneumonia?]: {lobe} opacity, suspicious for pneumonia.
consolidation [Consolidation, Pneumonia]: Consolidation in the {lobe} consistent with pneumonia.
consolidation [Pneumonia]: {lobe} pneumonia.
edema [Edema]: {grade} pulmonary edema. | There is {grade} pulmonary edema. | {grade} interstitial pulmonary edema.
    Findings are consistent with {grade} pulmonary edema.
    {grade} pulmonary vascular congestion and interstitial edema.
edema [Lung Opacity, Edema]: Bilateral perihilar opacities consistent with {grade} pulmonary edema.
atelectasis [Atelectasis]: {side} basilar atelectasis. | Linear atelectasis at the {side} lung base.
    Subsegmental atelectasis in the {side} lower lobe. | There is mild {side} basilar atelectasis.
    Discoid atelectasis at the {side} base.
atelectasis [Lung Opacity, Atelectasis]: Streaky {side} basilar opacity consistent with atelectasis.
bilateral atelectasis [Atelectasis]: Bibasilar atelectasis. | Mild bibasilar atelectasis.
    Linear atelectasis at both lung bases. | There is bibasilar subsegmental atelectasis.
bilateral atelectasis [Lung Opacity, Atelectasis]: Streaky bibasilar opacities consistent with atelectasis.
nodule [Lung Lesion]: A {cm} cm nodule in the {lobe}. | There is a {cm} cm pulmonary nodule in the {lobe}.
    {cm} cm {lobe} nodule. | A well-circumscribed {cm} cm nodule projects over the {lobe}.
    Rounded {cm} cm nodule in the {lobe}.
mass [Lung Lesion]: A {cm} cm mass in the {lobe}. | There is a {cm} cm {lobe} mass. | {lobe} mass measuring {cm} cm.
    Large {cm} cm mass in the {lobe}, concerning for malignancy. | A lobulated {cm} cm mass is seen in the {lobe}.
fracture [Fracture]: {side} {rib} rib fracture. | Acute fracture of the {side} {rib} rib.
    There is a displaced fracture of the {side} {rib} posterior rib. | A fracture of the {side} {rib} rib is noted.
    Displaced {side} {rib} rib fracture.
endotracheal tube [Support Devices]: Endotracheal tube terminates 4.5 cm above the carina.
    An endotracheal tube is in place with the tip 4.5 cm above the carina. | ET tube tip is 4.5 cm above the carina.
    Endotracheal tube in standard position.
enteric tube [Support Devices]: Enteric tube courses below the diaphragm with the tip in the stomach.
    A nasogastric tube extends into the stomach. | Nasogastric tube tip is in the stomach.
    An orogastric tube is seen coursing into the stomach.
central venous catheter [Support Devices]: Right internal jugular central venous catheter terminates in the SVC.
    Right internal jugular catheter tip in the superior vena cava.
    A right internal jugular central line ends in the superior vena cava.
    Right-sided central venous catheter with its tip in the SVC.
pacemaker [Support Devices]: Left chest wall pacemaker with leads in the right atrium and right ventricle.
    A left-sided pacemaker is present with leads terminating in the right ventricle.
    Dual-lead pacemaker overlies the left chest. | Cardiac pacemaker in place with intact leads.
no cardiomegaly [Cardiomegaly-]: Heart size is normal. | The heart is normal in size. | Normal heart size.
    Heart size is within normal limits. | The cardiac silhouette is normal in size.
no mediastinum [Enlarged Cardiomediastinum-]: The mediastinal contours are normal. | The mediastinum is unremarkable.
    Mediastinal contours are within normal limits.
no mediastinum []: The hila are unremarkable.
no cardiomegaly mediastinum [Enlarged Cardiomediastinum-]: The cardiomediastinal silhouette is within normal limits.
    Normal cardiomediastinal silhouette.
no cardiomegaly mediastinum [Cardiomegaly-, Enlarged Cardiomediastinum-]: Normal heart size and mediastinal contours.
    Heart size and mediastinal contours are normal.
no consolidation edema atelectasis nodule pneumothorax []: The lungs are clear. | Lungs are clear bilaterally.
    The lungs are well expanded and clear.
no consolidation edema atelectasis nodule pneumothorax [Lung Opacity-]: No focal airspace disease.
no consolidation [Consolidation-]: No focal consolidation. | There is no focal consolidation.
    No focal airspace consolidation.
no edema [Edema-]: No pulmonary edema. | There is no pulmonary edema. | No evidence of pulmonary edema.
no effusion [Pleural Effusion-]: No pleural effusion. | There is no pleural effusion. | No pleural effusions.
no pneumothorax [Pneumothorax-]: No pneumothorax. | There is no pneumothorax. | No evidence of pneumothorax.
no effusion pneumothorax [Pleural Effusion-, Pneumothorax-]: No pleural effusion or pneumothorax.
    No pneumothorax or pleural effusion. | There is no pleural effusion or pneumothorax.
    There is no effusion or pneumothorax.
no consolidation effusion pneumothorax [Consolidation-, Pleural Effusion-, Pneumothorax-]:
    No focal consolidation, pleural effusion, or pneumothorax.
    No focal consolidation, effusion, or pneumothorax is seen.
no fracture []: No acute osseous abnormality. | The osseous structures are intact.
    Visualized osseous structures are unremarkable.
no fracture [Fracture-]: No displaced rib fracture. | No fracture is identified.
"""
TOPIC = {"cardiomegaly": "heart", "mediastinum": "heart", "consolidation": "lungs", "edema": "lungs",
         "atelectasis": "lungs", "nodule": "lungs", "effusion": "pleura", "pneumothorax": "pleura",
         "fracture": "bones", "devices": "devices"}
ORDERS = (("devices", "heart", "lungs", "pleura", "bones"), ("devices", "lungs", "pleura", "heart", "bones"),
          ("heart", "lungs", "pleura", "bones", "devices"), ("lungs", "pleura", "heart", "devices", "bones"))
INTROS = ("PA view of the chest.", "Frontal view of the chest.", "Single frontal radiograph of the chest.")
CLOSINGS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
            "No acute intrathoracic process.")


def _phrase_banks(text):
    banks = {}
    for line in text.strip().splitlines():
        if not line.startswith(" "):  # else: more sentences of the bank and labels above
            head, line = line.split("]:")
            bank, labels = head.split(" [")
            parsed = {}
            for name in filter(None, (name.strip() for name in labels.split(","))):
                assert name.rstrip("?-") in CHEXPERT_LABELS, f"PHRASES: unknown observation {name!r} in {head!r}"
                parsed[name.rstrip("?-")] = -1 if name.endswith("?") else 0 if name.endswith("-") else 1
        sentences = [sentence.strip() for sentence in line.split(" | ") if sentence.strip()]
        banks.setdefault(bank, []).extend((sentence, parsed) for sentence in sentences)
    return banks


BANKS = _phrase_banks(PHRASES)
NEGATIVE_BANKS = sorted((b for b in BANKS if b.startswith("no ")), key=lambda b: (-len(b.split()), b))  # larger first


def write_report(findings: dict, rng) -> tuple[str, tuple]:
    """(report text, its 14 labels): 1.0 / 0.0 / -1.0 / None (unmentioned), as the sentences state them."""
    def choose(bank):
        return BANKS[bank][rng.integers(len(BANKS[bank]))]

    chosen = []  # (topic, sentence, labels)
    for name, p in findings.items():
        if name == "devices":
            chosen += [("devices", *choose(device)) for device in p]
            continue
        bank = p["kind"] if name == "nodule" else name
        bank = f"bilateral {bank}" if p.get("side") == "bilateral" else bank
        if name == "pneumothorax" and p["size"] == "small" and rng.random() < 0.2:
            bank = "small pneumothorax"  # only a small one is purely apical
        sentence, labels = choose(bank)
        fields = dict(p, adverb={"mild": "mildly", "moderate": "moderately", "severe": "markedly"}.get(p.get("grade")),
                      rib={4: "4th", 5: "5th", 6: "6th", 7: "7th", 8: "8th", 9: "9th"}.get(p.get("rib")))
        chosen.append((TOPIC[name], sentence.format(**fields), labels))
    stated = set()  # pertinent negatives: each absent finding at most once, larger groups first
    for bank in NEGATIVE_BANKS:
        absent = bank.split()[1:]
        if stated.isdisjoint(absent) and not any(a in findings for a in absent) and rng.random() < 0.55:
            stated.update(absent)
            chosen.append(("lungs" if "consolidation" in absent else TOPIC[absent[0]], *choose(bank)))
    order = ORDERS[rng.integers(len(ORDERS))]
    rng.shuffle(chosen)  # varied order within a topic
    chosen.sort(key=lambda item: order.index(item[0]))
    sentences = [sentence[0].upper() + sentence[1:] for _, sentence, _ in chosen]
    labels = aggregate_labels([labels for _, _, labels in chosen])
    if labels[-1] == 1.0 and rng.random() < 0.3:
        sentences.append(CLOSINGS[rng.integers(len(CLOSINGS))])
    if rng.random() < 0.3:
        sentences.insert(0, INTROS[rng.integers(len(INTROS))])
    if not sentences:  # a normal study whose every optional sentence was left out (1 in ~40,000): say it is normal
        sentences.append(CLOSINGS[rng.integers(len(CLOSINGS))])
    return " ".join(sentences), labels


def aggregate_labels(sentence_labels: list[dict]) -> tuple:
    """CheXpert's aggregation (chexpert-labeler stages/aggregate.py): positive beats uncertain beats negative;
    No Finding is 1 when nothing but Support Devices is positive or uncertain, else unmentioned."""
    values = {}
    for labels in sentence_labels:
        for name, value in labels.items():
            values.setdefault(name, set()).add(value)
    out = [None if name not in values else 1.0 if 1 in values[name] else -1.0 if -1 in values[name] else 0.0
           for name in CHEXPERT_LABELS[:-1]]
    finding = any(v in (1.0, -1.0) for name, v in zip(CHEXPERT_LABELS, out) if name != "Support Devices")
    return tuple(out) + (None if finding else 1.0,)
