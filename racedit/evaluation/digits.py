"""Digits metrics, the embedded default's quality scores: sample class accuracy from a small CNN classifier,
and the digits Fréchet distance (digits FD) on its features.

digits FD is the FID recipe with the digits classifier in place of Inception: the Fréchet distance between
Gaussians fitted to the classifier's penultimate features (`classifier_features`, 128-d) of generated
samples and of the held-out digits (the split training never sees). Like FID it is biased by the sample
counts (the held-out split has ~180 images), so `digits_fd_train_vs_holdout`, the same distance between the
training split and the held-out split, is reported beside it as the floor real digits reach.

Letters (docs/method/README.md): n_img images, R image side (any; the network resizes to the native 8x8),
F feature width.

`load_digits_classifier(R)` trains the classifier on the digits train split (fixed seeds, one CPU thread,
about 8 s of CPU time) the first time, checks that its held-out accuracy is at least `MIN_HOLDOUT_ACCURACY`, and caches
the weights as safetensors under `<cache>/digits_classifier_<hash>.safetensors`, where <hash> covers every
setting that changes the weights. <cache> is the `cache_dir` argument, else `$RACEDIT_CACHE`, else
`~/.cache/racedit`. The file is written to a temporary name and renamed into place, so a crash never leaves a
partial cache; a cache file that fails to load is reported with a warning and retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from racedit.config import Config
from racedit.data.digits import NATIVE_SIZE, NUM_CLASSES, DigitsDataset, resize_images
from racedit.data.factory import build_codec
from racedit.evaluation.metrics import frechet_distance, gaussian_statistics
from racedit.fileio import atomic_path
from racedit.sampling import sample_images

MIN_HOLDOUT_ACCURACY = 0.97
FEATURE_DIM = 128

# Everything that changes the trained weights; hashed into the cache file name. Bump "version" when the
# architecture or the training loop changes.
_RECIPE = {
    "version": 1,
    "arch": f"conv16-conv32-pool-fc{FEATURE_DIM}",
    "holdout_fraction": 0.1,
    "split_seed": 0,
    "seed": 0,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,  # peak of a one-cycle schedule (Adam)
    "label_smoothing": 0.1,  # held-out accuracy, mean of 9 runs at 30 epochs: 98.8% without, 99.4% with
    "augment": "shift1",  # random shifts by up to 1 pixel
    "threads": 1,
}


class DigitsClassifier(nn.Module):
    """Two 3x3 conv layers, a 2x2 max-pool and two linear layers, on 8x8 inputs.

    Inputs (n_img, 1, R, R) in [-1, 1] of any side R are first resized to 8x8 (bilinear, antialiased when
    shrinking), which approximately undoes the resize `DigitsDataset` applies; the classifier for side R is
    trained on the side-R data, so it has seen exactly that round trip.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)
        self.holdout_accuracy = float("nan")  # measured when trained; stored in the cache file's metadata

    @staticmethod
    def to_native(x: torch.Tensor) -> torch.Tensor:
        """(n_img, 1, R, R) -> (n_img, 1, 8, 8)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"digits classifier expects (n_img, 1, R, R) images, got {tuple(x.shape)}")
        return resize_images(x, NATIVE_SIZE)

    def native_features(self, x8: torch.Tensor) -> torch.Tensor:
        """(n_img, 1, 8, 8) -> penultimate features (n_img, F) (after ReLU)."""
        h = F.relu(self.conv1(x8))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (n_img, 32, 4, 4)
        return F.relu(self.fc(h.flatten(1)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n_img, 1, R, R) -> penultimate features (n_img, F)."""
        return self.native_features(self.to_native(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n_img, 1, R, R) -> class logits (n_img, 10)."""
        return self.head(self.features(x))


def _random_shift(x8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each (n_img, 1, 8, 8) image by -1, 0 or +1 pixels in each direction, filling with background (-1)."""
    n, _, s, _ = x8.shape
    padded = F.pad(x8, (1, 1, 1, 1), value=-1.0)  # (n_img, 1, 10, 10)
    dy, dx = torch.randint(0, 3, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(s)).unsqueeze(2)  # (n_img, 8, 1)
    cols = (dx + torch.arange(s)).unsqueeze(1)  # (n_img, 1, 8)
    return padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)


def _recipe(image_size: int) -> dict:
    return {**_RECIPE, "image_size": image_size}


def _cache_path(image_size: int, cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("RACEDIT_CACHE") or Path.home() / ".cache" / "racedit"
    key = hashlib.sha256(json.dumps(_recipe(image_size), sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"digits_classifier_{key}.safetensors"


@torch.no_grad()
def _accuracy_native(model: DigitsClassifier, x8: torch.Tensor, labels: torch.Tensor) -> float:
    return (model.head(model.native_features(x8)).argmax(1) == labels).float().mean().item()


def train_digits_classifier(image_size: int = NATIVE_SIZE, verbose: bool = True) -> DigitsClassifier:
    """Train on the digits train split at side `image_size` (bit-identical weights on every run on a
    given CPU); returns it in eval mode.

    Raises RuntimeError if the held-out accuracy is below `MIN_HOLDOUT_ACCURACY`. The caller's global RNG
    state is left untouched.
    """
    # One thread: the network is too small for threads to pay (on a busy 2-core machine they made training
    # ~10x slower), and a fixed thread count keeps the trained weights the same on every run.
    threads = torch.get_num_threads()
    torch.set_num_threads(_RECIPE["threads"])
    try:
        return _train(image_size, verbose)
    finally:
        torch.set_num_threads(threads)


def _train(image_size: int, verbose: bool) -> DigitsClassifier:
    r = _recipe(image_size)
    start, start_cpu = time.perf_counter(), time.process_time()
    train = DigitsDataset("train", image_size, r["holdout_fraction"], r["split_seed"])
    holdout = DigitsDataset("holdout", image_size, r["holdout_fraction"], r["split_seed"])
    # Resize once: the network only ever sees 8x8, and the shift augmentation works at that resolution.
    x_train, y_train = DigitsClassifier.to_native(train.images), train.labels
    x_hold, y_hold = DigitsClassifier.to_native(holdout.images), holdout.labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r["seed"])  # initial weights
        model = DigitsClassifier()
    gen = torch.Generator().manual_seed(r["seed"])  # batch order and augmentation
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    steps_per_epoch = -(-len(y_train) // r["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch)
    model.train()
    for _ in range(r["epochs"]):
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), r["batch_size"]):
            idx = order[i: i + r["batch_size"]]
            x = _random_shift(x_train[idx], gen)
            logits = model.head(model.native_features(x))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=r["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = _accuracy_native(model, x_hold, y_hold)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if verbose:
        print(f"digits classifier (image_size={image_size}): held-out accuracy {acc:.4f} "
              f"({len(y_hold)} images), trained in {seconds:.1f} s ({cpu_seconds:.1f} s CPU)")
    if acc < MIN_HOLDOUT_ACCURACY:
        hint = " (sides below 8 discard detail of the 8x8 originals)" if image_size < NATIVE_SIZE else ""
        raise RuntimeError(f"digits classifier held-out accuracy {acc:.4f} < {MIN_HOLDOUT_ACCURACY} "
                           f"at image_size={image_size}{hint}")
    model.holdout_accuracy = acc
    return model


def _save_atomic(model: DigitsClassifier, path: Path, image_size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"recipe": json.dumps(_recipe(image_size), sort_keys=True),
            "holdout_accuracy": f"{model.holdout_accuracy:.6f}"}
    with atomic_path(path) as tmp:  # readers see the old file or the whole new one
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # a shared RACEDIT_CACHE should be readable by others, whatever the umask


def _load(path: Path, image_size: int) -> DigitsClassifier:
    with safe_open(path, framework="pt") as f:  # raises on a truncated or corrupt file
        meta = f.metadata() or {}
    if meta.get("recipe") != json.dumps(_recipe(image_size), sort_keys=True):
        raise ValueError("the file was trained with another recipe")
    model = DigitsClassifier()
    model.load_state_dict(load_file(path), strict=True)  # raises on missing, extra or misshapen tensors
    model.holdout_accuracy = float(meta["holdout_accuracy"])
    return model.eval()


def load_digits_classifier(image_size: int = NATIVE_SIZE, cache_dir: str | os.PathLike | None = None,
                           verbose: bool = True) -> DigitsClassifier:
    """The trained digits classifier for images of side `image_size`, in eval mode on the CPU.

    Loads `<cache>/digits_classifier_<hash>.safetensors` (see the module docstring) when it exists and
    loads cleanly; otherwise trains (a few seconds), checks the held-out accuracy, and writes the cache.
    """
    path = _cache_path(image_size, cache_dir)
    if path.exists():
        try:
            return _load(path, image_size)
        except Exception as e:  # any failure to read means the cache is unusable; retraining is cheap
            warnings.warn(f"digits classifier cache {path} is unreadable ({type(e).__name__}: {e}); retraining",
                          stacklevel=2)
    model = train_digits_classifier(image_size, verbose=verbose)
    _save_atomic(model, path, image_size)
    return model


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def classifier_features(classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate features of images (n_img, 1, R, R) in [-1, 1] -> float32 (n_img, F) on the CPU.

    Images are clamped to [-1, 1] first, as samples would be when saved.
    """
    device = _device_of(classifier)
    out = [classifier.features(images[i: i + batch_size].to(device, torch.float32).clamp(-1, 1)).float().cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, classifier.head.in_features)


@torch.no_grad()
def sample_class_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor,
                          batch_size: int = 1024) -> float:
    """Fraction of images (n_img, 1, R, R) in [-1, 1] that the classifier assigns to their labels (n_img,).

    For class-conditional samples, `labels` are the classes they were conditioned on. Images are clamped
    to [-1, 1] first, as samples would be when saved.
    """
    labels = torch.as_tensor(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("sample_class_accuracy needs at least one image")
    device = _device_of(classifier)
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i: i + batch_size].to(device, torch.float32).clamp(-1, 1)
        pred = classifier(x).argmax(1).cpu()
        correct += (pred == labels[i: i + batch_size].cpu()).sum().item()
    return correct / len(images)


def digits_fd(classifier: DigitsClassifier, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between the classifier features of images (n_img, 1, R, R) and reference images
    (n_ref, 1, R, R), both in [-1, 1] (n_img, n_ref >= 2)."""
    mu1, sigma1 = gaussian_statistics(classifier_features(classifier, images))
    mu2, sigma2 = gaussian_statistics(classifier_features(classifier, reference))
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def heldout_digits(cfg: Config) -> DigitsDataset:
    """The held-out digits split of `cfg.data` (the same seeded split training leaves out)."""
    return DigitsDataset("holdout", image_size=cfg.data.image_size, holdout_fraction=cfg.data.holdout_fraction, seed=0)


def evaluate_digits_model(cfg: Config, model, objective, device) -> dict:
    """Sample `cfg.train.eval_samples_per_class` images per class with `cfg.sample`; classify and compare them.

    Returns {"sample_class_accuracy": fraction classified as the class they were conditioned on,
    "digits_fd": digits FD of the samples against the held-out split, "digits_fd_train_vs_holdout": the same
    distance for the real training split, "eval_samples", "eval_seconds"}.
    """
    n = cfg.train.eval_samples_per_class
    labels = torch.arange(model.num_classes).repeat_interleave(n)
    t0 = time.perf_counter()
    images = sample_images(model, objective, build_codec(cfg), labels, cfg.sample, seed=cfg.train.seed + 1,
                           batch_size=500)
    classifier = load_digits_classifier(cfg.data.image_size, verbose=False)
    acc = sample_class_accuracy(classifier, images, labels)
    holdout = heldout_digits(cfg).images
    train = DigitsDataset("train", image_size=cfg.data.image_size, holdout_fraction=cfg.data.holdout_fraction,
                          seed=0).images
    return {"sample_class_accuracy": float(acc), "digits_fd": digits_fd(classifier, images, holdout),
            "digits_fd_train_vs_holdout": digits_fd(classifier, train, holdout),
            "eval_samples": int(len(labels)), "eval_seconds": time.perf_counter() - t0}
