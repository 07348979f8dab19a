"""Hyper- and frac-connections: equivalence to the residual DiT at init, parameter overheads, training."""

import csv

import pytest
import torch
from conftest import make_tiny_config

from racedit.models import count_params, create_model
from racedit.training.loop import param_groups, train

TINY = dict(input_size=8, in_channels=1, num_classes=10, depth=3, hidden_size=32, num_heads=2, learn_sigma=True)
VARIANTS = [
    ("hyper", dict(connections_n=1)),
    ("hyper", dict(connections_n=2)),
    ("hyper", dict(connections_n=4)),
    ("hyper", dict(connections_n=1, connections_dynamic=True)),
    ("hyper", dict(connections_n=2, connections_dynamic=True)),
    ("hyper", dict(connections_n=4, connections_dynamic=True, connections_tanh=False)),
    ("frac", dict(connections_m=1)),
    ("frac", dict(connections_m=2)),
    ("frac", dict(connections_m=4)),
    ("frac", dict(connections_m=2, connections_dynamic=True)),
    ("frac", dict(connections_m=4, connections_dynamic=True)),
]


def _residual_model(random_gates: bool, name: str = "DiT-S/2"):
    torch.manual_seed(0)
    model = create_model(name, **TINY).double()
    if random_gates:  # non-zero adaLN gates and output layer, so the blocks really do something
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
            torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.2)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.2)
        torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.2)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64) * 1000
    y = torch.randint(0, 10, (4,), generator=g)
    return x, t, y


@pytest.mark.parametrize("random_gates", [False, True])
@pytest.mark.parametrize("kind,options", VARIANTS)
def test_connections_equal_residual_at_init(kind, options, random_gates):
    base = _residual_model(random_gates)
    model = create_model("DiT-S/2", connections=kind, **options, **TINY).double().eval()
    result = model.load_state_dict(base.state_dict(), strict=False)
    # A residual checkpoint loads with only the connection parameters missing.
    assert not result.unexpected_keys
    assert result.missing_keys and all("_connection." in k for k in result.missing_keys)
    x, t, y = _inputs()
    ref, out = base(x, t, y), model(x, t, y)
    if random_gates:
        assert ref.abs().max() > 1e-2  # the comparison is not between two zero tensors
    # Hyper-connections sum n identical streams, so the final LayerNorm sees n*h: equal up to its eps.
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_moved_connection_weights_change_the_output():
    """The equivalence test can fail: perturbed connection weights give a different output."""
    base = _residual_model(True)
    model = create_model("DiT-S/2", connections="hyper", connections_n=2, **TINY).double().eval()
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        model.blocks[1].mlp_connection.weights.static_alpha.add_(0.3)
    x, t, y = _inputs()
    assert (model(x, t, y) - base(x, t, y)).abs().max() > 1e-3


@pytest.mark.parametrize("kind,n,dynamic", [("hyper", 1, False), ("hyper", 2, False), ("hyper", 4, False),
                                            ("hyper", 2, True), ("hyper", 4, True), ("frac", 2, False),
                                            ("frac", 4, False), ("frac", 2, True), ("frac", 4, True)])
def test_parameter_overhead_matches_the_formulas(kind, n, dynamic):
    """Per sublayer: SHC n(n+2); DHC D(n+2) + n(n+2) + 2; SFC n_frac(2 n_frac+1); DFC
    (D/n_frac)(2 n_frac+1) + n_frac(2 n_frac+1) + 2 (non-affine LayerNorm, so no norm parameters). Two
    sublayers per block. `n` is n (hyper) or n_frac (frac); d is D."""
    d, depth = TINY["hidden_size"], TINY["depth"]
    base = count_params(create_model("DiT-S/2", **TINY))["total"]
    key = "connections_n" if kind == "hyper" else "connections_m"
    model = create_model("DiT-S/2", connections=kind, connections_dynamic=dynamic, **{key: n}, **TINY)
    if kind == "hyper":
        per = n * (n + 2) + (d * (n + 2) + 2 if dynamic else 0)
    else:
        per = n * (2 * n + 1) + ((d // n) * (2 * n + 1) + 2 if dynamic else 0)
    assert count_params(model)["total"] - base == 2 * depth * per


def test_dit_xl2_shc2_overhead_is_448():
    """DiT-XL/2: SHC x2 adds n(n+2) = 8 parameters to each of its 56 sublayers, 448 in all."""
    with torch.device("meta"):
        dense = create_model("DiT-XL/2")
        shc = create_model("DiT-XL/2", connections="hyper", connections_n=2)
    assert count_params(shc)["total"] - count_params(dense)["total"] == 448


def test_static_weights_not_decayed_dynamic_projections_decayed():
    model = create_model("DiT-S/2", connections="hyper", connections_n=2, connections_dynamic=True, **TINY)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, 0.1)}
    w = model.blocks[0].attn_connection.weights
    for p in (w.static_alpha, w.static_beta, w.alpha_scale, w.beta_scale):
        assert id(p) in groups["no_decay"]
    for p in (w.dynamic_alpha, w.dynamic_beta):
        assert id(p) in groups["decay"]


@pytest.mark.parametrize("kind,options", [("hyper", dict(connections_n=2, connections_dynamic=True)),
                                          ("frac", dict(connections_m=2, connections_dynamic=True))])
def test_connections_train_with_expert_race(tmp_path, kind, options):
    overrides = ["model.name=RaceDiT-S/2-2in4", f"model.connections={kind}", "train.steps=30", "train.lr=3e-3",
                 "train.log_every=1", "train.ckpt_every=0"]
    overrides += [f"model.{k}={v}" for k, v in options.items()]
    cfg = make_tiny_config(tmp_path / "run", *overrides)
    model_before = create_model(cfg.model)
    train(cfg)
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss falls
    from racedit.checkpoint import latest_checkpoint, load_weights

    after = load_weights(latest_checkpoint(tmp_path / "run" / "checkpoints"), "model")
    before = model_before.state_dict()
    moved = [k for k in after if "_connection." in k and not torch.equal(after[k], before[k])]
    assert any("static_alpha" in k for k in moved) and any("dynamic_alpha" in k for k in moved)
