"""racedit: class-conditional Diffusion Transformers with Expert Race Mixture-of-Experts routing."""

__version__ = "0.1.0"
