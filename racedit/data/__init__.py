"""Data: the embedded digits dataset, the image <-> model-space codec, ImageNet folders and latent stores."""

from racedit.data.codec import Codec, IdentityCodec
from racedit.data.digits import DigitsDataset, digits_split_indices

__all__ = ["Codec", "DigitsDataset", "IdentityCodec", "digits_split_indices"]
