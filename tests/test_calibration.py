"""Recalibrating the inference threshold tau for a set of weights (docs/method/threshold.md): the value
against a naive sort of the training-rule scores, the realised experts per token, and the `racedit sample` /
routing report flags."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch

from racedit.checkpoint import save_checkpoint
from racedit.cli import main
from racedit.data import DigitsDataset
from racedit.data.factory import training_batches
from racedit.diffusion.objectives import DDPMObjective
from racedit.models import create_model
from racedit.models.moe import threshold_layers, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.models.routing_stats import experts_per_token
from racedit.sampling.calibration import calibrate_thresholds

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, learn_sigma=False)


def race_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = create_model("RaceDiT-S/2-2in8", **{**TINY, **kw})
    with torch.no_grad():  # open the adaLN gates so that block 1 sees block 0's routing
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.05)
    return model


def random_batches(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def naive_kth_scores(model, objective, batches, label_dropout: float, seed: int) -> dict[int, list[float]]:
    """Per threshold layer, the K-th largest score (K = B * L * k) of each batch, from sorting all B * L * E
    training-mode scores in float64; the draws replayed in calibrate_thresholds' documented order."""
    model = copy.deepcopy(model).train()
    # the generator seed: the CALIBRATION (= 6) child of SeedSequence(seed), numpy's own spawn tree
    child = np.random.SeedSequence(seed).spawn(7)[6]
    g = torch.Generator().manual_seed(int(child.generate_state(1, dtype=np.uint64)[0]))
    out: dict[int, list[float]] = {m.layer_index: [] for m in threshold_layers(model)}
    with torch.no_grad():
        for x0, y in batches:
            t = objective.sample_t(len(x0), torch.device("cpu"), g)
            noise = torch.randn(x0.shape, generator=g)
            drop = torch.rand(len(x0), generator=g) < label_dropout
            labels = torch.where(drop, torch.full_like(y, model.num_classes), y)
            record = ForwardRecord()
            model(objective.add_noise(x0, t, noise), objective.model_time(t), labels, record=record)
            for layer in threshold_layers(model):
                scores = record.moe[layer.layer_index].scores.double().flatten()
                k_total = scores.numel() // layer.num_experts * layer.k
                out[layer.layer_index].append(float(torch.sort(scores, descending=True).values[k_total - 1]))
    return out


def eval_experts_per_token(model, objective, batches, seed: int) -> float:
    """Mean experts per token over the threshold layers, eval mode, random timesteps."""
    g = torch.Generator().manual_seed(seed)
    counts = []
    with torch.no_grad():
        for x0, y in batches:
            t = objective.sample_t(len(x0), torch.device("cpu"), g)
            record = ForwardRecord()
            model.eval()(objective.add_noise(x0, t, torch.randn(x0.shape, generator=g)), objective.model_time(t), y,
                         record=record)
            counts += [float(experts_per_token(record.moe[m.layer_index].mask).mean()) for m in threshold_layers(model)]
    return float(np.mean(counts))


def test_calibrated_tau_is_the_mean_batch_kth_score_of_the_given_weights():
    model = race_model().eval()
    objective = DDPMObjective(1000)
    for m in threshold_layers(model):  # a stale threshold, as the EMA weights inherit from the live ones
        m.tau.fill_(3.0)
        m.threshold_initialized.fill_(True)
    params = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("tau", "threshold_initialized"))}
    batches = random_batches(3, 8, seed=1)
    cal = calibrate_thresholds(model, objective, batches, 3, label_dropout=0.25, seed=7)
    reference = naive_kth_scores(model, objective, batches, 0.25, seed=7)
    assert sorted(cal.tau_after) == sorted(reference) == [0, 1]
    for layer in threshold_layers(model):
        expected = np.mean(reference[layer.layer_index])
        assert float(layer.tau) == pytest.approx(expected, rel=1e-5)
        assert cal.tau_before[layer.layer_index] == 3.0 and bool(layer.threshold_initialized)
        assert layer.router.race_scope == "local"
    assert len(set(map(tuple, reference.values()))) == 2  # the layers really differ
    assert not model.training  # left in the mode it was in, with the weights untouched
    for k, v in model.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), k
    assert (cal.batches, cal.batch_size, cal.seed) == (3, 8, 7) and "3.0000 ->" in cal.summary()
    again = calibrate_thresholds(model, objective, batches, 3, label_dropout=0.25, seed=7)
    assert again.tau_after == cal.tau_after  # deterministic: only weights, batches and seed matter
    other = calibrate_thresholds(model, objective, batches, 3, label_dropout=0.25, seed=8)
    assert other.tau_after != cal.tau_after


def test_calibration_brings_the_realised_experts_per_token_back_to_k():
    objective = DDPMObjective(1000)
    live = race_model(seed=0).train()
    for x0, y in random_batches(20, 16, seed=2):  # tau tracks the live weights' K-th score
        record = ForwardRecord()
        live(objective.add_noise(x0, torch.randint(0, 1000, (16,)), torch.randn_like(x0)),
             torch.randint(0, 1000, (16,)).float(), y, record=record)
        update_thresholds(live, [record.kth_scores()])
    ema = race_model(seed=0)
    ema.load_state_dict(live.state_dict())
    with torch.no_grad():  # weights that score differently, sharing the live tau (the EMA situation)
        for layer in threshold_layers(ema):
            layer.router.gate_head.weight.mul_(1.6)
    held_out = random_batches(12, 16, seed=3)
    k = threshold_layers(ema)[0].k
    stale = eval_experts_per_token(ema, objective, held_out, seed=4)
    calibrate_thresholds(ema, objective, random_batches(12, 16, seed=5), 12, label_dropout=0.1, seed=6)
    fixed = eval_experts_per_token(ema, objective, held_out, seed=4)
    assert abs(stale - k) > 0.5  # the stale threshold is visibly off (the gate scales scores by 1.6)
    assert abs(fixed - k) < 0.25 * k and abs(fixed - k) < abs(stale - k) / 2


def test_calibration_refuses_models_without_a_threshold_and_short_data():
    objective = DDPMObjective(1000)
    dense = create_model("DiT-S/2", **TINY)
    with pytest.raises(ValueError, match="no MoE layer"):
        calibrate_thresholds(dense, objective, random_batches(1, 4, 0), 1, 0.1)
    topk = race_model(inference_routing="topk")
    with pytest.raises(ValueError, match="no MoE layer"):
        calibrate_thresholds(topk, objective, random_batches(1, 4, 0), 1, 0.1)
    with pytest.raises(ValueError, match="ran out before 3 batches"):
        calibrate_thresholds(race_model(), objective, random_batches(2, 4, 0), 3, 0.1)


def test_training_batches_read_the_configs_data(tiny_config):
    """The batches are rows of the digits the config names, read here from scikit-learn directly (pixels
    0..16 mapped to [-1, 1], with their labels): one epoch of them plus the configured hold-out split is
    exactly the whole data set, each row once; the next epoch reshuffles the same rows; the seed sets the order."""
    from sklearn.datasets import load_digits  # slow to import: only here

    def rows(x0, y):
        return Counter(zip((img.numpy().tobytes() for img in x0), y.tolist()))

    raw = load_digits()
    everything = rows(torch.from_numpy(raw.images).float().unsqueeze(1) / 8.0 - 1.0, torch.from_numpy(raw.target))
    hold = DigitsDataset("holdout", holdout_fraction=0.25)
    cfg = tiny_config("data.holdout_fraction=0.25")
    train_rows = len(raw.target) - round(0.25 * len(raw.target))  # 1348 = 4 batches of 337
    batches = training_batches(cfg, train_rows // 4, seed=0, device="cpu")
    epoch, second = Counter(), Counter()
    for i in range(8):
        x0, y = next(batches)
        assert x0.shape == (train_rows // 4, 1, 8, 8) and x0.dtype == torch.float32
        (epoch if i < 4 else second).update(rows(x0, y))
    assert epoch + rows(hold.images, hold.labels) == everything
    assert second == epoch
    first = next(training_batches(cfg, train_rows // 4, seed=0, device="cpu"))[0]
    other = next(training_batches(cfg, train_rows // 4, seed=1, device="cpu"))[0]
    assert not torch.equal(first, other)


@pytest.fixture
def race_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("model.name=RaceDiT-S/2-2in8", out_dir=tmp_path / "run")
    model = race_model()
    record = ForwardRecord()
    model.train()(torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)).float(), torch.arange(8), record=record)
    update_thresholds(model, [record.kth_scores()])  # sets tau
    state = model.state_dict()
    return save_checkpoint(tmp_path / "run" / "checkpoints", 3, model_state=state, ema_state=state,
                           train_state={"step": 3}, config=cfg)


def test_sample_py_recalibrates_and_records_it_in_the_npz(race_checkpoint, tmp_path, capsys):
    out = tmp_path / "s.npz"
    args = ["--ckpt", str(race_checkpoint), "--out", str(out), "--num-samples", "4", "--batch-size", "4",
            "--steps", "2", "--device", "cpu"]
    assert main(["sample", *args, "--calibrate-threshold", "2", "--calibration-batch", "8"]) == 0
    assert "tau recalibrated on 2 batches of 8" in capsys.readouterr().out
    with np.load(out) as z:
        meta = json.loads(str(z["metadata"]))
    assert meta["threshold"]["batches"] == 2 and sorted(meta["threshold"]["tau"]) == ["0", "1"]
    plain = tmp_path / "p.npz"
    assert main(["sample", *args[:3], str(plain), *args[4:]]) == 0
    with np.load(plain) as z:
        assert json.loads(str(z["metadata"]))["threshold"] == "from training"


def test_sample_py_calibration_error_for_a_dense_checkpoint(tiny_config, tmp_path, capsys):
    cfg = tiny_config(out_dir=tmp_path / "run")
    state = create_model(cfg.model).state_dict()
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints", 1, model_state=state, ema_state=state,
                           train_state={"step": 1}, config=cfg)
    rc = main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "g.png"), "--calibrate-threshold", "1",
                      "--device", "cpu"])
    assert rc == 2 and "no MoE layer" in capsys.readouterr().err


def test_a_resumed_npz_job_keeps_the_taus_it_started_with(race_checkpoint, tmp_path, monkeypatch, capsys):
    import racedit.sampling.generate as sampling

    out = tmp_path / "s.npz"
    base = ["--ckpt", str(race_checkpoint), "--out", str(out), "--num-samples", "8", "--batch-size", "4",
            "--steps", "2", "--device", "cpu", "--quiet", "--calibration-batch", "8"]
    args = [*base, "--calibrate-threshold", "2"]
    assert main(["sample", *args, "--max-batches", "1"]) == 0 and not out.exists()
    started = json.loads((tmp_path / "s.npz.parts" / "job.json").read_text())["metadata"]["threshold"]["tau"]

    real = sampling.calibrate_thresholds

    def last_bits_differ(model, *a, **k):  # what another GPU run of the same recalibration may give
        cal = real(model, *a, **k)
        for layer in threshold_layers(model):
            layer.tau.add_(1e-6)
        cal.tau_after = {i: v + 1e-6 for i, v in cal.tau_after.items()}
        return cal

    monkeypatch.setattr(sampling, "calibrate_thresholds", last_bits_differ)
    assert main(["sample", *args]) == 0 and out.exists()
    with np.load(out) as z:
        assert json.loads(str(z["metadata"]))["threshold"]["tau"] == started
    written = out.stat().st_mtime_ns
    assert main(["sample", *args]) == 0 and out.stat().st_mtime_ns == written  # recognised as done, not resampled
    # other calibration settings make another job: refused, naming the setting
    out.unlink()
    assert main(["sample", *args, "--max-batches", "1"]) == 0
    capsys.readouterr()
    assert main(["sample", *base, "--calibrate-threshold", "3"]) == 2
    assert "differs in: threshold" in capsys.readouterr().err


def test_a_finished_npz_of_another_job_lends_no_taus(race_checkpoint, tmp_path, monkeypatch):
    import racedit.sampling.generate as sampling

    out = tmp_path / "s.npz"
    base = ["--ckpt", str(race_checkpoint), "--out", str(out), "--num-samples", "4", "--batch-size", "4",
            "--steps", "2", "--device", "cpu", "--quiet", "--calibration-batch", "8", "--calibrate-threshold", "2"]
    assert main(["sample", *base]) == 0
    with np.load(out) as z:
        first = json.loads(str(z["metadata"]))["threshold"]["tau"]
    real = sampling.calibrate_thresholds

    def shifted(model, *a, **k):  # the live weights of another checkpoint: other taus
        cal = real(model, *a, **k)
        for layer in threshold_layers(model):
            layer.tau.add_(0.5)
        cal.tau_after = {i: v + 0.5 for i, v in cal.tau_after.items()}
        return cal

    monkeypatch.setattr(sampling, "calibrate_thresholds", shifted)
    assert main(["sample", *base, "--no-ema"]) == 2  # another job (live weights): the finished npz is kept
    assert main(["sample", *base, "--no-ema", "--overwrite"]) == 0  # unless --overwrite
    with np.load(out) as z:
        meta = json.loads(str(z["metadata"]))
    assert meta["weights"] == "model"
    assert meta["threshold"]["tau"] == {i: v + 0.5 for i, v in first.items()}
