"""Evaluation: FID / IS / precision / recall, reference statistics, digits metrics, routing metrics, ablations.

Submodules are imported where used (some pull in heavy dependencies); for example
`from racedit.evaluation.digits import load_digits_classifier`.
"""
