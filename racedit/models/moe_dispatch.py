"""Dispatch kernels of the MoE layer: selected (token, expert) pairs through the experts, weighted and combined.

`dispatch(x, mask, scores, experts)` computes y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]) sparsely.
The pairs are listed expert-major (sorted by expert, tokens ascending); how long that list is, is known in
one of two ways:

- from shapes (`num_selected` given): in training with the race local to the process every strategy
  selects exactly N*k pairs (docs/method/routing.md), and so does the eval top-K rule. The list has that
  static length (`nonzero_static`), per-expert counts and offsets stay on the device, and no Python
  control flow depends on the data, so the step traces into one graph (`torch.compile(fullgraph=True)`)
  and, with the grouped matmul, never stalls an accelerator.
- from the data (`num_selected=None`): the eval threshold (S >= tau) and race_scope="global" (this rank's
  share of the global selection) pick a data-dependent number of pairs. `torch.nonzero` sizes the list:
  one device-to-host read of the count on an accelerator; under torch.compile an unbacked size
  (`capture_dynamic_output_shape_ops`, set by `racedit.models.compile_model`), so a new count does not
  recompile.

The experts run through one of (`IMPLEMENTATIONS`, chosen at run time by `resolve_implementation`):
- "grouped_mm": torch's grouped matmul (`F.grouped_mm`, or `torch._grouped_mm` on older builds), autograd-native;
  offsets on the device. The accelerator's kernel, wherever the build supports the operands.
- "expert_loop": the custom op `racedit::expert_mlp` (forward and backward), one matmul per expert on slices
  read from the counts on the host. Opaque to the compiler, so it serves eager and compiled CPU alike (torch's
  float32 grouped matmul cannot be traced on CPU); in eager mode it measured level with the grouped matmul
  (bench/moe_step.py, docs/benchmarks.md).
- "padded_bmm": rows scattered into an (E, N, D) buffer (an expert holds at most N pairs, one per token) and
  two batched matmuls: static and free of host reads, but E/k times the expert FLOPs. Only where an
  accelerator's grouped matmul refuses the operands (e.g. float32) under torch.compile.

Letters (docs/method/README.md): N tokens, D width, E experts, h expert hidden width, n_sel selected pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

IMPLEMENTATIONS = ("auto", "grouped_mm", "expert_loop", "padded_bmm")

# (device type, dtype, D, h, traced) -> whether torch's grouped matmul runs forward and backward there.
_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype, int, int, bool], bool] = {}


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    fn = _grouped_mm_fn()
    if fn is None:
        return False
    try:
        # The probe needs autograd even when the caller runs under no_grad or inference_mode, and uses
        # constant inputs so it leaves the random number generators untouched.
        with torch.inference_mode(False), torch.enable_grad():
            a = torch.full((4, dim), 0.5, device=device_type, dtype=dtype, requires_grad=True)
            w1 = torch.full((3, dim, hidden), 0.01, device=device_type, dtype=dtype, requires_grad=True)
            w2 = torch.full((3, hidden, dim), 0.01, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([1, 1, 4], device=device_type, dtype=torch.int32)
            out = fn(fn(a, w1, offs=offs), w2, offs=offs)
            out.backward(torch.ones_like(out))
            return out.shape == (4, dim) and (device_type == "meta" or bool(torch.isfinite(a.grad).all()))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


@torch.compiler.assume_constant_result
def grouped_mm_supported(device_type: str, dtype: torch.dtype, dim: int, hidden: int, traced: bool = False) -> bool:
    """Whether the grouped matmul works (forward and backward, with an empty group) for these operands.

    traced: also under torch.compile, whose fake tensors run the op's meta kernel; that kernel may refuse
    what the device kernel runs (torch 2.14's refuses float32, which the CPU kernel accepts). Probed once per
    (device type, dtype, D, h, traced) on tiny inputs and cached; alignment rules of the kernels depend on the
    row sizes, hence D and h in the key. Under torch.compile the answer is a trace-time constant.
    """
    key = (device_type, dtype, dim, hidden, traced)
    if key not in _GROUPED_MM_SUPPORT:
        ok = _probe_grouped_mm(device_type, dtype, dim, hidden)
        _GROUPED_MM_SUPPORT[key] = ok and (not traced or _probe_grouped_mm("meta", dtype, dim, hidden))
    return _GROUPED_MM_SUPPORT[key]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def resolve_implementation(implementation: str, device: torch.device, dtype: torch.dtype, dim: int,
                           hidden: int) -> str:
    """The expert kernel "auto" stands for here (the others pass through):

    CPU -> "expert_loop" (a host read costs nothing there, and compiled CPU steps need it); an accelerator
    -> "grouped_mm" where the build supports the operands (under torch.compile: also its meta kernel), else
    "padded_bmm" while compiling (static, no host reads) and "expert_loop" in eager mode (no extra FLOPs).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown dispatch implementation {implementation!r}; allowed: {list(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    if device.type == "cpu":
        return "expert_loop"
    compiling = torch.compiler.is_compiling()
    if grouped_mm_supported(device.type, dtype, dim, hidden, traced=compiling):
        return "grouped_mm"
    return "padded_bmm" if compiling else "expert_loop"


def dispatch(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts, implementation: str = "auto",
             num_selected: int | None = None) -> torch.Tensor:
    """y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]) for each token i, computed sparsely: (N, D) -> (N, D).

    x (N, D), mask (N, E) bool, scores (N, E); experts has w1 (E, D, h), b1 (E, h), w2 (E, h, D), b2 (E, D), dim,
    hidden. num_selected: mask's number of True entries when the caller knows it from shapes (N*k for a local
    training selection or the eval top-K rule); None when it depends on the data (see the module doc).
    Tokens with no expert get zeros. implementation: see the module doc; "auto" is `resolve_implementation`.
    """
    dtype = compute_dtype(x)
    implementation = resolve_implementation(implementation, x.device, dtype, experts.dim, experts.hidden)
    if implementation == "expert_loop":
        return _dispatch_expert_loop(x, mask, scores, experts, dtype, num_selected)
    return dispatch_static(x, mask, scores, experts, num_selected, implementation)


def _pairs(mask: torch.Tensor, num_selected: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_index, token_index), each (n_sel,), of mask (N, E)'s True entries, expert-major."""
    t = mask.t()
    pairs = torch.nonzero(t) if num_selected is None else torch.nonzero_static(t, size=num_selected)
    return pairs[:, 0], pairs[:, 1]


def dispatch_static(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts, num_selected: int | None,
                    implementation: str = "grouped_mm") -> torch.Tensor:
    """`dispatch` through "grouped_mm" or "padded_bmm", kernels with no host reads of their own.

    With `num_selected` (the mask's exact count) the pair list has that static length; None sizes it with
    `torch.nonzero`. Per-expert counts and their running sums (the grouped matmul's offsets) are device
    tensors; the gate weighting is a multiply and the combine one `index_add_`. A wrong num_selected is a
    caller bug: too large pads the pair list with index -1, which index_select refuses.
    """
    if implementation not in ("grouped_mm", "padded_bmm"):
        raise ValueError(f"dispatch_static runs 'grouped_mm' or 'padded_bmm', not {implementation!r}")
    N, D = x.shape
    E = mask.shape[1]
    dtype = compute_dtype(x)
    expert_index, token_index = _pairs(mask, num_selected)
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    counts = mask.sum(dim=0)  # (E,) on the device
    w1, b1, w2, b2 = (p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    rows = x.to(dtype).index_select(0, token_index)
    if implementation == "grouped_mm":
        y = expert_rows(rows, expert_index, counts, w1, b1, w2, b2, "grouped_mm")
    else:
        # Each pair's slot in its expert's block: its rank in the expert-sorted list minus the expert's start.
        ends = counts.cumsum(0)
        slot = torch.arange(token_index.shape[0], device=x.device) - (ends - counts).index_select(0, expert_index)
        padded = rows.new_zeros(E, N, D).index_put((expert_index, slot), rows)
        hid = torch.baddbmm(b1.unsqueeze(1), padded, w1)
        out = torch.baddbmm(b2.unsqueeze(1), F.gelu(hid, approximate="tanh"), w2)
        y = out[expert_index, slot]
    return x.new_zeros(N, D, dtype=dtype).index_add_(0, token_index, y * weights.unsqueeze(1))


def _dispatch_expert_loop(x, mask, scores, experts, dtype, num_selected: int | None) -> torch.Tensor:
    """The CPU kernel: expert-sorted pairs, then `expert_mlp` (an opaque custom op) for the experts' matmuls.

    Gather, gate weighting and combine stay ordinary ops (autograd differentiates them; the compiler fuses
    them); only the per-expert matmuls, whose slices come from host-read counts, are hidden in the custom op.
    num_selected=None: the count is data dependent (threshold, global race); `torch.nonzero` sizes the list
    (under torch.compile an unbacked size, so no recompile when it changes).
    """
    E = mask.shape[1]
    expert_index, token_index = _pairs(mask, num_selected)
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    counts = mask.sum(dim=0)
    w1, b1, w2, b2 = (p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    rows = x.to(dtype).index_select(0, token_index)
    y = expert_rows(rows, expert_index, counts, w1, b1, w2, b2, "expert_loop")
    return x.new_zeros(x.shape, dtype=dtype).index_add_(0, token_index, y * weights.unsqueeze(1))


def expert_rows(rows: torch.Tensor, expert_index: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
                b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, implementation: str) -> torch.Tensor:
    """Each expert's MLP on its rows: rows (n_sel, D) sorted by expert, expert_index (n_sel,), counts (E,), the
    weights already in the compute dtype -> (n_sel, D). implementation: "grouped_mm" (offsets on the device)
    or "expert_loop" (the `expert_mlp` custom op). Shared by the local dispatch and the expert-parallel one."""
    if implementation == "grouped_mm":
        fn = _grouped_mm_fn()
        offs = counts.cumsum(0).to(torch.int32)
        hid = fn(rows, w1, offs=offs) + b1.index_select(0, expert_index)
        return fn(F.gelu(hid, approximate="tanh"), w2, offs=offs) + b2.index_select(0, expert_index)
    if implementation != "expert_loop":
        raise ValueError(f"expert_rows runs 'grouped_mm' or 'expert_loop', not {implementation!r}")
    return expert_mlp(rows, expert_index, counts, w1, b1, w2, b2)[0]


def _segments(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, from the per-expert counts (E,) (a host read)."""
    segments, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            segments.append((e, start, start + n))
            start += n
    return segments


@torch.library.custom_op("racedit::expert_mlp", mutates_args=())
def expert_mlp(rows: torch.Tensor, expert_index: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor,
               b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's MLP on its rows: rows (n_sel, D) sorted by expert, expert_index (n_sel,), counts (E,) ->
    (y (n_sel, D), pre (n_sel, h), the pre-activation the backward reuses).

    A custom op so torch.compile keeps it whole: the slices come from a host read of `counts`, which costs
    nothing on CPU, and only the matmuls run per expert (in place into buffers that start as the gathered
    biases). Used on CPU, eager and compiled (docs/benchmarks.md).
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        pre = b1.index_select(0, expert_index)
        segments = _segments(counts)
        for e, lo, hi in segments:
            pre[lo:hi].addmm_(rows[lo:hi], w1[e])
        act = F.gelu(pre, approximate="tanh")
        y = b2.index_select(0, expert_index)
        for e, lo, hi in segments:
            y[lo:hi].addmm_(act[lo:hi], w2[e])
    return y, pre


@expert_mlp.register_fake
def _(rows, expert_index, counts, w1, b1, w2, b2):
    return rows.new_empty(rows.shape), rows.new_empty(rows.shape[0], w1.shape[2])


@torch.library.custom_op("racedit::expert_mlp_backward", mutates_args=())
def expert_mlp_backward(grad_y: torch.Tensor, rows: torch.Tensor, pre: torch.Tensor, expert_index: torch.Tensor,
                        counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `expert_mlp` -> (rows, w1, b1, w2, b2); experts without rows get zero weight gradients."""
    E, D, h = w1.shape
    with torch.autocast(device_type=grad_y.device.type, enabled=False):
        segments = _segments(counts)
        act = F.gelu(pre, approximate="tanh")
        grad_w1, grad_w2 = _zeros_for_idle(w1, segments), _zeros_for_idle(w2, segments)
        grad_b2 = grad_y.new_zeros(E, D).index_add_(0, expert_index, grad_y)
        grad_act = torch.empty_like(act)
        for e, lo, hi in segments:
            torch.mm(act[lo:hi].t(), grad_y[lo:hi], out=grad_w2[e])
            torch.mm(grad_y[lo:hi], w2[e].t(), out=grad_act[lo:hi])
        grad_pre = torch.ops.aten.gelu_backward(grad_act, pre, approximate="tanh")
        del grad_act, act
        grad_b1 = grad_pre.new_zeros(E, h).index_add_(0, expert_index, grad_pre)
        grad_rows = torch.empty_like(rows)
        for e, lo, hi in segments:
            torch.mm(rows[lo:hi].t(), grad_pre[lo:hi], out=grad_w1[e])
            torch.mm(grad_pre[lo:hi], w1[e].t(), out=grad_rows[lo:hi])
    return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2


@expert_mlp_backward.register_fake
def _(grad_y, rows, pre, expert_index, counts, w1, w2):
    E, D, h = w1.shape
    return (rows.new_empty(rows.shape), w1.new_empty(w1.shape), w1.new_empty(E, h), w2.new_empty(w2.shape),
            w2.new_empty(E, D))


def _expert_mlp_setup_context(ctx, inputs, output):
    rows, expert_index, counts, w1, _, w2, _ = inputs
    ctx.save_for_backward(rows, output[1], expert_index, counts, w1, w2)


def _expert_mlp_backward(ctx, grad_y, _grad_pre):
    rows, pre, expert_index, counts, w1, w2 = ctx.saved_tensors
    grad_rows, grad_w1, grad_b1, grad_w2, grad_b2 = expert_mlp_backward(
        grad_y.contiguous(), rows, pre, expert_index, counts, w1, w2)
    return grad_rows, None, None, grad_w1, grad_b1, grad_w2, grad_b2


# `pre` is an output only for the backward to reuse; nothing differentiates through it.
expert_mlp.register_autograd(_expert_mlp_backward, setup_context=_expert_mlp_setup_context)


@register_flop_formula(torch.ops.racedit.expert_mlp)
def _expert_mlp_flops(rows_shape, expert_index_shape, counts_shape, w1_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's flop counter cannot see inside a custom op: two matmuls (n_sel, D) x (D, h) and (n_sel, h) x (h, D)."""
    n, D = rows_shape
    return 2 * 2 * n * D * w1_shape[2]


@register_flop_formula(torch.ops.racedit.expert_mlp_backward)
def _expert_mlp_backward_flops(grad_y_shape, rows_shape, pre_shape, *args, out_shape=None, **kwargs) -> int:
    """Four matmuls of the forward's size: the gradients of both weights and of both inputs."""
    n, D = rows_shape
    return 4 * 2 * n * D * pre_shape[1]


def _zeros_for_idle(like: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
    """An uninitialised per-expert gradient buffer shaped like `like`, zeroed only for experts with no rows."""
    grad = torch.empty_like(like)
    busy = {e for e, _, _ in segments}
    for e in range(like.shape[0]):
        if e not in busy:
            grad[e].zero_()
    return grad
