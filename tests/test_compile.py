"""Every model family under `torch.compile(fullgraph=True)`: one graph, no recompile when the routing or the
per-expert loads change, outputs and gradients equal to the eager forward (racedit/models/compiling.py).

The reference is the same module run eagerly (`model.forward`, which bypasses the in-place compiled call).
Compile time dominates, so the family tests trace with the "aot_eager" backend (dynamo's capture and
AOT autograd's joint forward-backward graph: what fullgraph and the recompile guards are about), and a
few models go through inductor, the backend `train.compile` uses. Each mixed model covers several
families at once: its blocks' routers are set to the six strategies (a router's strategy is a Python
attribute, so each block traces its own selection), with one gating per model, connections and a memory
layer. Expert parallelism (two gloo processes, E/2 experts each) is compared with the eager expert-parallel model
and with the unsharded one.

Letters (docs/method/README.md): B images, L tokens per image, E experts, k experts per token on average.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch._dynamo
from conftest import make_tiny_config, run_gloo_workers

import racedit.training.loop as loop_mod
from racedit.config import LossConfig
from racedit.models import create_model
from racedit.models.compiling import compile_model
from racedit.models.losses import AUX_LOSS_NAMES, auxiliary_losses
from racedit.models.moe import MoEFeedForward, threshold_layers
from racedit.models.records import ForwardRecord
from racedit.models.routing import STRATEGIES
from racedit.training.loop import train

TINY = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=32, num_heads=2, patch_size=2,
            learn_sigma=False)
B = 4  # L = 16 tokens: k*L/E and B*L*k/E are whole numbers for 2in8 and 4in32
LOSSES = LossConfig(router_similarity=0.1, per_layer_reg=0.1, balance=0.01, z_loss=0.001)

FAMILIES = {
    "moe-identity-2in8-hyper-dynamic-pkm": dict(
        name="RaceDiT-S/2-2in8", depth=6, gating="identity", connections="hyper", connections_dynamic=True,
        memory="pkm", memory_blocks=[0], memory_keys=8, memory_topk=4),
    "moe-sigmoid-2in8-frac-dynamic-ultramem-checkpointed": dict(
        name="RaceDiT-S/2-2in8", depth=6, gating="sigmoid", connections="frac", connections_dynamic=True,
        memory="ultramem", memory_blocks=[1], memory_keys=8, memory_topk=4, grad_checkpointing=True),
    "moe-softmax-4in32-hyper-static-ultramemv2": dict(
        name="RaceDiT-S/2-4in32", depth=6, gating="softmax", connections="hyper", memory="ultramemv2",
        memory_blocks=[2], memory_keys=8, memory_topk=4),
    "dense-frac-static": dict(name="DiT-S/2", depth=2, connections="frac"),
}


def build(overrides: dict, mix_strategies: bool = True):
    """A tiny model, with `mix_strategies` its blocks' routers taking the six strategies in turn, every weight
    moved off its (partly zero) initialisation so that every branch contributes. `overrides` are
    create_model's, and grad_checkpointing=True switches on activation checkpointing."""
    torch.manual_seed(0)
    overrides = dict(overrides)
    checkpointed = overrides.pop("grad_checkpointing", False)
    model = create_model(**{**TINY, **overrides})
    model.grad_checkpointing = checkpointed  # activation checkpointing of every block
    moe = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer, strategy in zip(moe, STRATEGIES if mix_strategies else ()):
        layer.router.routing = strategy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train()


def inputs(seed: int, b: int = B):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, 10, (b,), generator=g), torch.randn(b, 1, 8, 8, generator=g))


def training_step(model, forward, seed: int):
    """Forward with a filled record (diagnostics on), the auxiliary losses from it, backward: (loss, output,
    record, {parameter: gradient})."""
    x, t, y, target = inputs(seed)
    model.zero_grad(set_to_none=False)
    record = ForwardRecord(diagnostics=True)
    out = forward(x, t, y, record=record)
    loss = (out - target).square().mean()
    if record.moe:
        aux = auxiliary_losses(record, LOSSES, target)
        loss = loss + sum(getattr(LOSSES, field) * aux[name] for field, name in AUX_LOSS_NAMES.items())
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), out.detach(), record, grads


def assert_step_matches_eager(model, seed: int, tol: float = 1e-5):
    got = training_step(model, model, seed)  # the compiled call
    want = training_step(model, model.forward, seed)  # eager
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=tol)
    assert sorted(got[2].moe) == sorted(want[2].moe)
    for i in want[2].moe:
        assert torch.equal(got[2].moe[i].mask, want[2].moe[i].mask)
        if want[2].moe[i].kth_score is not None:
            torch.testing.assert_close(got[2].moe[i].kth_score, want[2].moe[i].kth_score)
    assert sorted(got[2].block_output_norms) == sorted(want[2].block_output_norms)
    assert sorted(got[2].memory) == sorted(want[2].memory)
    for name, grad in want[3].items():
        torch.testing.assert_close(got[3][name], grad, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    return got[2]


def load_counts(record: ForwardRecord) -> torch.Tensor:
    """Per-expert loads of every MoE layer, (layers, E)."""
    return torch.stack([record.moe[i].mask.sum(0) for i in sorted(record.moe)])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compiles_as_one_graph_and_does_not_recompile(family):
    torch._dynamo.reset()
    model = compile_model(build(FAMILIES[family]), backend="aot_eager")
    first = assert_step_matches_eager(model, seed=0)  # compiles (fullgraph: a graph break would raise)
    with torch._dynamo.config.patch(error_on_recompile=True):
        later = [assert_step_matches_eager(model, seed=s) for s in (1, 2)]
    if first.moe:  # other inputs gave other routing and other per-expert loads, in the same graph
        assert not torch.equal(load_counts(first), load_counts(later[0]))
        assert {first.moe[i].mask.sum().item() for i in first.moe} <= {B * 16 * 2, B * 16 * 4}


@pytest.fixture(scope="module")
def inductor_race_model():
    """One RaceDiT-2in8 compiled with inductor, shared by the training and the eval test (two graphs)."""
    torch._dynamo.reset()
    model = compile_model(build(dict(name="RaceDiT-S/2-2in8", depth=2), mix_strategies=False))
    yield model
    torch._dynamo.reset()


def test_inductor_training_step_equals_eager_without_recompiles(inductor_race_model):
    model = inductor_race_model.train()
    assert_step_matches_eager(model, seed=0, tol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert_step_matches_eager(model, seed=1, tol=1e-4)


def test_inductor_eval_threshold_routing_changes_count_without_recompiling(inductor_race_model):
    """Eval with tau: each batch selects its own number of pairs (an unbacked size); whether tau is set is
    read on the device, so flipping it switches to the top-K rule in the same graph."""
    model = inductor_race_model.eval()
    layers = threshold_layers(model)
    counts = set()

    def check(seed):
        x, t, y, _ = inputs(seed)
        with torch.no_grad():
            record = ForwardRecord()
            got = model(x, t, y, record=record)
            want = model.forward(x, t, y)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        counts.add(int(record.moe[0].mask.sum()))

    for layer in layers:
        layer.tau.fill_(0.0)
        layer.threshold_initialized.fill_(True)
    try:
        check(0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            check(1)
            check(2)
            for layer in layers:
                layer.threshold_initialized.fill_(False)  # the top-K rule: exactly B*L*k pairs
            with pytest.warns(UserWarning, match="inference threshold never set"):  # the eager reference warns
                check(3)
    finally:
        model.train()
    assert B * 16 * 2 in counts and len(counts) >= 3


def _global_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch._dynamo.reset()
        model = compile_model(build(dict(name="RaceDiT-S/2-2in8", depth=2, race_scope="global"),
                                    mix_strategies=False), backend="aot_eager")
        saved = {}
        for step in range(3):
            x, t, y, _ = inputs(10 * step + rank, b=3 + rank)  # unequal per-rank batches
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                for name, forward in (("compiled", model), ("eager", model.forward)):
                    model.zero_grad(set_to_none=False)
                    record = ForwardRecord()
                    out = forward(x, t, y, record=record)
                    out.square().sum().backward()
                    saved[f"{name}{step}.out"] = out.detach()
                    saved[f"{name}{step}.grad"] = torch.cat([p.grad.flatten() for p in model.parameters()
                                                             if p.grad is not None])
                    saved[f"{name}{step}.mask"] = record.moe[0].mask
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_race_compiles_once_and_matches_eager_on_two_processes(tmp_path):
    """race_scope=global: this rank's share of the global selection varies from step to step (an unbacked
    size after the custom op that runs the collectives); no recompile, same masks, outputs and gradients."""
    ranks = run_gloo_workers(_global_worker, tmp_path, world=2, timeout=300)
    shares = set()
    for saved in ranks:
        for step in range(3):
            assert torch.equal(saved[f"compiled{step}.mask"], saved[f"eager{step}.mask"])
            torch.testing.assert_close(saved[f"compiled{step}.out"], saved[f"eager{step}.out"])
            torch.testing.assert_close(saved[f"compiled{step}.grad"], saved[f"eager{step}.grad"],
                                       rtol=1e-4, atol=1e-5)
            shares.add(int(saved[f"compiled{step}.mask"].sum()))
    total = {step: sum(int(s[f"compiled{step}.mask"].sum()) for s in ranks) for step in range(3)}
    assert set(total.values()) == {(3 + 4) * 16 * 2}  # the global race selects N*k over both ranks
    assert len(shares) > 2  # while each rank's share moves


# Expert parallelism (racedit.models.expert_parallel) compiled: 2 blocks, E=4 experts, two per process; rank 1 has the
# larger batch. "local": 1in4, race local to each process; "global": 2in4, the global race, under activation
# checkpointing. Steps 0 and 1 route freely; step 2 biases every router towards rank 0's experts so that rank 1
# receives no row at all. Eval (the "local" model): the threshold at 0 (a data-dependent count of pairs per
# batch), then above every score (no pair anywhere).
EP_MODELS = {"local": dict(name="RaceDiT-S/2-1in4", depth=2, race_scope="local"),
             "global": dict(name="RaceDiT-S/2-2in4", depth=2, race_scope="global", grad_checkpointing=True)}
EP_EXPERTS, EP_STEPS, EP_EVAL_TAUS = 4, 3, (0.0, 0.0, 0.0, 1e9)


def _ep_inputs(seed: int, b: int):
    return tuple(a.double() if a.is_floating_point() else a for a in inputs(seed, b))


def _ep_step(model, forward, x, t, y, target, prefix: str, saved: dict) -> None:
    """One training forward and backward; saves the output, the mask of the first MoE layer and every gradient."""
    model.zero_grad(set_to_none=False)
    record = ForwardRecord()
    out = forward(x, t, y, record=record)
    (out - target).square().mean().backward()
    saved[f"{prefix}.out"], saved[f"{prefix}.mask"] = out.detach(), record.moe[0].mask
    for name, p in model.named_parameters():
        if p.requires_grad:
            saved[f"{prefix}.grad.{name}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _expert_parallel_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Per model: the expert-parallel model compiled ("compiled"), the same model eager ("eager") and the
    unsharded model eager ("whole", all E experts on every process, float64 like the others)."""
    torch.set_num_threads(1)
    import copy
    import time

    import torch.distributed as dist

    from racedit.models.moe import moe_layers, shard_experts

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        saved = {}
        for tag, overrides in EP_MODELS.items():
            torch._dynamo.reset()
            whole = build(overrides, mix_strategies=False).double()
            model = shard_experts(copy.deepcopy(whole), dist.group.WORLD)
            whole.grad_checkpointing = False  # the reference recomputes nothing
            compile_model(model, unit="model", backend="aot_eager")
            for step in range(EP_STEPS):
                batch = _ep_inputs(10 * step + rank, b=3 + rank)
                biases = [m.router.gate_head.bias for net in (model, whole) for m in moe_layers(net)]
                kept = [b.detach().clone() for b in biases]
                if step == 2:  # every pair goes to rank 0's experts
                    with torch.no_grad():
                        for b in biases:
                            b[: EP_EXPERTS // world] += 10.0
                with torch._dynamo.config.patch(error_on_recompile=step > 0):
                    start = time.perf_counter()
                    _ep_step(model, model, *batch, f"{tag}{step}.compiled", saved)
                    saved[f"{tag}{step}.seconds"] = torch.tensor(time.perf_counter() - start)
                _ep_step(model, model.forward, *batch, f"{tag}{step}.eager", saved)
                _ep_step(whole, whole, *batch, f"{tag}{step}.whole", saved)
                with torch.no_grad():
                    for b, value in zip(biases, kept):
                        b.copy_(value)
            if tag != "local":
                continue
            model.eval(), whole.eval()
            for i, tau in enumerate(EP_EVAL_TAUS):
                for layer in (*threshold_layers(model), *threshold_layers(whole)):
                    layer.tau.fill_(tau)
                    layer.threshold_initialized.fill_(True)
                x, t, y, _ = _ep_inputs(100 + 10 * i + rank, b=3 + rank)
                with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=i > 0):
                    record = ForwardRecord()
                    saved[f"eval{i}.compiled"] = model(x, t, y, record=record)
                    saved[f"eval{i}.mask"] = record.moe[0].mask
                    saved[f"eval{i}.eager"] = model.forward(x, t, y)
                    saved[f"eval{i}.whole"] = whole(x, t, y)
        torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def expert_parallel_runs(tmp_path_factory):
    return run_gloo_workers(_expert_parallel_worker, tmp_path_factory.mktemp("expert_parallel"), world=2,
                            timeout=300)


def _expert_grads_summed(ranks: list[dict], prefix: str, name: str, rank: int) -> torch.Tensor:
    """The unsharded gradient of an expert weight summed over both processes' batches, cut to `rank`'s experts:
    what the expert-parallel process holding those experts accumulates from every process's rows."""
    total = sum(saved[f"{prefix}.whole.grad.{name}"] for saved in ranks)
    per = EP_EXPERTS // len(ranks)
    return total[rank * per:(rank + 1) * per]


@pytest.mark.parametrize("tag", list(EP_MODELS))
def test_expert_parallel_compiles_once_and_matches_eager_on_two_processes(expert_parallel_runs, tag):
    """fullgraph=True with the row exchange's unbacked sizes: steps 1 and 2 change the per-process loads (and
    step 2 leaves rank 1 without rows) without recompiling; the compiled outputs and every gradient equal the
    eager expert-parallel model's, and both the unsharded model's."""
    ranks = expert_parallel_runs
    tol = dict(rtol=1e-10, atol=1e-12)
    for rank, saved in enumerate(ranks):
        for step in range(EP_STEPS):
            prefix = f"{tag}{step}"
            assert torch.equal(saved[f"{prefix}.compiled.mask"], saved[f"{prefix}.whole.mask"])
            torch.testing.assert_close(saved[f"{prefix}.compiled.out"], saved[f"{prefix}.eager.out"], **tol)
            torch.testing.assert_close(saved[f"{prefix}.compiled.out"], saved[f"{prefix}.whole.out"], **tol)
            names = [k.split(".grad.", 1)[1] for k in saved if k.startswith(f"{prefix}.compiled.grad.")]
            assert any(".experts." in n for n in names) and len(names) > 20
            for name in names:
                got = saved[f"{prefix}.compiled.grad.{name}"]
                torch.testing.assert_close(got, saved[f"{prefix}.eager.grad.{name}"], **tol, msg=name)
                want = (_expert_grads_summed(ranks, prefix, name, rank) if ".experts." in name
                        else saved[f"{prefix}.whole.grad.{name}"])
                torch.testing.assert_close(got, want, **tol, msg=name)
            if step == 2:  # rank 1's experts got no row: their gradients are exactly zero
                assert not saved[f"{prefix}.compiled.mask"][:, EP_EXPERTS // 2:].any()
                if rank == 1:
                    assert all(not saved[f"{prefix}.compiled.grad.{n}"].any() for n in names if ".experts." in n)
    loads = {tuple(saved[f"{tag}{step}.compiled.mask"].sum(0).tolist()) for saved in ranks for step in range(2)}
    assert len(loads) == 4  # both processes, both free steps: four different per-expert loads


def test_expert_parallel_eval_threshold_compiles_once_on_two_processes(expert_parallel_runs):
    """Eval with the threshold: each batch selects its own number of pairs, including none at all (tau above
    every score); one eval graph, outputs equal to the eager expert-parallel and the unsharded model's."""
    counts = set()
    for saved in expert_parallel_runs:
        for i in range(len(EP_EVAL_TAUS)):
            torch.testing.assert_close(saved[f"eval{i}.compiled"], saved[f"eval{i}.eager"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(saved[f"eval{i}.compiled"], saved[f"eval{i}.whole"], rtol=1e-10, atol=1e-12)
            counts.add(int(saved[f"eval{i}.mask"].sum()))
    assert 0 in counts and len(counts) >= 5


def test_compiled_training_resumes_bit_for_bit(tmp_path, monkeypatch):
    """train.compile=true: a run stopped at step 4 and resumed repeats the uninterrupted compiled run exactly
    (same graphs, same inputs, deterministic CPU kernels). Traced with aot_eager to keep the suite fast: the
    three runs would compile with inductor three times (the inductor graphs are checked above)."""
    monkeypatch.setattr(loop_mod, "compile_model", functools.partial(compile_model, backend="aot_eager"))
    over = ("model.name=RaceDiT-S/2-2in8", "train.steps=8", "train.compile=true")
    full = train(make_tiny_config(tmp_path / "full", *over))
    cfg = make_tiny_config(tmp_path / "split", *over)
    train(cfg, stop_after=4)
    resumed = train(cfg, resume=True)
    assert resumed.step == full.step == 8
    assert resumed.last_loss == full.last_loss and torch.isfinite(torch.tensor(full.last_loss))
    from safetensors.torch import load_file

    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_compile_gives_the_eager_grid(tmp_path, monkeypatch):
    """`racedit sample --compile` on a Race model with threshold routing: the grid equals the eager one up to
    float32 rounding (at most one uint8 level, in a few pixels). Traced with aot_eager (the inductor eval
    graph is checked above; a second inductor compile here would double this test's time)."""
    import numpy as np
    from PIL import Image

    import racedit.sampling.generate as generate_mod
    from racedit.cli import main

    monkeypatch.setattr(generate_mod, "compile_model", functools.partial(compile_model, backend="aot_eager"))

    run = tmp_path / "run"
    train(make_tiny_config(run, "model.name=RaceDiT-S/2-2in8", "train.steps=3", "train.ckpt_every=0"))
    grids = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.png"
        assert main(["sample", "--ckpt", str(run), "--out", str(out), "--per-class", "3", "--quiet", *extra]) == 0
        grids[name] = np.asarray(Image.open(out)).astype(int)
    diff = np.abs(grids["eager"] - grids["compiled"])
    assert grids["eager"].shape == grids["compiled"].shape and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_fsdp_training_compiles_per_block_and_equals_eager(tmp_path, monkeypatch):
    """train.distributed=fsdp with train.compile=true (one process): FSDP2's hooks cannot be traced, so each
    block's forward is compiled and the hooks stay eager; the losses equal the eager FSDP run's."""
    import csv

    monkeypatch.setattr(loop_mod, "compile_model", functools.partial(compile_model, backend="aot_eager"))
    over = ("model.name=RaceDiT-S/2-2in8", "train.steps=4", "train.distributed=fsdp")
    train(make_tiny_config(tmp_path / "eager", *over))
    train(make_tiny_config(tmp_path / "compiled", *over, "train.compile=true"))

    def losses(run):
        with (tmp_path / run / "metrics.csv").open() as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    assert len(losses("eager")) == 4
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-6)
