"""Rewards and metrics for chest X-ray reports: NLG metrics, the CheXpert-14 labeler, clinical F1, the text reward.

(Being built; see issue 3.)
"""
from nanovalor.nlg import clean_report  # noqa: F401  (the shared text normaliser, re-exported)

# The 14 CheXpert observations, in the order CheXpert, CheXbert and f1chexbert use (stanfordmlgroup/CheXbert
# src/constants.py). Label vectors throughout nanovalor follow this order.
CHEXPERT_LABELS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
# The five "competition" observations of CheXpert, used for F1-5.
COMPETITION_LABELS = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
