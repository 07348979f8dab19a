"""MoEFeedForward: dispatch against the reference loop, dense equivalence, empty tokens, bf16 autocast.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, D width, E experts, k experts
per token on average; target_dim = p*p*C target-head outputs per token.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import racedit.models.moe as moe
from racedit.models import create_model
from racedit.models.dit import FeedForward
from racedit.models.moe import Experts, MoEFeedForward, dispatch, dispatch_reference, update_thresholds
from racedit.models.records import ForwardRecord
from racedit.models.routing import gate, select


def routed_inputs(strategy, gating, dtype, B=3, L=8, D=16, E=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B * L, D, generator=g, dtype=dtype, requires_grad=True)
    logits = torch.randn(B * L, E, generator=g, dtype=dtype, requires_grad=True)
    scores = gate(logits, gating)
    mask = select(scores.view(B, L, E), strategy, k).view(B * L, E)
    experts = Experts(D, 4 * D // k, E, k).to(dtype)
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        for p in (experts.b1, experts.b2):
            p.normal_(generator=g)
    return x, logits, scores, mask, experts


def grads_of(out, upstream, tensors):
    return torch.autograd.grad(out, tensors, upstream, retain_graph=True)


@pytest.mark.parametrize("strategy", ["expert_race", "token_choice", "expert_choice", "bl_choice", "le_choice"])
@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
def test_fast_dispatch_equals_reference_float64(strategy, gating):
    x, logits, scores, mask, experts = routed_inputs(strategy, gating, torch.float64)
    fast = dispatch(x, mask, scores, experts)
    ref = dispatch_reference(x, mask, scores, experts)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    wrt = [x, logits, *experts.parameters()]
    for a, b in zip(grads_of(fast, upstream, wrt), grads_of(ref, upstream, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["grouped_mm", "expert_loop"])
def test_both_fast_paths_equal_reference_float32(implementation):
    if implementation == "grouped_mm" and not moe.grouped_mm_supported("cpu", torch.float32, 16, 32):
        pytest.skip("this torch build has no CPU float32 grouped matmul")
    x, logits, scores, mask, experts = routed_inputs("expert_race", "identity", torch.float32)
    mask[:3] = False  # tokens without experts
    mask[:, 1] = False  # an expert without tokens
    fast = dispatch(x, mask, scores, experts, implementation=implementation)
    ref = dispatch_reference(x, mask, scores, experts)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    wrt = [x, logits, *experts.parameters()]
    for a, b in zip(grads_of(fast, upstream, wrt), grads_of(ref, upstream, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_loop_passes_gradcheck():
    x, logits, scores, mask, experts = routed_inputs("expert_race", "identity", torch.float64, B=1, L=6, D=8, E=4)
    mask[0] = False  # a token without experts
    mask[:, 2] = False  # an expert without tokens

    def fn(x, logits, w1, b1, w2, b2):
        bank = SimpleNamespace(w1=w1, b1=b1, w2=w2, b2=b2, dim=experts.dim, hidden=experts.hidden)
        return dispatch(x, mask, logits, bank, implementation="expert_loop")

    assert torch.autograd.gradcheck(fn, (x, logits, *(p.detach().requires_grad_() for p in experts.parameters())))


def test_whole_layer_uses_fast_dispatch_consistently():
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 8, 2, target_dim=4).double().train()
    u = torch.randn(2, 8, 16, dtype=torch.float64)
    record = ForwardRecord()
    y = layer(u, record)
    rec = record.moe[0]
    ref = dispatch_reference(u.reshape(-1, 16), rec.mask, rec.scores, layer.experts)
    torch.testing.assert_close(y.reshape(-1, 16), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gating", ["identity", "sigmoid", "softmax"])
def test_one_expert_equals_the_dense_mlp_times_the_gate(gating):
    torch.manual_seed(0)
    D = 16
    dense = FeedForward(D, 4 * D).double()  # the dense DiT MLP: GELU(tanh), hidden 4D
    layer = MoEFeedForward(D, num_experts=1, k=1, gating=gating).double().train()
    with torch.no_grad():
        layer.experts.w1[0].copy_(dense.fc1.weight.t())
        layer.experts.b1[0].copy_(dense.fc1.bias)
        layer.experts.w2[0].copy_(dense.fc2.weight.t())
        layer.experts.b2[0].copy_(dense.fc2.bias)
    u = torch.randn(2, 8, D, dtype=torch.float64)
    record = ForwardRecord()
    y = layer(u, record)
    rec = record.moe[0]
    assert rec.mask.all()  # K = N*k = N*E: every token gets the single expert
    logits = rec.logits.view(2, 8, 1).double()
    gate_value = {"identity": logits, "sigmoid": torch.sigmoid(logits), "softmax": torch.ones_like(logits)}[gating]
    torch.testing.assert_close(y, dense(u) * gate_value, rtol=1e-12, atol=1e-12)
    if gating == "softmax":
        torch.testing.assert_close(y, dense(u), rtol=1e-12, atol=1e-12)
    # Identity gating: the weight is the raw gate logit, recomputed here from the router's own layers.
    if gating == "identity":
        raw = layer.router.gate_head(layer.router.trunk(u))
        torch.testing.assert_close(y, dense(u) * raw, rtol=1e-12, atol=1e-12)


def test_tokens_with_no_expert_get_zero():
    x, logits, scores, mask, experts = routed_inputs("expert_race", "identity", torch.float64)
    mask = mask.clone()
    mask[:5] = False
    mask[7] = True
    out = dispatch(x, mask, scores, experts)
    routed = mask.any(1)
    assert not routed[:5].any() and routed.sum() > 5
    assert (out[~routed] == 0).all() and (out[routed].abs().sum(1) > 0).all()
    empty = dispatch(x, torch.zeros_like(mask), scores, experts)
    assert (empty == 0).all() and empty.shape == x.shape
    empty.sum().backward()  # still differentiable: the layer never breaks the block's backward
    assert x.grad is None or torch.count_nonzero(x.grad) == 0


def test_bf16_autocast_forward_backward_cpu():
    torch.manual_seed(0)
    B, L, D, E, k = 4, 16, 32, 8, 2
    layer = MoEFeedForward(D, E, k, target_dim=16).train()
    u = torch.randn(B, L, D, requires_grad=True)
    record = ForwardRecord()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(u, record)
        loss = y.float().square().mean() + record.moe[0].target_pred.float().square().mean()
    loss.backward()
    rec = record.moe[0]
    assert y.dtype == torch.bfloat16 and y.shape == (B, L, D)
    assert rec.logits.dtype == torch.float32 and rec.scores.dtype == torch.float32
    assert int(rec.mask.sum()) == B * L * k
    assert torch.isfinite(u.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert rec.kth_score.dtype == torch.float32 and torch.isfinite(rec.kth_score)
    update_thresholds(layer, [record.kth_scores()])
    assert bool(layer.threshold_initialized) and torch.isfinite(layer.tau) and layer.tau.dtype == torch.float32


def test_record_contents_and_layer_index():
    torch.manual_seed(0)
    B, L, D, E, k, target_dim = 2, 4, 16, 4, 2, 12
    layer = MoEFeedForward(D, E, k, target_dim=target_dim, layer_index=3).train()
    record = ForwardRecord()
    layer(torch.randn(B, L, D), record)
    assert list(record.moe) == [3]
    rec = record.moe[3]
    assert rec.logits.shape == rec.scores.shape == rec.mask.shape == (B * L, E)
    assert rec.mask.dtype == torch.bool and not rec.mask.requires_grad
    assert rec.scores.requires_grad and rec.logits.dtype == torch.float32
    assert rec.target_pred.shape == (B, L, target_dim) and rec.kth_score.shape == ()
    assert rec.group is None
    no_head = MoEFeedForward(D, E, k, target_dim=0)
    no_head(torch.randn(B, L, D), record)
    assert record.moe[0].target_pred is None and no_head.router.target_head is None
    assert layer(torch.randn(B, L, D)).shape == (B, L, D)  # without a record


def test_parameter_layout_and_init():
    D, E, k = 32, 8, 2
    layer = MoEFeedForward(D, E, k, mlp_ratio=4.0, target_dim=16)
    h = 4 * D // k
    ex = layer.experts
    assert (ex.w1.shape, ex.b1.shape, ex.w2.shape, ex.b2.shape) == ((E, D, h), (E, h), (E, h, D), (E, D))
    assert ex.activated_fraction == k / E
    bound = math.sqrt(6 / (D + h))
    assert ex.w1.abs().max() <= bound and ex.w2.abs().max() <= bound and ex.w1.abs().max() > 0.9 * bound
    assert (ex.b1 == 0).all() and (ex.b2 == 0).all()
    names = {n for n, _ in layer.named_parameters()}
    assert {"router.trunk.0.weight", "router.gate_head.weight", "router.target_head.weight", "experts.w1"} <= names
    for linear in (layer.router.trunk[0], layer.router.gate_head, layer.router.target_head):
        assert (linear.bias == 0).all()
    with torch.no_grad():
        ex.w1.zero_()
    layer.initialize_weights()
    assert ex.w1.abs().max() > 0


def test_constructor_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown routing"):
        MoEFeedForward(16, 4, 2, routing="hash")
    with pytest.raises(ValueError, match="1 <= k <= E"):
        MoEFeedForward(16, 4, 5)
    with pytest.raises(ValueError, match="unknown gating"):
        MoEFeedForward(16, 4, 2, gating="relu")


def naive_kth(scores: torch.Tensor, k: int, num_experts: int) -> float:
    """Expert Race's K-th largest score, K = N * k of the N * E (token, expert) scores, sorted in float64."""
    flat = scores.detach().double().flatten()
    return float(torch.sort(flat, descending=True).values[flat.numel() // num_experts * k - 1])


def test_a_training_forward_leaves_the_threshold_alone():
    """Forwards only record the K-th score, with or without a record, with a backward, in a whole DiT too."""
    torch.manual_seed(0)
    layer = MoEFeedForward(16, 4, 2, threshold_decay=0.5).train()
    with torch.no_grad():
        layer.tau.fill_(0.123)
    tau = layer.tau.clone()
    record = ForwardRecord()
    layer(torch.randn(2, 8, 16), record).square().sum().backward()
    layer(torch.randn(2, 8, 16)).sum().backward()
    assert record.moe[0].kth_score is not None  # the forward did see a K-th score ...
    assert torch.equal(layer.tau, tau) and not bool(layer.threshold_initialized)  # ... and kept it to itself
    model = create_model("RaceDiT-S/2-2in8", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                         num_heads=2, learn_sigma=False).train()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("tau", "threshold_initialized"))}
    assert len(buffers) == 4
    record = ForwardRecord()
    model(torch.randn(4, 1, 8, 8), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.arange(4), record=record).sum().backward()
    assert sorted(record.kth_scores()) == [0, 1]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in buffers.items())


def test_a_forward_recomputed_under_activation_checkpointing_is_counted_once():
    """Non-reentrant checkpointing recomputes the layer's forward in the backward (early stop off, so the
    recomputation reaches the record and rewrites it); tau still takes one EMA step per batch."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    torch.manual_seed(0)
    B, L, D, E, k, decay = 2, 8, 16, 4, 2, 0.5
    plain = MoEFeedForward(D, E, k, threshold_decay=decay).train()
    checkpointed = MoEFeedForward(D, E, k, threshold_decay=decay).train()
    checkpointed.load_state_dict(plain.state_dict())
    forwards = []
    checkpointed.register_forward_hook(lambda *_: forwards.append(1))
    expected = None
    for _ in range(3):
        u = torch.randn(B, L, D, requires_grad=True)
        plain_record, record = ForwardRecord(), ForwardRecord()
        plain(u, plain_record).square().sum().backward()
        with set_checkpoint_early_stop(False):
            out = checkpoint(checkpointed, u, record, use_reentrant=False)
        first = record.moe[0]
        out.square().sum().backward()
        assert record.moe[0] is not first  # the recomputation wrote the record again ...
        update_thresholds(plain, [plain_record.kth_scores()])
        update_thresholds(checkpointed, [record.kth_scores()])
        kth = naive_kth(first.scores, k, E)
        expected = kth if expected is None else decay * expected + (1 - decay) * kth
    assert len(forwards) == 6  # two forwards per batch
    assert checkpointed.tau.item() == plain.tau.item()
    assert checkpointed.tau.item() == pytest.approx(expected, abs=1e-6)  # ... and each batch counted once


def counted_flops(layer, u) -> int:
    # the CPU expert kernel is a custom op; racedit registers its flop formula (moe_dispatch.py)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(u)
    return counter.get_total_flops()


@pytest.mark.parametrize("strategy", ["expert_race", "token_choice", "expert_choice", "le_choice"])
def test_macs_equal_torch_flop_counter_on_a_training_forward(strategy):
    """Training selects exactly N*k (token, expert) pairs in every strategy, so the flops torch counts on a
    real forward are the router (trunk D^2 + gating head D*E per token) plus N*k expert MLPs of width 4D/k."""
    B, L, D, E, k = 2, 8, 16, 8, 2
    torch.manual_seed(0)
    layer = MoEFeedForward(D, E, k, routing=strategy, target_dim=4).train()
    flops = counted_flops(layer, torch.randn(B, L, D))
    N = B * L
    assert flops == 2 * (N * (D * D + D * E) + N * k * 2 * D * (4 * D // k))
    assert flops == 2 * layer.macs(N)


def test_flop_counter_follows_the_threshold_selection_and_macs_is_its_mean_k_value():
    """In eval mode the threshold picks however many pairs score >= tau; the counter sees exactly those
    experts run (the count here from scores computed by hand from the router weights), and `macs` equals it
    when the pairs average k per token."""
    B, L, D, E, k = 2, 8, 16, 8, 2
    torch.manual_seed(1)
    layer = MoEFeedForward(D, E, k).eval()
    u = torch.randn(B, L, D)
    trunk, head = layer.router.trunk[0], layer.router.gate_head
    with torch.no_grad():  # identity gating: the scores are the gating head's logits
        scores = torch.nn.functional.gelu(u @ trunk.weight.T + trunk.bias, approximate="tanh") @ head.weight.T + head.bias
    N, hidden = B * L, 4 * D // k
    ranked = scores.flatten().sort(descending=True).values
    for pairs in (N * k, 5, N * E - 3):
        layer.tau.fill_(float(ranked[pairs - 1] + ranked[pairs]) / 2)  # midway: float rounding cannot move it
        layer.threshold_initialized.fill_(True)
        assert int((scores >= layer.tau).sum()) == pairs
        flops = counted_flops(layer, u)
        assert flops == 2 * (N * (D * D + D * E) + pairs * 2 * D * hidden), pairs
        assert (flops == 2 * layer.macs(N)) == (pairs == N * k)
