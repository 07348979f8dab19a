"""Mixture-of-Experts feed-forward for the DiT block: router (trunk, gating head, target head), experts, dispatch.

"k-in-E" fine-grained experts (Race-DiT, arXiv 2503.16057, Fig. 2 and Table 5): E experts, each a GELU(tanh)
MLP of hidden h = mlp_ratio * D / k, so k active experts per token on average cost what the dense MLP costs.
A token may get 0..E experts; there is no capacity limit, and a token with none gets a zero output (it keeps
its residual). Routing rules, gating and the inference threshold: docs/method/routing.md, threshold.md.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, D model width, E experts,
k experts per token on average, h expert hidden width, K pairs selected per routing group, n_sel selected
(token, expert) pairs of a mask, p patch side, C input channels (the target head predicts p*p*C values per
token). S is the gate values G(logits), the routing scores.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from racedit.models.records import ForwardRecord, MoELayerRecord
from racedit.models.routing import (
    BATCH_COUPLED,
    GATINGS,
    STRATEGIES,
    gate,
    gate_logits_fp32,
    grouped_topk,
    grouped_topk_global,
    threshold_mask,
    update_threshold_,
)
from racedit.presets import check_k_in_e

# (device type, dtype, D, h) -> whether torch's grouped matmul runs forward and backward there.
_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype, int, int], bool] = {}


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether the grouped matmul works (forward and backward, with an empty group) for these operands.

    Probed once per (device type, dtype, D, h) on tiny inputs and cached; alignment rules of the kernels
    depend on the row sizes, hence D and h in the key.
    """
    key = (device.type, dtype, dim, hidden)
    if key not in _GROUPED_MM_SUPPORT:
        fn = _grouped_mm_fn()
        ok = fn is not None
        if ok:
            try:
                # The probe needs autograd even when the caller runs under no_grad or inference_mode, and
                # uses constant inputs so it leaves the random number generators untouched.
                with torch.inference_mode(False), torch.enable_grad():
                    a = torch.full((4, dim), 0.5, device=device, dtype=dtype, requires_grad=True)
                    w1 = torch.full((3, dim, hidden), 0.01, device=device, dtype=dtype, requires_grad=True)
                    w2 = torch.full((3, hidden, dim), 0.01, device=device, dtype=dtype, requires_grad=True)
                    offs = torch.tensor([1, 1, 4], device=device, dtype=torch.int32)
                    out = fn(fn(a, w1, offs=offs), w2, offs=offs)
                    out.backward(torch.ones_like(out))
                    ok = out.shape == (4, dim) and bool(torch.isfinite(a.grad).all())
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_SUPPORT[key] = ok
    return _GROUPED_MM_SUPPORT[key]


class Experts(nn.Module):
    """E GELU(tanh) MLPs D -> h -> D with batched weights w1 (E, D, h), b1 (E, h), w2 (E, h, D), b2 (E, D)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int):
        super().__init__()
        self.dim, self.hidden, self.num_experts = dim, hidden, num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        # What one token uses on average; count_params reads it for the "activated" count.
        self.activated_fraction = k / num_experts
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform per expert matrix (fan_in D, fan_out h), zero biases: DiT's MLP init per expert."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden))
        with torch.no_grad():
            self.w1.uniform_(-bound, bound)
            self.w2.uniform_(-bound, bound)
            self.b1.zero_()
            self.b2.zero_()

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: (n, D) -> (n, D)."""
        w1, b1, w2, b2 = (p.to(x.dtype) for p in (self.w1[e], self.b1[e], self.w2[e], self.b2[e]))
        return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1), approximate="tanh"), w2)


class _FusedExpertLoop(torch.autograd.Function):
    """Gather, the k-in-E experts, gate weighting and combine as one autograd node with a hand-written backward.

    Rows are expert-sorted, so each expert's rows are one contiguous slice. Per expert only the matmuls
    run in the loop (in place into preallocated (n_sel, h) / (n_sel, D) buffers that start as the gathered biases);
    bias gradients are one `index_add_` each. Compared with composing autograd ops per expert this saves
    the concatenations, the split/stack of the backward and most per-expert kernel launches (each one an
    OpenMP region on CPU, which is what costs most when the cores are shared), and writes the weight
    gradients straight into (E, D, h) / (E, h, D).
    """

    @staticmethod
    def forward(ctx, x, token_index, expert_index, weights, w1, b1, w2, b2, counts):
        with torch.autocast(device_type=x.device.type, enabled=False):
            rows = x.index_select(0, token_index)
            segments, start = [], 0
            for e, n in enumerate(counts):
                if n:
                    segments.append((e, start, start + n))
                    start += n
            pre = b1.index_select(0, expert_index)
            for e, lo, hi in segments:
                pre[lo:hi].addmm_(rows[lo:hi], w1[e])
            act = F.gelu(pre, approximate="tanh")
            y = b2.index_select(0, expert_index)
            for e, lo, hi in segments:
                y[lo:hi].addmm_(act[lo:hi], w2[e])
            out = x.new_zeros(x.shape).index_add_(0, token_index, y * weights.unsqueeze(1))
        ctx.segments = segments
        ctx.save_for_backward(rows, pre, act, y, token_index, expert_index, weights, w1, w2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rows, pre, act, y, token_index, expert_index, weights, w1, w2 = ctx.saved_tensors
        segments = ctx.segments
        E, D, h = w1.shape
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            grad_y = grad_out.index_select(0, token_index)
            grad_weights = torch.linalg.vecdot(grad_y, y) if ctx.needs_input_grad[3] else None
            grad_y.mul_(weights.unsqueeze(1))
            grad_w1, grad_w2 = _zeros_for_idle(w1, segments), _zeros_for_idle(w2, segments)
            grad_b2 = grad_y.new_zeros(E, D).index_add_(0, expert_index, grad_y)
            grad_act = torch.empty_like(act)
            for e, lo, hi in segments:
                torch.mm(act[lo:hi].t(), grad_y[lo:hi], out=grad_w2[e])
                torch.mm(grad_y[lo:hi], w2[e].t(), out=grad_act[lo:hi])
            grad_pre = torch.ops.aten.gelu_backward(grad_act, pre, approximate="tanh")
            del grad_act
            grad_b1 = grad_pre.new_zeros(E, h).index_add_(0, expert_index, grad_pre)
            grad_rows = torch.empty_like(rows)
            for e, lo, hi in segments:
                torch.mm(rows[lo:hi].t(), grad_pre[lo:hi], out=grad_w1[e])
                torch.mm(grad_pre[lo:hi], w1[e].t(), out=grad_rows[lo:hi])
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_out.new_zeros(grad_out.shape).index_add_(0, token_index, grad_rows)
        return grad_x, None, None, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2, None


def _zeros_for_idle(like: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
    """An uninitialised per-expert gradient buffer shaped like `like`, zeroed only for experts with no tokens."""
    grad = torch.empty_like(like)
    busy = {e for e, _, _ in segments}
    for e in range(like.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad


def _grouped_mm_experts(rows: torch.Tensor, expert_index: torch.Tensor, counts: list[int], w1, b1, w2, b2):
    """Expert-sorted rows (n_sel, D) through the experts with the grouped matmul (autograd-native) -> (n_sel, D)."""
    fn = _grouped_mm_fn()
    ends = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
    hid = fn(rows, w1, offs=ends) + b1.index_select(0, expert_index)
    return fn(F.gelu(hid, approximate="tanh"), w2, offs=ends) + b2.index_select(0, expert_index)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


IMPLEMENTATIONS = ("auto", "grouped_mm", "fused_loop")


def dispatch(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts: Experts,
             implementation: str = "auto") -> torch.Tensor:
    """y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]) for each token i, computed sparsely: (N, D) -> (N, D).

    Selected (token, expert) pairs are listed sorted by expert (one `nonzero` over the expert-major mask),
    gathered, run through the experts, weighted and combined with one `index_add_`. One host
    synchronisation: the per-expert counts. Tokens with no expert get zeros. x (N, D), mask (N, E) bool,
    scores (N, E).

    implementation: "grouped_mm" (torch's grouped matmul, autograd-native), "fused_loop" (`_FusedExpertLoop`)
    or "auto": grouped_mm on accelerators whose build supports it for the dtype, fused_loop otherwise. On
    CPU the build's grouped matmul is itself a per-group loop of matmuls; the fused loop measured a few
    percent faster there (it also handles biases, weighting and combine without extra autograd nodes).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown dispatch implementation {implementation!r}; allowed: {list(IMPLEMENTATIONS)}")
    N, D = x.shape
    E = mask.shape[1]
    dtype = compute_dtype(x)
    counts = mask.sum(dim=0).tolist()
    total = sum(counts)
    if total == 0:
        # Keep the graph connected so callers can always backpropagate through the layer.
        return x.new_zeros(N, D, dtype=dtype) + 0.0 * scores.sum().to(dtype)
    # nonzero over the (E, N) view lists pairs expert-major, tokens ascending: already sorted by expert.
    pairs = torch.nonzero_static(mask.t(), size=total)
    expert_index, token_index = pairs[:, 0], pairs[:, 1]
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    params = [p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2)]
    if implementation == "auto":
        grouped = x.device.type != "cpu" and grouped_mm_supported(x.device, dtype, experts.dim, experts.hidden)
        implementation = "grouped_mm" if grouped else "fused_loop"
    if implementation == "fused_loop":
        return _FusedExpertLoop.apply(x.to(dtype), token_index, expert_index, weights, *params, counts)
    rows = x.to(dtype).index_select(0, token_index)
    out_rows = _grouped_mm_experts(rows, expert_index, counts, *params) * weights.unsqueeze(1)
    return x.new_zeros(N, D, dtype=dtype).index_add_(0, token_index, out_rows)


def dispatch_reference(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts: Experts) -> torch.Tensor:
    """Plain per-expert loop with boolean indexing; the readable definition `dispatch` is tested against."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tokens = mask[:, e].nonzero().squeeze(1)
        if tokens.numel():
            y = experts.expert(e, x[tokens]) * scores[tokens, e].to(dtype).unsqueeze(1)
            out = out.index_add(0, tokens, y)
    return out


class Router(nn.Module):
    """Which experts each token uses, and with what weight, under one of the six grouped top-K strategies.

    trunk r = GELU(Linear(D, D)(x)), gating head logits = Linear(D, E)(r), gate values S = G(logits) with G
    the gating function (identity, sigmoid or softmax), then the selection:
    - training: the exact grouped top-K of `routing` over the batch (`routing.grouped_topk`), over the batch of
      every rank of the default process group when race_scope="global";
    - eval: S >= threshold when a threshold is given (batch-independent), else the training rule on the eval batch.
    The optional target head D -> p*p*C predicts each token's diffusion target from r; it feeds the per-layer
    regularization loss only, so it runs only in training forwards that fill a record.

    The router holds no state besides its weights: the inference threshold and its EMA belong to the MoE
    layer (`MoEFeedForward.tau`), which passes the threshold in.
    """

    def __init__(self, dim: int, num_experts: int, k: int, routing: str = "expert_race", gating: str = "identity",
                 race_scope: str = "local", target_dim: int = 0):
        super().__init__()
        if routing not in STRATEGIES:
            raise ValueError(f"unknown routing {routing!r}; allowed: {list(STRATEGIES)}")
        if gating not in GATINGS:
            raise ValueError(f"unknown gating {gating!r}; allowed: {list(GATINGS)}")
        if race_scope not in ("local", "global"):
            raise ValueError(f"unknown race_scope {race_scope!r}; allowed: ['local', 'global']")
        check_k_in_e(k, num_experts)
        self.num_experts, self.k = num_experts, k
        self.routing, self.gating, self.race_scope = routing, gating, race_scope
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"))
        self.gate_head = nn.Linear(dim, num_experts)
        self.target_head = nn.Linear(dim, target_dim) if target_dim > 0 else None

    def initialize_weights(self) -> None:
        """Xavier-uniform weights, zero biases."""
        for linear in (self.trunk[0], self.gate_head, self.target_head):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, threshold: torch.Tensor | None = None,
                predict_target: bool = True) -> MoELayerRecord:
        """x (B, L, D) -> the routing of its N = B*L tokens, as the MoE layer records it:

        logits (N, E) fp32, scores S (N, E) (selection score and output weight), mask (N, E) bool,
        kth_score () the batch's K-th largest score (training, batch-coupled strategies; else None),
        target_pred (B, L, p*p*C) (training, with a target head and `predict_target`; else None), group (the
        process group the selection spanned, or None). threshold: () eval-mode tau, or None for the top-K rule.
        """
        B, L, D = x.shape
        r = self.trunk(x.reshape(B * L, D))
        # Gate logits, gating and selection in fp32: bf16 logits tie often and would blur the race.
        logits = gate_logits_fp32(r, self.gate_head)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = gate(logits, self.gating)
            mask, kth = self.select(scores.view(B, L, self.num_experts), threshold)
        target_pred = None
        if self.training and predict_target and self.target_head is not None:
            target_pred = self.target_head(r).view(B, L, -1)
        return MoELayerRecord(logits=logits, scores=scores, mask=mask.reshape(B * L, self.num_experts),
                              target_pred=target_pred, kth_score=kth, group=self.selection_group())

    def select(self, scores: torch.Tensor,
               threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S (B, L, E) -> (bool mask (B, L, E), the batch's K-th largest score () or None); see the class doc.

        For strategies with several groups the K-th score is the mean over groups of each group's K-th
        largest score; token choice has none (its selection does not depend on the batch).
        """
        if self.training:
            if self.race_scope == "global":
                mask, kth_per_group = grouped_topk_global(scores, self.routing, self.k)
            else:
                mask, kth_per_group = grouped_topk(scores, self.routing, self.k)
            return mask, (kth_per_group.float().mean() if self.routing in BATCH_COUPLED else None)
        if threshold is not None:
            return threshold_mask(scores, threshold), None
        return grouped_topk(scores, self.routing, self.k)[0], None

    def selection_group(self):
        """The process group a forward's selection spans now, or None when it is local to the process."""
        spans_ranks = self.training and self.race_scope == "global" and dist.is_available() and dist.is_initialized()
        return dist.group.WORLD if spans_ranks else None

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, k={self.k}, routing={self.routing}, gating={self.gating}, "
                f"race_scope={self.race_scope}")


class MoEFeedForward(nn.Module):
    """MoE replacement of the DiT MLP: (B, L, D) -> (B, L, D): router, then dispatch to the experts and combine.

    Training: exact grouped top-K on S (the `Router`). For the batch-coupled strategies the buffer `tau`
    is the inference threshold, an EMA of the training batches' K-th largest score. The forward only records
    that score (`MoELayerRecord.kth_score`); the training step applies it after the backward
    (`update_thresholds`), so no forward moves tau: not a recomputed one under activation checkpointing,
    nor calibration's or a probe's training-mode forwards. Eval: `S >= tau` when inference_routing="threshold"
    (batch-independent), else the training rule on the eval batch. Eval selection is always local.
    """

    def __init__(self, dim: int, num_experts: int, k: int, mlp_ratio: float = 4.0, routing: str = "expert_race",
                 gating: str = "identity", race_scope: str = "local", threshold_decay: float = 0.99,
                 inference_routing: str = "threshold", target_dim: int = 0, layer_index: int = 0):
        super().__init__()
        if inference_routing not in ("threshold", "topk"):
            raise ValueError(f"unknown inference_routing {inference_routing!r}; allowed: ['threshold', 'topk']")
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        self.router = Router(dim, num_experts, k, routing, gating, race_scope, target_dim)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.threshold_decay, self.inference_routing = threshold_decay, inference_routing
        self.target_dim, self.layer_index = target_dim, layer_index
        self.hidden = int(round(mlp_ratio * dim / k))
        self.experts = Experts(dim, self.hidden, num_experts, k)
        # Inference threshold (fp32 scalar) and whether a training batch has set it yet.
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))
        self._warned_uninitialized = False
        self.initialize_weights()

    def _apply(self, fn, recurse=True):
        # Module-wide dtype casts (.double(), .to(torch.bfloat16)) cast every floating buffer, and torch has no
        # per-buffer opt-out. A bf16 tau would move the threshold by up to 2^-8 of its value (a visible change
        # in the share of pairs S >= tau selects) and make the later EMA steps bf16 arithmetic; so tau follows
        # the device of the cast but stays float32. (Autocast alone never touches buffers.)
        tau = self.tau
        super()._apply(fn, recurse)
        self.tau = tau.to(device=self.tau.device, dtype=torch.float32)
        return self

    def initialize_weights(self) -> None:
        """Router: xavier-uniform weights, zero biases; experts: xavier-uniform per expert matrix, zero biases."""
        self.router.initialize_weights()
        self.experts.initialize_weights()

    @property
    def uses_threshold(self) -> bool:
        """Whether eval mode selects with `S >= tau` (batch-coupled strategy and inference_routing=threshold)."""
        return self.router.routing in BATCH_COUPLED and self.inference_routing == "threshold"

    def inference_threshold(self) -> torch.Tensor | None:
        """tau when this forward selects with S >= tau; None in training mode, for the top-K rule, and while no
        training batch has set tau (eval then runs the training rule on the eval batch, with a warning once)."""
        if self.training or not self.uses_threshold:
            return None
        if bool(self.threshold_initialized):
            return self.tau
        if not self._warned_uninitialized:
            warnings.warn(f"MoE layer {self.layer_index}: inference threshold never set by a training batch; "
                          "eval mode uses the training top-K rule on the eval batch", stacklevel=2)
            self._warned_uninitialized = True
        return None

    @torch.no_grad()
    def update_threshold(self, kth_score: torch.Tensor) -> None:
        """One EMA step of tau towards a training batch's K-th largest score (), `MoELayerRecord.kth_score`:
        tau <- kth_score the first time, else decay * tau + (1 - decay) * kth_score (in float32)."""
        update_threshold_(self.tau, self.threshold_initialized, kth_score, self.threshold_decay)

    def forward(self, u: torch.Tensor, record: ForwardRecord | None = None) -> torch.Tensor:
        """u (B, L, D), the adaLN-modulated LayerNorm output -> (B, L, D); fills record.moe[layer_index].

        The record is written by assignment: a forward recomputed under activation checkpointing replaces
        its entry, so each training forward is counted once.
        """
        B, L, D = u.shape
        # the target head only feeds a loss that reads the record: without one it would be wasted compute
        routing = self.router(u, self.inference_threshold(), predict_target=record is not None)
        y = dispatch(u.reshape(B * L, D), routing.mask, routing.scores, self.experts)
        if record is not None:
            record.moe[self.layer_index] = routing
        return y.view(B, L, D)

    def macs(self, num_tokens: int) -> int:
        """Forward multiply-accumulates for `num_tokens` tokens at the mean k experts per token: router trunk
        and gating head plus k experts (the target head, a training-only loss head, is not counted)."""
        router = self.dim * self.dim + self.dim * self.num_experts
        return num_tokens * (router + self.k * 2 * self.dim * self.hidden)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, experts={self.num_experts}, k={self.k}, hidden={self.hidden}"


def threshold_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE layers of `model` that select with `S >= tau` in eval mode, in model order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.uses_threshold]


def update_thresholds(model: nn.Module, kth_scores: Iterable[Mapping[int, torch.Tensor]]) -> None:
    """Apply training forwards' recorded K-th scores to the inference thresholds of `model`'s MoE layers.

    kth_scores: one mapping per forward, in the order the forwards ran (`ForwardRecord.kth_scores()`: layer
    index -> K-th largest score ()); each is one EMA step of that layer's tau. The training loop calls this
    once per optimizer step with the step's micro-batches, skipped (non-finite) steps included.
    """
    layers = {m.layer_index: m for m in model.modules() if isinstance(m, MoEFeedForward)}
    for forward in kth_scores:
        for index, kth in forward.items():
            layers[index].update_threshold(kth)


@contextlib.contextmanager
def local_selection(model: nn.Module) -> Iterator[None]:
    """Inside, training-mode forwards of `model` select within this process's batch: no collective runs even
    under race_scope="global" (calibration and upcycling probes, whose batch plays the global batch)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    scopes = [r.race_scope for r in routers]
    try:
        for r in routers:
            r.race_scope = "local"
        yield
    finally:
        for r, scope in zip(routers, scopes):
            r.race_scope = scope
