"""Expert parallelism equals one process holding the whole batch and every expert (issue #20, "Tests").

Three setups on CPU gloo processes, float64: 2 processes with an expert group of 2 ("ep2"), 4 processes with
one of 4 ("ep4"), and 4 processes as data x expert = 2 x 2 ("dx2": expert groups {0, 1} and {2, 3}, the mesh of
`racedit.training.expert_sharding.expert_layout`). Every process builds the same tiny MoE DiT (same seed), keeps
its E/n experts (`shard_model_experts`) and runs its own rows of a batch (images, timesteps and labels). The
reference of each case, computed by one of the processes before: the unsharded model (the local dispatch, no
collective) on the concatenated batch, all autograd in the workers.

Checked per case, against the reference:
(a) each process's forward output equals the reference's rows;
(b) every gradient: the non-expert ones averaged over all processes by an all_reduce in the worker (what DDP
    does, written independently of racedit), the expert ones after `reduce_expert_gradients`, equal to the
    reference's slice of this process's experts. Each process's loss is sum(its rows' losses) / (all rows) * n_proc,
    so that the average over the n_proc processes is the whole batch's mean loss, also with unequal batches;
(c) the parameters after three AdamW steps with `expert_sharding.clip_grad_norm_` (max norm small enough to clip)
    equal the reference's after `torch.nn.utils.clip_grad_norm_`, and so do the norms.

Cases: Expert Race over the global batch; token choice; ties (zero gating weights: every score equal); the same
images on every process (ties across processes); an expert that no token picks; processes that receive no rows
(only process 0's experts can win); unequal batches per process, one of them empty ((a) and (b) only); the eval
threshold (S >= tau: data-dependent counts; (a) and (b)).

One module fixture runs the two multi-process jobs once (2 processes: ep2; 4 processes: ep4 and dx2) and the tests
read what every process saved. Tolerance: 1e-10 (float64). Measured: outputs within 3e-15, gradients 6e-16,
norms 9e-15, parameters after the three steps 3e-13 (every step clips: norms 1.2 to 3.2, max norm 0.05).

Letters (docs/method/README.md): B images per process, L tokens per image, N tokens, E experts, k experts per
token on average, n (n_ep) processes of an expert group, n_proc processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo_workers

from racedit.models import create_model
from racedit.models.expert_parallel import expert_layout
from racedit.models.moe import local_selection, moe_layers
from racedit.models.records import ForwardRecord
from racedit.training.expert_sharding import (
    clip_grad_norm_,
    expert_parameters,
    reduce_expert_gradients,
    shard_model_experts,
)

# setup -> (n_proc processes, n per expert group, E, k)
SETUPS = {"ep2": (2, 2, 4, 1), "ep4": (4, 4, 8, 2), "dx2": (4, 2, 4, 2)}
# case -> (routing, race_scope, AdamW steps checked)
CASES = {
    "race_global": ("expert_race", "global", True),
    "token_choice": ("token_choice", "local", True),
    "ties": ("expert_race", "global", True),
    "duplicates": ("expert_race", "global", True),
    "empty_expert": ("expert_race", "global", True),
    "no_rows": ("expert_race", "global", True),
    "unequal": ("expert_race", "global", False),
    "eval_threshold": ("expert_race", "local", False),
}
B = 2  # images per process, but in "unequal"
UNEQUAL = {2: (1, 3), 4: (3, 0, 2, 3)}
STEPS = 3
LR, WEIGHT_DECAY, MAX_NORM = 1e-2, 0.01, 0.05
EMPTY = 1  # the expert no token picks in "empty_expert"
TAUS = (0.0, 0.1)  # per MoE layer, "eval_threshold"
TOL = dict(rtol=1e-10, atol=1e-10)


def build(E: int, k: int, routing: str, race_scope: str, case: str, n: int) -> torch.nn.Module:
    """The tiny MoE DiT of a case (2 blocks, D 32, 8x8 inputs: L = 16), float64, every weight moved off its
    (partly zero) initialisation so that every branch contributes; the same on every process."""
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                         num_heads=2, patch_size=2, learn_sigma=False, moe_experts=E, moe_k=k, routing=routing,
                         race_scope=race_scope, router_target_head=False).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for layer in moe_layers(model):
            head = layer.router.gate_head
            if case == "ties":  # identity gating: every score 0.5
                head.weight.zero_()
                head.bias.fill_(0.5)
            elif case == "empty_expert":
                head.bias[EMPTY] = -1e3
            elif case == "no_rows":  # only process 0's experts can win: the others receive nothing
                head.bias[E // n:] = -1e3
    if case == "eval_threshold":
        for layer, tau in zip(moe_layers(model), TAUS):
            layer.tau.fill_(tau)
            layer.threshold_initialized.fill_(True)
        model.eval()
    else:
        model.train()
    return model


def batch_sizes(case: str, world: int) -> tuple[int, ...]:
    return UNEQUAL[world] if case == "unequal" else (B,) * world


def inputs(case: str, step: int, sizes: tuple[int, ...]):
    """The whole batch (x (sum B, 1, 8, 8), t, y, target), process r's rows after those of 0..r-1; in
    "duplicates" every process holds the same images."""
    g = torch.Generator().manual_seed(1000 * list(CASES).index(case) + step)
    total = sizes[0] if case == "duplicates" else sum(sizes)
    x, target = torch.randn(total, 1, 8, 8, generator=g).double(), torch.randn(total, 1, 8, 8, generator=g).double()
    t, y = torch.randint(0, 1000, (total,), generator=g), torch.randint(0, 11, (total,), generator=g)
    if case == "duplicates":
        x, t, y, target = (v.repeat(len(sizes), *([1] * (v.dim() - 1))) for v in (x, t, y, target))
    return x, t, y, target


def row_losses(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) twice -> (B,) squared errors, mean per image."""
    return (out - target).square().flatten(1).mean(1)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def average_shared_gradients(model: torch.nn.Module, world: int) -> None:
    """What DDP does to the non-expert gradients: the mean over all processes (one flat all_reduce)."""
    experts = set(expert_parameters(model))
    params = [p for name, p in model.named_parameters() if p.requires_grad and name not in experts]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.grad = part.view_as(p).clone()


def run_expert_parallel(setup, case, rank, layout, out) -> None:
    world, n, E, k = SETUPS[setup]
    routing, scope, adamw = CASES[case]
    model = shard_model_experts(build(E, k, routing, scope, case, n), layout)
    prefix = f"{setup}/{case}"
    for name, p in expert_parameters(model).items():
        layer = next(m for m in moe_layers(model) if any(q is p for q in m.experts.parameters()))
        out[f"{prefix}/slice/{name}"] = torch.tensor([layer.experts.first_expert, layer.experts.num_experts])
    sizes = batch_sizes(case, world)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(STEPS if adamw else 1):
        x, t, y, target = inputs(case, step, sizes)
        output = model(x[rows], t[rows], y[rows])
        (row_losses(output, target[rows]).sum() / sum(sizes) * world).backward()
        average_shared_gradients(model, world)
        reduce_expert_gradients(model, layout)
        if step == 0:
            out[f"{prefix}/out"] = output.detach().clone()
            out.update({f"{prefix}/grad/{name}": g for name, g in grads(model).items()})
        if adamw:
            out[f"{prefix}/norm{step}"] = clip_grad_norm_(model, MAX_NORM, layout).detach().clone()
            optimizer.step()
            optimizer.zero_grad()
    if adamw:
        out.update({f"{prefix}/param/{name}": p.detach().clone() for name, p in model.named_parameters()})


def run_reference(setup, case, out) -> None:
    """One process, every expert, the whole batch (the selection local: its batch is the global one)."""
    world, n, E, k = SETUPS[setup]
    routing, scope, adamw = CASES[case]
    model = build(E, k, routing, scope, case, n)
    prefix = f"{setup}/{case}/ref"
    sizes = batch_sizes(case, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(STEPS if adamw else 1):
        x, t, y, target = inputs(case, step, sizes)
        record = ForwardRecord()
        with local_selection(model):
            output = model(x, t, y, record=record)
        row_losses(output, target).mean().backward()
        if step == 0:
            out[f"{prefix}/out"] = output.detach().clone()
            out.update({f"{prefix}/grad/{name}": g for name, g in grads(model).items()})
            for index, layer in record.moe.items():
                out[f"{prefix}/mask{index}"] = layer.mask.clone()
                out[f"{prefix}/scores{index}"] = layer.scores.detach().clone()
        if adamw:
            out[f"{prefix}/norm{step}"] = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).detach()
            optimizer.step()
            optimizer.zero_grad()
    if adamw:
        out.update({f"{prefix}/param/{name}": p.detach().clone() for name, p in model.named_parameters()})


GROUPED_MM_CASES = ("race_global", "no_rows", "unequal")  # float32: CPU's grouped matmul takes no float64


def run_kernels(setup, case, rank, layout, out) -> None:
    """The expert-parallel forward and backward with each CPU kernel, float32 (`expert_rows`' two branches)."""
    world, n, E, k = SETUPS[setup]
    routing, scope, _ = CASES[case]
    sizes = batch_sizes(case, world)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    x, t, y, target = (v.float() if v.is_floating_point() else v for v in inputs(case, 0, sizes))
    for kernel in ("grouped_mm", "expert_loop"):
        model = shard_model_experts(build(E, k, routing, scope, case, n).float(), layout)
        for layer in moe_layers(model):
            layer.dispatch_implementation = kernel
        output = model(x[rows], t[rows], y[rows])
        row_losses(output, target[rows]).sum().backward()
        out[f"{setup}/{case}/{kernel}/out"] = output.detach().clone()
        out.update({f"{setup}/{case}/{kernel}/grad/{name}": g for name, g in grads(model).items()})


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for setup, (setup_world, n, _, _) in SETUPS.items():
            if setup_world != world:
                continue
            layout = expert_layout(torch.device("cpu"), n)
            # the references first, spread over the processes (they need no collective: all run at once)
            for case in list(CASES)[rank::world]:
                run_reference(setup, case, out)
            for case in CASES:
                run_expert_parallel(setup, case, rank, layout, out)
            if setup == "ep2":
                for case in GROUPED_MM_CASES:
                    run_kernels(setup, case, rank, layout, out)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """setup -> (what each process saved, in rank order; the references, whichever process computed them): the
    2-process job, then the 4-process one (ep4 and dx2)."""
    results = {}
    for world in (2, 4):
        ranks = run_gloo_workers(worker, tmp_path_factory.mktemp(f"ep{world}"), world=world, timeout=120)
        references = {key: value for data in ranks for key, value in data.items() if "/ref/" in key}
        results.update({setup: (ranks, references) for setup, spec in SETUPS.items() if spec[0] == world})
    return results


def rows_of(setup: str, case: str, rank: int) -> slice:
    sizes = batch_sizes(case, SETUPS[setup][0])
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def own_slice(ranks, setup: str, case: str, rank: int, name: str) -> slice:
    """This process's experts of an expert weight, as its model says; checked against expert-rank * E/n."""
    _, n, E, _ = SETUPS[setup]
    first, count = ranks[rank][f"{setup}/{case}/slice/{name}"].tolist()
    assert (first, count) == ((rank % n) * (E // n), E // n), name
    return slice(first, first + count)


def is_expert(ranks, setup, case, name) -> bool:
    return f"{setup}/{case}/slice/{name}" in ranks[0]


PAIRS = [(s, c) for s in SETUPS for c in CASES]
ADAMW_PAIRS = [(s, c) for s, c in PAIRS if CASES[c][2]]


@pytest.mark.parametrize(("setup", "case"), PAIRS)
def test_forward_rows_equal_one_process(saved, setup, case):
    ranks, ref = saved[setup]
    reference = ref[f"{setup}/{case}/ref/out"]
    assert reference.abs().max() > 0.1  # the output depends on the weights (adaLN-Zero moved off zero)
    for rank, data in enumerate(ranks):
        torch.testing.assert_close(data[f"{setup}/{case}/out"], reference[rows_of(setup, case, rank)], **TOL)


@pytest.mark.parametrize(("setup", "case"), PAIRS)
def test_gradients_equal_one_process(saved, setup, case):
    ranks, ref = saved[setup]
    prefix = f"{setup}/{case}"
    names = [key.removeprefix(f"{prefix}/ref/grad/") for key in ref if key.startswith(f"{prefix}/ref/grad/")]
    assert sum(is_expert(ranks, setup, case, name) for name in names) == 8  # w1, b1, w2, b2 of 2 layers
    for name in names:
        reference = ref[f"{prefix}/ref/grad/{name}"]
        for rank, data in enumerate(ranks):
            expected = reference[own_slice(ranks, setup, case, rank, name)] if is_expert(ranks, setup, case, name) \
                else reference
            torch.testing.assert_close(data[f"{prefix}/grad/{name}"], expected, **TOL, msg=f"{name} on {rank}")
    # the experts learn something (their gradients are not all zero)
    w1 = ref[f"{prefix}/ref/grad/blocks.0.mlp.experts.w1"]
    assert w1.abs().amax(dim=(1, 2)).max() > 1e-4


@pytest.mark.parametrize(("setup", "case"), ADAMW_PAIRS)
def test_three_adamw_steps_with_clipping_equal_one_process(saved, setup, case):
    ranks, ref = saved[setup]
    prefix = f"{setup}/{case}"
    norms = torch.stack([ref[f"{prefix}/ref/norm{s}"] for s in range(STEPS)])
    assert (norms > MAX_NORM).any()  # clipping engaged
    for rank, data in enumerate(ranks):
        ep_norms = torch.stack([data[f"{prefix}/norm{s}"] for s in range(STEPS)])
        torch.testing.assert_close(ep_norms.to(norms.dtype), norms, **TOL, msg=f"gradient norms on {rank}")
    for key in [key for key in ref if key.startswith(f"{prefix}/ref/param/")]:
        name = key.removeprefix(f"{prefix}/ref/param/")
        reference = ref[key]
        for rank, data in enumerate(ranks):
            expected = reference[own_slice(ranks, setup, case, rank, name)] if is_expert(ranks, setup, case, name) \
                else reference
            torch.testing.assert_close(data[f"{prefix}/param/{name}"], expected, **TOL, msg=f"{name} on {rank}")


@pytest.mark.parametrize("setup", SETUPS)
def test_the_cases_route_as_they_claim(saved, setup):
    """What each case is there for shows in the reference's routing (masks and scores of both layers)."""
    world, n, E, k = SETUPS[setup]
    ref = saved[setup][1]

    def layers(case, what):
        return [ref[f"{setup}/{case}/ref/{what}{i}"] for i in range(2)]

    for scores in layers("ties", "scores"):
        assert torch.all(scores == 0.5)
    for mask in layers("ties", "mask"):  # every score ties with the K-th, yet K = N*k pairs are selected
        assert mask.sum() == mask.shape[0] * k and not mask.all()
    for mask in layers("empty_expert", "mask"):
        assert not mask[:, EMPTY].any() and mask.any()
    for mask in layers("no_rows", "mask"):  # only expert-rank 0's experts are picked
        assert mask[:, :E // n].any(dim=0).all() and not mask[:, E // n:].any()
    for mask in layers("race_global", "mask"):  # a race: tokens get unequal numbers of experts
        per_token = mask.sum(dim=1)
        assert per_token.min() != per_token.max() and mask.sum() == mask.shape[0] * k
    for mask in layers("token_choice", "mask"):
        assert torch.all(mask.sum(dim=1) == k)
    for mask, scores, tau in zip(layers("eval_threshold", "mask"), layers("eval_threshold", "scores"), TAUS):
        assert torch.equal(mask, scores >= tau) and mask.sum() != mask.shape[0] * k


@pytest.mark.parametrize("case", GROUPED_MM_CASES)
def test_grouped_matmul_kernel_equals_the_expert_loop(saved, case):
    """The accelerators' kernel (torch's grouped matmul, which CPU runs in float32) in the expert-parallel
    dispatch, including a process that receives no rows, against the CPU kernel checked above."""
    ranks, _ = saved["ep2"]
    for data in ranks:
        prefix = f"ep2/{case}"
        names = [key.split("/grad/")[1] for key in data if key.startswith(f"{prefix}/expert_loop/grad/")]
        assert names
        torch.testing.assert_close(data[f"{prefix}/grouped_mm/out"], data[f"{prefix}/expert_loop/out"],
                                   rtol=1e-5, atol=1e-6)
        for name in names:
            torch.testing.assert_close(data[f"{prefix}/grouped_mm/grad/{name}"],
                                       data[f"{prefix}/expert_loop/grad/{name}"], rtol=1e-4, atol=1e-6, msg=name)
