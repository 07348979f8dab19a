"""Experiments that orchestrate training and evaluation: the ablation runner."""
