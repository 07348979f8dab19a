"""The dispatch kernels (racedit/models/moe_dispatch.py) against `dispatch_reference`, and the static training path's
freedom from host reads (one fullgraph trace, no recompile when the routing changes).

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, D width, E experts, k experts
per token on average.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from racedit.models.moe import Experts, MoEFeedForward, dispatch, dispatch_reference, dispatch_static
from racedit.models.moe_dispatch import grouped_mm_supported
from racedit.models.records import ForwardRecord
from racedit.models.routing import GATINGS, STRATEGIES, gate, select
from racedit.testing import HOST_READS, RecordOps

SHAPES = {"2in8": dict(k=2, E=8), "4in32": dict(k=4, E=32)}
B, L, D = 2, 8, 8  # k*L/E and B*L*k/E are whole numbers for both shapes

HAS_GROUPED_MM_F32 = grouped_mm_supported("cpu", torch.float32, D, 4 * D // 2) and grouped_mm_supported(
    "cpu", torch.float32, D, 4 * D // 4)


def routed(strategy, gating, dtype, k, E, skew=False, seed=0):
    """x (N, D), gate logits (N, E), scores S, the training mask of `strategy` and a k-in-E expert bank with
    non-zero biases. skew: expert 0 scores far above the rest and the last E/2 experts far below, so the
    batch-coupled strategies give expert 0 most pairs and some experts none."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * L, D, generator=g, dtype=dtype, requires_grad=True)
    logits = torch.randn(B * L, E, generator=g, dtype=dtype)
    if skew:
        logits[:, 0] += 6.0
        logits[:, E // 2:] -= 6.0
    logits.requires_grad_()
    scores = gate(logits, gating)
    mask = select(scores.detach().view(B, L, E), strategy, k).view(B * L, E)
    experts = Experts(D, 4 * D // k, E, k).to(dtype)
    with torch.no_grad():
        for p in (experts.b1, experts.b2):
            p.normal_(generator=g)
    return x, logits, scores, mask, experts


def assert_matches_reference(out, x, logits, scores, mask, experts, tol):
    ref = dispatch_reference(x, mask, scores, experts)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    wrt = [x, logits, *experts.parameters()]
    got = torch.autograd.grad(out, wrt, upstream, retain_graph=True)
    want = torch.autograd.grad(ref, wrt, upstream, retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


CASES = [(s, g, shape, skew) for s in STRATEGIES for g in GATINGS for shape in SHAPES for skew in (False, True)]


@pytest.mark.parametrize(("strategy", "gating", "shape", "skew"), CASES)
def test_static_padded_bmm_equals_reference_float64(strategy, gating, shape, skew):
    k, E = SHAPES[shape]["k"], SHAPES[shape]["E"]
    x, logits, scores, mask, experts = routed(strategy, gating, torch.float64, k, E, skew)
    assert int(mask.sum()) == B * L * k  # every strategy selects exactly N*k pairs in training
    out = dispatch(x, mask, scores, experts, implementation="padded_bmm", num_selected=B * L * k)
    assert_matches_reference(out, x, logits, scores, mask, experts, 1e-12)


@pytest.mark.skipif(not HAS_GROUPED_MM_F32, reason="this torch build has no CPU float32 grouped matmul")
@pytest.mark.parametrize(("strategy", "gating", "shape", "skew"), CASES)
def test_static_grouped_mm_equals_reference_float32(strategy, gating, shape, skew):
    k, E = SHAPES[shape]["k"], SHAPES[shape]["E"]
    x, logits, scores, mask, experts = routed(strategy, gating, torch.float32, k, E, skew)
    out = dispatch(x, mask, scores, experts, implementation="grouped_mm", num_selected=B * L * k)
    assert_matches_reference(out, x, logits, scores, mask, experts, 1e-5)


@pytest.mark.parametrize(("strategy", "gating", "shape", "skew"), CASES)
def test_expert_loop_equals_reference_float64(strategy, gating, shape, skew):
    k, E = SHAPES[shape]["k"], SHAPES[shape]["E"]
    x, logits, scores, mask, experts = routed(strategy, gating, torch.float64, k, E, skew)
    out = dispatch(x, mask, scores, experts, implementation="expert_loop")
    assert_matches_reference(out, x, logits, scores, mask, experts, 1e-12)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_skewed_scores_leave_experts_empty_and_overload_one(shape):
    """The skewed case above really is skewed: under Expert Race expert 0 takes a pair from every token and
    the low-scoring half of the experts gets none."""
    k, E = SHAPES[shape]["k"], SHAPES[shape]["E"]
    mask = routed("expert_race", "identity", torch.float64, k, E, skew=True)[3]
    counts = mask.sum(0)
    assert counts[0] == B * L and (counts[E // 2:] == 0).all()


def test_static_padded_bmm_passes_gradcheck():
    k, E = 2, 8
    x, logits, scores, mask, experts = routed("expert_race", "identity", torch.float64, k, E, skew=True)
    mask[0] = False  # a token without experts; move its pairs to token 1 so the count stays N*k
    mask[1] = True
    n_sel = int(mask.sum())

    def fn(x, logits, w1, b1, w2, b2):
        bank = SimpleNamespace(w1=w1, b1=b1, w2=w2, b2=b2, dim=experts.dim, hidden=experts.hidden)
        return dispatch_static(x, mask, logits, bank, n_sel, implementation="padded_bmm")

    params = [p.detach().requires_grad_() for p in experts.parameters()]
    assert torch.autograd.gradcheck(fn, (x, logits, *params))


@pytest.mark.parametrize("implementation", ["padded_bmm", "grouped_mm", "expert_loop"])
def test_counted_path_with_a_data_dependent_count(implementation):
    """Eval's threshold picks any number of pairs (here S >= 0.7 on sigmoid scores), including none."""
    if implementation == "grouped_mm" and not HAS_GROUPED_MM_F32:
        pytest.skip("this torch build has no CPU float32 grouped matmul")
    dtype = torch.float32 if implementation == "grouped_mm" else torch.float64
    x, logits, scores, _, experts = routed("expert_race", "sigmoid", dtype, 2, 8, skew=True)
    mask = scores.detach() >= 0.7
    assert int(mask.sum()) not in (0, B * L * 2)
    out = dispatch(x, mask, scores, experts, implementation=implementation)
    assert_matches_reference(out, x, logits, scores, mask, experts, 1e-5 if dtype == torch.float32 else 1e-12)
    empty = dispatch(x, torch.zeros_like(mask), scores, experts, implementation=implementation)
    assert (empty == 0).all() and empty.requires_grad


def test_the_layer_passes_the_shape_count_only_for_local_top_k_selections():
    layer = MoEFeedForward(D, 8, 2).train()
    assert layer.selected_count(B * L, None, None) == B * L * 2  # training, local race; also eval's top-K rule
    assert layer.selected_count(B * L, torch.tensor(0.5), None) is None  # eval threshold: data dependent


@pytest.mark.parametrize("implementation", ["padded_bmm", "grouped_mm"])
def test_static_path_reads_nothing_on_the_host_eager(implementation, monkeypatch):
    """The CPU analogue of torch.cuda.set_sync_debug_mode("error"): forward and backward of the static path
    dispatch no host-reading op, and `.tolist()` (which on CPU reads memory without dispatching) is never called."""
    if implementation == "grouped_mm" and not HAS_GROUPED_MM_F32:
        pytest.skip("this torch build has no CPU float32 grouped matmul")
    x, logits, scores, mask, experts = routed("expert_race", "identity", torch.float32, 2, 8, skew=True)

    def refuse(*args, **kwargs):
        raise AssertionError("host read (.tolist()) on the static dispatch path")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    with RecordOps() as record:
        out = dispatch(x, mask, scores, experts, implementation=implementation, num_selected=B * L * 2)
        out.square().sum().backward()
    monkeypatch.undo()
    assert record.ops and not HOST_READS.intersection(record.ops)
    assert x.grad is not None and experts.w1.grad is not None


@pytest.mark.parametrize(("implementation", "dtype"), [("auto", torch.float32), ("padded_bmm", torch.float32),
                                                       ("grouped_mm", torch.float32), ("grouped_mm", torch.bfloat16)])
def test_static_path_traces_as_one_graph_without_recompiling(implementation, dtype):
    """The static path as torch.compile sees it: forward and backward trace as one graph with fullgraph=True (a
    data-dependent shape or branch would break it or raise), the forward and backward graphs hold no host-reading
    op, and two more routings with other per-expert loads (empty experts, one expert with every token) reuse
    the graph (error_on_recompile). "auto" shows the run-time choice takes a static kernel while compiling."""
    if implementation == "grouped_mm" and not grouped_mm_supported("cpu", dtype, D, 4 * D // 2, traced=True):
        pytest.skip(f"the grouped matmul of this torch build does not trace for {dtype} on CPU")
    torch._dynamo.reset()
    k, E = 2, 8
    bank = Experts(D, 4 * D // k, E, k).to(dtype)  # one bank, reloaded per routing: the compiled code sees one module

    def forward(x, scores, mask):
        return dispatch(x, mask, scores, bank, implementation=implementation, num_selected=B * L * k)

    def grads(out, x, scores):
        return torch.autograd.grad(out.square().sum(), [x, scores, *bank.parameters()])

    graphs, frames = [], []

    def keep(gm, example_inputs):  # AOTAutograd's forward and backward graphs, run as they are (eager kernels)
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    joint = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def backend(gm, example_inputs):
        frames.append(gm)
        return joint(gm, example_inputs)

    compiled = torch.compile(forward, fullgraph=True, backend=backend, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True, capture_dynamic_output_shape_ops=False):
        for seed, skew, strategy in ((0, False, "expert_race"), (1, True, "expert_race"), (2, True, "le_choice")):
            x, logits, scores, mask, experts = routed(strategy, "identity", dtype, k, E, skew, seed)
            bank.load_state_dict(experts.state_dict())
            got, want = compiled(x, scores, mask), forward(x, scores, mask)
            got, want = (got, *grads(got, x, scores)), (want, *grads(want, x, scores))
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert len(frames) == 1 and len(graphs) == 2  # one frame compiled once: its forward and backward graphs
    targets = {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert not HOST_READS.intersection(targets)


def test_training_layer_uses_the_static_count():
    """A training forward of the layer hands dispatch N*k (and the result equals the reference)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(D, 8, 2, target_dim=4).double().train()
    u = torch.randn(B, L, D, dtype=torch.float64)
    record = ForwardRecord()
    y = layer(u, record)
    rec = record.moe[0]
    assert int(rec.mask.sum()) == layer.selected_count(B * L, None, rec.group)
    ref = dispatch_reference(u.reshape(-1, D), rec.mask, rec.scores, layer.experts)
    torch.testing.assert_close(y.reshape(-1, D), ref, rtol=1e-12, atol=1e-12)
