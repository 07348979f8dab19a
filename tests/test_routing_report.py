"""`racedit routing-report` on a tiny Expert Race checkpoint: every figure written, every file a valid PNG."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from racedit.checkpoint import save_checkpoint
from racedit.cli import main
from racedit.diffusion.objectives import DDPMObjective
from racedit.evaluation.routing_report import FIGURES, REPORT_JOB, SUMMARY, collect_routing_stats
from racedit.models import create_model
from racedit.models.moe import update_thresholds
from racedit.models.records import ForwardRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("model.name=RaceDiT-S/2-2in8", out_dir=tmp_path / "run")
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    with torch.no_grad():  # open the adaLN gates so the branch norms are not all zero
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.05)
    # one training-mode forward's K-th scores set the inference thresholds
    record = ForwardRecord()
    model(torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)).float(), torch.arange(8), record=record)
    update_thresholds(model, [record.kth_scores()])
    state = model.state_dict()
    return save_checkpoint(tmp_path / "run" / "checkpoints", 3, model_state=state, ema_state=state,
                           train_state={"step": 3}, config=cfg)


def test_routing_report_writes_every_figure_as_a_valid_png(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["routing-report", "--ckpt", str(tiny_checkpoint), "--out", str(out), "--timesteps", "4",
                 "--per-class", "2", "--batch-size", "8", "--no-ema", "--device", "cpu", "--quiet"]) == 0
    assert "6 figures" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([*FIGURES.values(), SUMMARY, REPORT_JOB])
    for name in FIGURES.values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    summary = (out / SUMMARY).read_text()
    for name in FIGURES.values():
        assert f"]({name})" in summary
    assert "| block | tau |" in summary and "RaceDiT-S/2-2in8" in summary and "step 3" in summary
    assert "(model weights, step 3)" in summary  # --no-ema: the live weights
    # the tau column is the checkpoint's stored threshold of each block (model and EMA states are equal here)
    stored = load_file(tiny_checkpoint / "ema.safetensors")
    for block in range(2):
        assert f"\n| {block} | {stored[f'blocks.{block}.mlp.tau'].item():.3f} |" in summary, block


def test_report_statistics_shapes_and_dense_models_are_refused():
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2, learn_sigma=False)
    model = create_model("RaceDiT-S/2-2in8", **kw)
    record = ForwardRecord()
    model.train()(torch.randn(4, 1, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.arange(4), record=record)
    update_thresholds(model, [record.kth_scores()])  # sets tau
    objective = DDPMObjective(1000)
    x0, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    stats = collect_routing_stats(model, objective, x0, labels, num_timesteps=3, batch_size=4)
    assert stats.counts.shape == (3, 2, 6, 16) and stats.load.shape == (2, 8) and stats.co.shape == (2, 8, 8)
    assert stats.norms.shape == (3, 2, 2) and stats.timesteps.tolist() == [167, 500, 833]
    # the load and the co-activation diagonal are the same counts, and they add up to the per-token counts
    assert (stats.co[:, range(8), range(8)] == stats.load).all()
    assert stats.load.sum(1).tolist() == stats.counts.sum(axis=(0, 2, 3)).tolist()
    with pytest.raises(ValueError, match="no MoE layer"):
        collect_routing_stats(create_model("DiT-S/2", **kw), objective, x0, labels, num_timesteps=1)
