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

from racedit.models.expert_parallel import dispatch_expert_parallel, expert_slice
from racedit.models.moe_dispatch import (  # noqa: F401  (re-exported: the layer's dispatch API)
    IMPLEMENTATIONS,
    compute_dtype,
    dispatch,
    dispatch_static,
    grouped_mm_supported,
)
from racedit.models.records import ForwardRecord, MoELayerRecord
from racedit.models.routing import (
    BATCH_COUPLED,
    GATINGS,
    GLOBAL_SELECT_METHODS,
    STRATEGIES,
    gate,
    gate_logits_fp32,
    grouped_topk,
    select_global,
    select_global_op,
    threshold_mask,
    update_threshold_,
    world_size,
)
from racedit.presets import check_k_in_e


class Experts(nn.Module):
    """E GELU(tanh) MLPs D -> h -> D with batched weights w1 (E, D, h), b1 (E, h), w2 (E, h, D), b2 (E, D)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int):
        super().__init__()
        self.dim, self.hidden, self.num_experts = dim, hidden, num_experts
        self.first_expert = 0  # the global index of expert 0 here (expert parallelism holds a slice)
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
      every rank of the default process group when race_scope="global" (`routing.select_global` with
      `global_select`: "radix" histograms or the "gather" reference, same result);
    - eval: S >= threshold when a threshold is given (batch-independent), else the training rule on the eval batch.
    The optional target head D -> p*p*C predicts each token's diffusion target from r; it feeds the per-layer
    regularization loss only, so it runs only in training forwards that fill a record.

    The router holds no state besides its weights: the inference threshold and its EMA belong to the MoE
    layer (`MoEFeedForward.tau`), which passes the threshold in.
    """

    def __init__(self, dim: int, num_experts: int, k: int, routing: str = "expert_race", gating: str = "identity",
                 race_scope: str = "local", target_dim: int = 0, global_select: str = "radix"):
        super().__init__()
        if routing not in STRATEGIES:
            raise ValueError(f"unknown routing {routing!r}; allowed: {list(STRATEGIES)}")
        if gating not in GATINGS:
            raise ValueError(f"unknown gating {gating!r}; allowed: {list(GATINGS)}")
        if race_scope not in ("local", "global"):
            raise ValueError(f"unknown race_scope {race_scope!r}; allowed: ['local', 'global']")
        if global_select not in GLOBAL_SELECT_METHODS:
            raise ValueError(f"unknown global_select {global_select!r}; allowed: {list(GLOBAL_SELECT_METHODS)}")
        check_k_in_e(k, num_experts)
        self.num_experts, self.k = num_experts, k
        self.routing, self.gating, self.race_scope = routing, gating, race_scope
        self.global_select = global_select
        self.trunk = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"))
        self.gate_head = nn.Linear(dim, num_experts)
        self.target_head = nn.Linear(dim, target_dim) if target_dim > 0 else None

    def initialize_weights(self) -> None:
        """Xavier-uniform weights, zero biases."""
        for linear in (self.trunk[0], self.gate_head, self.target_head):
            if linear is not None:
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, threshold: torch.Tensor | None = None, predict_target: bool = True,
                threshold_ready: torch.Tensor | None = None) -> MoELayerRecord:
        """x (B, L, D) -> the routing of its N = B*L tokens, as the MoE layer records it:

        logits (N, E) fp32, scores S (N, E) (selection score and output weight), mask (N, E) bool,
        kth_score () the batch's K-th largest score (training, batch-coupled strategies; else None),
        target_pred (B, L, p*p*C) (training, with a target head and `predict_target`; else None), group (the
        process group the selection spanned, or None). threshold: () eval-mode tau, or None for the top-K rule.
        threshold_ready: () bool, whether tau is set; given, eval selects with S >= tau where it is True and with
        the top-K rule where not, decided on the device (what a compiled eval forward uses).
        """
        B, L, D = x.shape
        r = self.trunk(x.reshape(B * L, D))
        # Gate logits, gating and selection in fp32: bf16 logits tie often and would blur the race.
        logits = gate_logits_fp32(r, self.gate_head)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = gate(logits, self.gating)
            mask, kth = self.select(scores.view(B, L, self.num_experts), threshold, threshold_ready)
        target_pred = None
        if self.training and predict_target and self.target_head is not None:
            target_pred = self.target_head(r).view(B, L, -1)
        return MoELayerRecord(logits=logits, scores=scores, mask=mask.reshape(B * L, self.num_experts),
                              target_pred=target_pred, kth_score=kth, group=self.selection_group(),
                              global_select=self.global_select)

    def select(self, scores: torch.Tensor, threshold: torch.Tensor | None = None,
               threshold_ready: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """S (B, L, E) -> (bool mask (B, L, E), the batch's K-th largest score () or None); see the class doc.

        For strategies with several groups the K-th score is the mean over groups of each group's K-th
        largest score; token choice has none (its selection does not depend on the batch).
        """
        if self.training:
            if self.race_scope == "global":
                # compiled: the same call as a custom op, which keeps the collectives out of the graph
                select = select_global_op if torch.compiler.is_compiling() else select_global
                mask, kth = select(scores.detach(), self.routing, self.k, method=self.global_select)
            else:
                mask, kth_per_group = grouped_topk(scores, self.routing, self.k)
                kth = kth_per_group.float().mean()
            return mask, (kth if self.routing in BATCH_COUPLED else None)
        if threshold is not None and threshold_ready is not None:
            mask = torch.cond(threshold_ready, threshold_mask, self._top_k_mask, (scores, threshold))
            return mask, None
        if threshold is not None:
            return threshold_mask(scores, threshold), None
        return grouped_topk(scores, self.routing, self.k)[0], None

    def _top_k_mask(self, scores: torch.Tensor, _threshold: torch.Tensor) -> torch.Tensor:
        return grouped_topk(scores, self.routing, self.k)[0]

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
                 inference_routing: str = "threshold", target_dim: int = 0, layer_index: int = 0,
                 global_select: str = "radix"):
        super().__init__()
        if inference_routing not in ("threshold", "topk"):
            raise ValueError(f"unknown inference_routing {inference_routing!r}; allowed: ['threshold', 'topk']")
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay}")
        self.router = Router(dim, num_experts, k, routing, gating, race_scope, target_dim, global_select)
        self.dim, self.num_experts, self.k = dim, num_experts, k
        self.threshold_decay, self.inference_routing = threshold_decay, inference_routing
        self.target_dim, self.layer_index = target_dim, layer_index
        self.hidden = int(round(mlp_ratio * dim / k))
        self.experts = Experts(dim, self.hidden, num_experts, k)
        # Inference threshold (fp32 scalar) and whether a training batch has set it yet.
        self.register_buffer("tau", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))
        self._warned_uninitialized = False
        # The dispatch kernel (moe_dispatch.IMPLEMENTATIONS); "auto" picks at run time. Not a config key: benchmarks
        # and tests set it to compare kernels.
        self.dispatch_implementation = "auto"
        # Expert parallelism (`shard_experts`): the process group whose processes hold E/n_ep experts each, or None.
        self.expert_group = None
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
        if torch.compiler.is_compiling() and not self.training and self.uses_threshold:
            # whether tau is set is decided on the device (torch.cond): no host read, no guard on the buffer
            threshold, ready = self.tau, self.threshold_initialized
        else:
            threshold, ready = self.inference_threshold(), None
        # the target head only feeds a loss that reads the record: without one it would be wasted compute
        routing = self.router(u, threshold, predict_target=record is not None, threshold_ready=ready)
        if self.expert_group is not None:  # the experts are spread over the group's processes
            y = dispatch_expert_parallel(u.reshape(B * L, D), routing.mask, routing.scores, self.experts,
                                         self.expert_group, self.dispatch_implementation)
        else:
            y = dispatch(u.reshape(B * L, D), routing.mask, routing.scores, self.experts,
                         self.dispatch_implementation, num_selected=self.selected_count(B * L, threshold, routing.group))
        if record is not None:
            record.moe[self.layer_index] = routing
        return y.view(B, L, D)

    def selected_count(self, num_tokens: int, threshold: torch.Tensor | None, group) -> int | None:
        """How many (token, expert) pairs this forward's mask holds when shapes alone say it: num_tokens * k for a
        top-K selection local to the process (training with race_scope="local" or one rank, eval's top-K rule),
        every strategy selecting exactly N*k (docs/method/routing.md). None (count it) for the threshold and a
        selection spanning several ranks, whose counts depend on the data."""
        if threshold is not None or (group is not None and world_size(group) > 1):
            return None
        return num_tokens * self.k

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


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE layers of `model`, in model order."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


@torch.no_grad()
def shard_experts(model: nn.Module, group) -> nn.Module:
    """Expert parallelism, in place: every MoE layer of `model` keeps the experts this process holds in the
    expert group `group` (`expert_slice`: E_loc = E/n_ep consecutive experts) and dispatches through the group. The
    weights are slices of the whole model's, so every process must hold the same model first (same seed or
    loaded weights). Returns `model`; a group of one leaves it whole."""
    if world_size(group) == 1:
        return model
    for layer in moe_layers(model):
        experts = layer.experts
        part = expert_slice(experts.num_experts, group)
        for name in ("w1", "b1", "w2", "b2"):
            old = getattr(experts, name)
            setattr(experts, name, nn.Parameter(old[part].clone(), requires_grad=old.requires_grad))
        experts.first_expert, experts.num_experts = part.start, part.stop - part.start
        layer.expert_group = group
    return model
