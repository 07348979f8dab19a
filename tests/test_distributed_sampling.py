"""Sampling an FID batch: labels, per-sample noise, resumable chunks, and 2 CPU processes under accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from racedit.checkpoint import save_checkpoint
from racedit.models import create_model
from racedit.sampling import (
    SamplingError,
    load_for_sampling,
    sample_labels,
    sample_seed,
    write_samples_npz,
)

ROOT = Path(__file__).resolve().parents[1]
SEED, PER_CLASS, BATCH = 3, 2, 3  # 20 samples in 7 batches of 3 (the last one holds 2)


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path):
    """A checkpoint of the tiny digits DiT with perturbed weights (so its output depends on its input),
    sampled with ddpm (step noise) and CFG 2.0."""
    cfg = tiny_config("sample.sampler=ddpm", "sample.steps=3", "sample.cfg_scale=2.0")
    torch.manual_seed(0)
    model = create_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    return save_checkpoint(tmp_path / "run" / "checkpoints", 5, model_state=state, ema_state=state,
                           train_state={"step": 5}, config=cfg)


def test_labels_and_sample_seeds():
    uniform = sample_labels(1000, 10, seed=0)
    assert uniform.shape == (1000,) and uniform.min() >= 0 and uniform.max() <= 9
    assert torch.equal(uniform, sample_labels(1000, 10, seed=0)) and not torch.equal(uniform, sample_labels(1000, 10, 1))
    balanced = sample_labels(None, 10, seed=0, per_class=5)
    assert torch.equal(torch.bincount(balanced), torch.full((10,), 5))
    assert not torch.equal(balanced, balanced.sort().values)  # shuffled: every IS split sees every class
    with pytest.raises(ValueError, match="per class"):
        sample_labels(49, 10, per_class=5)
    seeds = {sample_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000


def test_two_processes_resume_and_match_a_single_process_run(tiny_checkpoint, tmp_path):
    loaded = load_for_sampling(tiny_checkpoint)
    scfg = loaded.config.sample
    labels = sample_labels(None, 10, SEED, PER_CLASS)
    out = tmp_path / "samples.npz"
    parts = out.with_name(out.name + ".parts")

    # 1. an interrupted run (1 process, stops after 2 batches) leaves batches 0 and 1 and no npz
    assert write_samples_npz(loaded, None, out, scfg, seed=SEED, batch_size=BATCH, per_class=PER_CLASS,
                             max_batches=2, progress=False) is None
    assert not out.exists() and sorted(p.name for p in parts.glob("batch_*")) == [
        "batch_0000000.npz", "batch_0000001.npz"]
    (parts / ".batch_0000002.999.tmp").write_bytes(b"a crash mid-write")  # must be ignored
    with pytest.raises(SamplingError, match="differs in: seed"):  # other settings never mix with these parts
        write_samples_npz(loaded, None, out, scfg, seed=SEED + 1, batch_size=BATCH, per_class=PER_CLASS,
                          progress=False)

    # 2. resumed by 2 CPU processes under `accelerate launch -m racedit sample` (the form the README shows)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # Retry only on transient rendezvous failures (port taken meanwhile; gloo's TCP store reset under heavy
    # load). A retry is itself a resume, so it does not weaken what the test checks.
    transient = ("address already in use", "connection reset", "connection refused")
    for _attempt in range(3):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "racedit", "sample", "--ckpt", str(tiny_checkpoint),
               "--per-class", str(PER_CLASS), "--seed", str(SEED), "--batch-size", str(BATCH), "--out", str(out),
               "--device", "cpu", "--quiet"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode == 0 or not any(m in run.stderr.lower() for m in transient):
            break
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert out.exists() and not parts.exists()

    with np.load(out, allow_pickle=False) as z:
        images, got_labels, meta = z["arr_0"], z["labels"], json.loads(str(z["metadata"]))
    n = PER_CLASS * 10
    assert images.shape == (n, 8, 8, 3) and images.dtype == np.uint8
    assert np.array_equal(got_labels, labels.numpy()) and np.array_equal(np.bincount(got_labels), [PER_CLASS] * 10)
    assert len(np.unique(images.reshape(n, -1), axis=0)) == n  # every sample distinct: no index sampled twice
    for key, value in {"checkpoint": str(tiny_checkpoint), "step": 5, "weights": "ema", "sampler": "ddpm",
                       "steps": 3, "cfg_scale": 2.0, "guidance_channels": "all", "per_device_batch": BATCH,
                       "inference_routing": "dense", "seed": SEED, "num_samples": n}.items():
        assert meta[key] == value, key

    # 3. the same job in one uninterrupted process writes the same file, byte for byte
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    single = tmp_path / "single.npz"
    try:
        assert write_samples_npz(loaded, None, single, scfg, seed=SEED, batch_size=BATCH, per_class=PER_CLASS,
                                 progress=False) == single
    finally:
        torch.set_num_threads(threads)
    assert single.read_bytes() == out.read_bytes()
    # a re-run of a finished job does nothing
    mtime = single.stat().st_mtime_ns
    assert write_samples_npz(loaded, None, single, scfg, seed=SEED, batch_size=BATCH, per_class=PER_CLASS,
                             progress=False) == single
    assert single.stat().st_mtime_ns == mtime


def test_a_sample_does_not_depend_on_its_batch(tiny_checkpoint):
    from racedit.sampling import sample_indexed, to_uint8_nhwc

    loaded = load_for_sampling(tiny_checkpoint)
    labels = torch.tensor([1, 7, 7, 2])
    idx = torch.tensor([10, 11, 12, 13])
    together = sample_indexed(loaded.model, loaded.objective, loaded.codec, labels, idx, loaded.config.sample, SEED)
    alone = sample_indexed(loaded.model, loaded.objective, loaded.codec, labels[2:], idx[2:], loaded.config.sample,
                           SEED)
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(together[1], together[2])  # same label, different index: different noise
    other_seed = sample_indexed(loaded.model, loaded.objective, loaded.codec, labels[:1], idx[:1],
                                loaded.config.sample, SEED + 1)
    assert np.abs(to_uint8_nhwc(other_seed).astype(int) - to_uint8_nhwc(together[:1]).astype(int)).max() > 0
