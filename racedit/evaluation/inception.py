"""The Inception-v3 feature extractor of FID/IS/sFID: resolving and checking its weights file, loading
torch-fidelity's TF-compatible port, and extracting pool_3 features, bias-free logits and ADM's spatial
features in batches.

Letters (docs/method/README.md): n_img images, H_img x W_img image size, F feature width (2048 for pool_3).
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from racedit.evaluation.metrics import EvaluationError
from racedit.fileio import sha256_of

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # torch.hub convention: the leading hex digits of the file's SHA-256
FID_FEATURE = "2048"  # pool_3
IS_FEATURE = "logits_unbiased"  # pool_3 x fc weight, no bias (as ADM)
SFID_FEATURE = "spatial"  # ADM's mixed_6/conv:0, first 7 channels (a forward hook; not a torch-fidelity feature)
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # TF's mixed_6/conv: the 1x1 branch of the fourth 17x17 block
SPATIAL_CHANNELS = 7
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torch.hub names: <stem>-<sha256 prefix>.<ext>

class InceptionWeightsError(EvaluationError):
    """An Inception weights file that is missing, unreadable, or whose hash does not match its name."""

# ------------------------------------------------------------------------------------------------ weights


@dataclass
class InceptionWeights:
    """A resolved Inception weights file and what is known about it."""

    path: Path
    sha256: str
    source: str  # "default" (torch-fidelity's file in the torch hub cache) or "path"
    verified: bool  # the SHA-256 starts with the prefix its name (or torch-fidelity's file) promises
    expected_prefix: str | None  # the hash prefix that was checked, if any

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "source": self.source,
                "verified": self.verified, "expected_sha256_prefix": self.expected_prefix,
                "is_torch_fidelity_weights": self.sha256.startswith(INCEPTION_SHA256_PREFIX)}


def default_inception_path() -> Path:
    """Where torch-fidelity's default download lives (the torch hub cache; `$TORCH_HOME` moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_inception_weights(path: str | Path | None = None, download: bool = True) -> InceptionWeights:
    """The Inception weights to use: `path`, or torch-fidelity's file (downloaded into the hub cache if absent).

    The SHA-256 prefix is checked when the file name carries one (torch.hub's `<stem>-<hex>.<ext>`) and always
    for the default file; a mismatch raises InceptionWeightsError. A file without a hash in its name is
    accepted; if it is not torch-fidelity's file (SHA-256 prefix 6726825d) a warning says its numbers are not
    comparable with published ones.
    """
    if path is None:
        p = default_inception_path()
        if not p.exists():
            if not download:
                raise InceptionWeightsError(f"Inception weights not found at {p}; pass --inception-weights PATH")
            p.parent.mkdir(parents=True, exist_ok=True)
            print(f"downloading torch-fidelity's Inception weights to {p}", file=sys.stderr)
            try:
                torch.hub.download_url_to_file(INCEPTION_URL, str(p), hash_prefix=INCEPTION_SHA256_PREFIX)
            except Exception as e:  # URLError, timeouts, and the hash check of the download
                raise InceptionWeightsError(
                    f"could not download the Inception weights from {INCEPTION_URL} ({type(e).__name__}: {e}). "
                    f"On an offline machine copy that file from elsewhere and pass --inception-weights PATH"
                ) from e
        source, expected = "default", INCEPTION_SHA256_PREFIX
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights file not found: {p}")
        m = _HASH_IN_NAME.search(p.name)
        source, expected = "path", (m.group(1) if m else None)
    digest = sha256_of(p)
    if expected is not None and not digest.startswith(expected):
        raise InceptionWeightsError(
            f"Inception weights {p}: SHA-256 {digest[:16]}... does not start with {expected}, the hash its name "
            f"promises. The file is damaged or not the file its name says; delete it and fetch it again "
            f"({INCEPTION_URL})"
        )
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        warnings.warn(f"Inception weights {p} (SHA-256 {digest[:16]}...) are not torch-fidelity's weights "
                      f"(SHA-256 {INCEPTION_SHA256_PREFIX}...): the numbers are not comparable with published ones",
                      stacklevel=2)
    return InceptionWeights(p, digest, source, expected is not None, expected)


def load_inception(weights: InceptionWeights, device: str | torch.device = "cpu"):
    """torch-fidelity's FeatureExtractorInceptionV3 with `weights`, producing pool_3 and the bias-free logits."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:  # a weights-only load first: it runs no code from the file (torch-fidelity's own load does not check)
        state = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InceptionWeightsError(f"cannot read Inception weights {weights.path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{weights.path} is not a state dict of tensors")
    del state
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [FID_FEATURE, IS_FEATURE],
                                                feature_extractor_weights_path=str(weights.path))
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise InceptionWeightsError(f"{weights.path} does not fit torch-fidelity's Inception-v3: {e}") from e
    return extractor.to(device).eval()


# ----------------------------------------------------------------------------------------------- features


@contextlib.contextmanager
def _no_tf32():
    """Full fp32 convolutions and matmuls (TF32 moves FID slightly); restores the previous settings."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def extract_features(extractor, images, batch_size: int = 100, limit: int | None = None,
                     progress: bool = True, desc: str = "inception") -> dict[str, torch.Tensor]:
    """{"2048": pool_3 features (n_img, 2048), "logits_unbiased": (n_img, 1008), "spatial": sFID features
    (n_img, 7 * 17 * 17) at the standard 299 px input (the 17 x 17 Mixed_6d grid)} in float32 on the CPU.
    `images`: anything with len() and `batches(batch_size, limit)` yielding uint8 (B, H_img, W_img, 3) arrays (`racedit.npz.NpzImages`,
    `racedit.evaluation.fid.FolderImages`)."""
    from tqdm.auto import tqdm

    device = next(extractor.parameters()).device
    n = len(images) if limit is None else min(limit, len(images))
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in [*extractor.features_list, SFID_FEATURE]}

    def keep_spatial(module, inputs, output):  # (B, 192, h, w) -> (B, h * w * 7) in TF's NHWC order
        spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        outs[SFID_FEATURE].append(spatial.reshape(len(output), -1).float().cpu())

    hook = extractor.get_submodule(SPATIAL_MODULE).register_forward_hook(keep_spatial)
    try:
        with _no_tf32(), tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
            for batch in images.batches(batch_size, limit=n):
                x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                feats = extractor(x.to(device))
                for name, f in zip(extractor.features_list, feats):
                    outs[name].append(f.float().cpu())
                bar.update(len(batch))
    finally:
        hook.remove()
    result = {name: torch.cat(v) for name, v in outs.items()}
    bad = (~torch.isfinite(result[FID_FEATURE])).any(1).sum().item()
    if bad:
        raise EvaluationError(f"{bad} images gave non-finite Inception features")
    return result


