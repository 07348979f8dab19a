"""Upcycling a dense DiT into a Race-DiT (racedit.models.upcycle): exact with E = k, measured otherwise.

The dense model gets random weights everywhere (adaLN and final layer included: a freshly initialised DiT
outputs zeros, which would hide any difference).
"""

from __future__ import annotations

import math

import pytest
import torch

from racedit import interop as convert
from racedit.checkpoint import load_config_of, resolve_checkpoint, save_checkpoint
from racedit.cli import main
from racedit.config import load_config
from racedit.interop import ConversionError
from racedit.models import create_model
from racedit.models.records import ForwardRecord
from racedit.models.upcycle import UpcycleError

TINY = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=4, num_classes=10)


def random_dense(seed: int = 0, **kw):
    """A DiT-S/2-named 2 x 32 dense model with every weight random (1 / sqrt(fan_in) scale)."""
    torch.manual_seed(seed)
    model = create_model("DiT-S/2", **{**TINY, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]) if p.ndim > 1 else 0.1)
    return model.eval()


def batch(seed: int = 1, n: int = 4, channels: int = 4, size: int = 8, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g), torch.linspace(0, 999, n),
            torch.arange(n) % (classes + 1))


def copies_per_chunk(moe_model, x, t, y, train: bool) -> torch.Tensor:
    """(layers, N, k): how many copies of each chunk every token was routed to."""
    moe_model.train(train)
    record = ForwardRecord()
    with torch.no_grad():
        moe_model(x, t, y, record=record)
    moe_model.eval()
    out = []
    for i, block in enumerate(moe_model.blocks):
        E, k = block.mlp.num_experts, block.mlp.k
        out.append(record.moe[i].mask.reshape(-1, k, E // k).sum(-1))
    return torch.stack(out)


@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
def test_e_equals_k_gives_the_dense_output(gating):
    dense = random_dense()
    moe = convert.upcycle(dense, "RaceDiT-S/2-4in4", gating=gating)
    x, t, y = batch()
    with torch.no_grad():
        ref = dense(x, t, y)
        for train in (False, True):  # eval: threshold routing; train: the batch race (K = N k = all pairs)
            moe.train(train)
            torch.testing.assert_close(moe(x, t, y), ref, atol=1e-5, rtol=1e-5)
    moe.eval()
    assert copies_per_chunk(moe, x, t, y, train=False).eq(1).all()


def test_other_weights_are_copied_and_experts_are_chunks():
    dense = random_dense()
    moe = convert.upcycle(dense, "RaceDiT-S/2-2in8", noise_std=0.0)
    ds, ms = dense.state_dict(), moe.state_dict()
    for key, value in ds.items():
        if not (key.startswith("blocks.") and ".mlp." in key):
            assert torch.equal(ms[key], value), key
    m, h = 4, 64  # 8 experts from 2 chunks of the 128 hidden units
    fc1 = ds["blocks.1.mlp.fc1.weight"]
    for e in range(8):
        chunk = e // m
        assert torch.equal(ms["blocks.1.mlp.experts.w1"][e], fc1[chunk * h:(chunk + 1) * h].t())
        assert torch.allclose(ms["blocks.1.mlp.experts.b2"][e] * 2, ds["blocks.1.mlp.fc2.bias"])
    assert float(ms["blocks.0.mlp.tau"]) == 1.0 and bool(ms["blocks.0.mlp.threshold_initialized"])


@pytest.mark.parametrize("target, routing", [("RaceDiT-S/2-2in8", "expert_race"), ("RaceDiT-S/2-4in32", "expert_race"),
                                             ("RaceDiT-S/2-2in8", "token_choice")])
def test_general_case_gap_is_measured_and_bounded(target, routing):
    """m = E / k > 1: every token still gets exactly one copy of every chunk (train and eval routing). Without
    noise the gap is float rounding (~3e-7 relative measured); the default noise (0.01) gives ~1e-2."""
    dense = random_dense()
    x, t, y = batch(n=8)
    exact = convert.upcycle(dense, target, noise_std=0.0, routing=routing)
    for train in (False, True):
        assert copies_per_chunk(exact, x, t, y, train).eq(1).all()
        gap = convert.moe_dense_gap(dense, exact, x, t, y, train_mode=train)
        assert gap["relative"] < 1e-5 and gap["max_layer_relative"] < 1e-5, gap
    noisy = convert.upcycle(dense, target, noise_std=0.01, routing=routing)
    gap = convert.moe_dense_gap(dense, noisy, x, t, y)
    assert 1e-4 < gap["relative"] < 5e-2 and gap["max_layer_relative"] < 5e-2, gap
    assert torch.equal(exact.blocks[0].mlp.tau, noisy.blocks[0].mlp.tau)  # the probe left the thresholds alone


def test_bins_share_tokens_evenly_on_normalised_inputs():
    """The m copies of a chunk split N(0, 1)-like token inputs into m about equal parts."""
    dense = random_dense()
    moe = convert.upcycle(dense, "RaceDiT-S/2-4in32", noise_std=0.0)
    layer = moe.blocks[0].mlp
    u = torch.nn.functional.layer_norm(torch.randn(1, 4096, 32, generator=torch.Generator().manual_seed(0)), (32,))
    record = ForwardRecord()
    with torch.no_grad():
        layer(u, record)
    share = record.moe[0].mask.reshape(-1, 4, 8).float().mean(0)  # (chunk, copy): fraction of tokens
    assert torch.allclose(share.sum(-1), torch.ones(4))  # one copy per chunk per token
    assert share.min() > 0.5 / 8 and share.max() < 1.5 / 8, share


def test_upcycled_model_trains():
    """One backward pass in training mode: finite gradients reach the experts and the gating head."""
    moe = convert.upcycle(random_dense(), "RaceDiT-S/2-2in8")
    moe.train()
    x, t, y = batch()
    moe(x, t, y).square().mean().backward()
    mlp = moe.blocks[1].mlp
    for p in (mlp.experts.w1, mlp.experts.w2, mlp.router.gate_head.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # The trunk's free units start silent (zero gating-head columns), so they get gradient from the first
    # update of the gating head on; the ramps are flat inside the bins.
    assert torch.isfinite(mlp.router.trunk[0].weight.grad).all()


def test_bad_targets_are_named():
    dense = random_dense()
    with pytest.raises(UpcycleError, match=r"RaceDiT-B/2-2in8 is 12x768x12x2.*name RaceDiT-S/2-<k>in<E>"):
        convert.upcycle(dense, "RaceDiT-B/2-2in8")
    with pytest.raises(UpcycleError, match="E divisible by k"):
        convert.upcycle(dense, "RaceDiT-S/2-4in10")
    with pytest.raises(UpcycleError, match=r"fc1.weight \(128, 32\) cannot be split into k=3 experts of width 43"):
        convert.upcycle(dense, "RaceDiT-S/2-3in9")
    with pytest.raises(UpcycleError, match="is dense"):
        convert.upcycle(dense, "DiT-S/2")
    with pytest.raises(UpcycleError, match="starts from a dense model"):
        convert.upcycle(convert.upcycle(dense, "RaceDiT-S/2-2in4"), "RaceDiT-S/2-2in8")
    with pytest.raises(UpcycleError, match="trunk units"):  # 2 (E/k - 1) = 62 ramps > D = 32
        convert.upcycle(dense, "RaceDiT-S/2-1in32")
    with pytest.raises(UpcycleError, match="unknown model option"):
        convert.upcycle(dense, "RaceDiT-S/2-2in8", experts=8)


def test_upcycle_cli_then_sample(tmp_path):
    """A dense digits checkpoint -> `racedit convert upcycle` -> a MoE checkpoint that `racedit sample` samples."""
    from conftest import TINY as TINY_RUN

    cfg = load_config(None, [*TINY_RUN, f"train.out_dir={tmp_path / 'run'}"])
    dense = random_dense(**{**TINY, "in_channels": 1, "learn_sigma": False})
    state = dense.state_dict()
    save_checkpoint(tmp_path / "dense", 0, model_state=state, ema_state=state, train_state={"step": 0}, config=cfg)
    out = tmp_path / "race"
    assert main(["convert", "upcycle", "--ckpt", str(tmp_path / "dense"), "--to", "RaceDiT-S/2-2in8", "--out", str(out),
                 "--noise-std", "0", "--set", "model.gating=sigmoid"]) == 0
    saved = load_config_of(resolve_checkpoint(out)).model
    assert (saved.name, saved.moe_k, saved.moe_experts, saved.gating) == ("RaceDiT-S/2-2in8", 2, 8, "sigmoid")
    assert (saved.depth, saved.hidden_size) == (2, 32)
    assert main(["sample", "--ckpt", str(out), "--classes", "3", "--per-class", "2", "--steps", "2", "--sampler", "ddim",
                        "--out", str(tmp_path / "grid.png"), "--device", "cpu", "--quiet"]) == 0
    assert convert.parse_model_overrides(["model.routing=token_choice", "model.threshold_decay=0.9"]) == {
        "routing": "token_choice", "threshold_decay": 0.9}
    with pytest.raises(ConversionError, match="model.key=value"):
        convert.parse_model_overrides(["train.steps=3"])


def test_model_overrides_are_typed_and_checked_like_config_overrides():
    assert convert.parse_model_overrides(["model.memory_blocks=[1, 2]", "model.router_target_head=true"]) == {
        "memory_blocks": [1, 2], "router_target_head": True}
    with pytest.raises(ConversionError, match="'model.threshold_decay'.*not of type float"):
        convert.parse_model_overrides(["model.threshold_decay=fast"])
    with pytest.raises(ConversionError, match="'model.routing'.*Allowed"):  # a choice, checked before upcycling
        convert.parse_model_overrides(["model.routing=nearest"])
