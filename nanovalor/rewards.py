"""Rewards and metrics for chest X-ray reports: NLG metrics, the CheXpert-14 labeler, clinical F1, the text reward.

(Being built; see issue 3.)
"""
from nanovalor.chexpert import CHEXPERT_LABELS, COMPETITION_LABELS, label_report, label_reports  # noqa: F401
from nanovalor.nlg import clean_report  # noqa: F401  (the shared text normaliser, re-exported)
