"""Dispatch kernels of the MoE layer: selected (token, expert) pairs through the experts, weighted and combined.

`dispatch(x, mask, scores, experts)` computes y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]) sparsely.
Two ways to know how many pairs there are, kept apart:

- static (`num_selected` given): the count is known from shapes. In training with the race local to the
  process every strategy selects exactly N*k pairs (docs/method/routing.md), and so does the eval top-K rule.
  The pair list has that static length (`nonzero_static`), per-expert counts and offsets stay on the device,
  and no Python control flow depends on the data: nothing reads a tensor on the host, so the path traces
  into one graph (`torch.compile(fullgraph=True)`) and does not stall an accelerator.
- counted (`num_selected=None`): the eval threshold (S >= tau) and race_scope="global" (the per-rank share of
  the global selection) pick a data-dependent number of pairs; it is read once on the host.

The experts run through one of (`IMPLEMENTATIONS`, chosen at run time by `resolve_implementation`):
- "grouped_mm": torch's grouped matmul (`F.grouped_mm`, or `torch._grouped_mm` on older builds), autograd-native;
  offsets on the device. Used wherever the build supports the operands (`grouped_mm_supported`).
- "padded_bmm": rows scattered into an (E, N, D) buffer (an expert holds at most N pairs, one per token) and
  two batched matmuls. Static and host-read free, but E/k times the expert FLOPs: only where the grouped
  matmul is missing (e.g. float64 on CPU) and the path must stay static (compiling).
- "fused_loop": `_FusedExpertLoop`, one autograd node with a hand-written backward that loops over experts on
  host-read counts. Eager only; on eager CPU it is the default because it measured faster than the grouped
  matmul there (bench/moe_step.py, docs/benchmarks.md).

Letters (docs/method/README.md): N tokens, D width, E experts, h expert hidden width, n_sel selected pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "grouped_mm", "padded_bmm", "fused_loop")

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

    eager CPU -> "fused_loop" (measured faster than the grouped matmul on CPU; a host read costs nothing there);
    otherwise "grouped_mm" where the build supports the operands; else "fused_loop" in eager mode (no extra
    FLOPs) and "padded_bmm" while compiling (static, no host reads).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown dispatch implementation {implementation!r}; allowed: {list(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    compiling = torch.compiler.is_compiling()
    if device.type == "cpu" and not compiling:
        return "fused_loop"
    if grouped_mm_supported(device.type, dtype, dim, hidden, traced=compiling):
        return "grouped_mm"
    return "padded_bmm" if compiling else "fused_loop"


def dispatch(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts, implementation: str = "auto",
             num_selected: int | None = None) -> torch.Tensor:
    """y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]) for each token i, computed sparsely: (N, D) -> (N, D).

    x (N, D), mask (N, E) bool, scores (N, E); experts has w1 (E, D, h), b1 (E, h), w2 (E, h, D), b2 (E, D), dim,
    hidden. num_selected: mask's number of True entries when the caller knows it from shapes (N*k for a local
    training selection or the eval top-K rule): the static path, no host reads unless the "fused_loop" kernel is
    chosen. None: the count is read from the mask (one host synchronisation). Tokens with no expert get zeros.
    implementation: see the module doc; "auto" is `resolve_implementation`.
    """
    dtype = compute_dtype(x)
    implementation = resolve_implementation(implementation, x.device, dtype, experts.dim, experts.hidden)
    if implementation == "fused_loop":
        return _dispatch_fused_loop(x, mask, scores, experts, dtype)
    if num_selected is None:
        num_selected = int(mask.sum())  # counted path: the one host read
        if num_selected == 0:
            return _no_pairs(x, scores, dtype)
    return dispatch_static(x, mask, scores, experts, num_selected, implementation)


def dispatch_static(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts, num_selected: int,
                    implementation: str = "grouped_mm") -> torch.Tensor:
    """`dispatch` for a mask with exactly `num_selected` True entries, with static shapes and no host reads.

    The pairs, listed expert-major (so sorted by expert, tokens ascending), have length n_sel = num_selected;
    the per-expert counts and their running sums (the grouped matmul's offsets) are device tensors; the gate
    weighting is a multiply and the combine one `index_add_`. implementation: "grouped_mm" or "padded_bmm".
    A wrong num_selected is a caller bug: too large pads the pair list with index -1, which index_select refuses.
    """
    if implementation not in ("grouped_mm", "padded_bmm"):
        raise ValueError(f"dispatch_static runs 'grouped_mm' or 'padded_bmm', not {implementation!r}")
    N, D = x.shape
    E = mask.shape[1]
    dtype = compute_dtype(x)
    pairs = torch.nonzero_static(mask.t(), size=num_selected)
    expert_index, token_index = pairs[:, 0], pairs[:, 1]
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    counts = mask.sum(dim=0)  # (E,) on the device
    ends = counts.cumsum(0)
    w1, b1, w2, b2 = (p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    rows = x.to(dtype).index_select(0, token_index)
    if implementation == "grouped_mm":
        fn = _grouped_mm_fn()
        offs = ends.to(torch.int32)
        hid = fn(rows, w1, offs=offs) + b1.index_select(0, expert_index)
        y = fn(F.gelu(hid, approximate="tanh"), w2, offs=offs) + b2.index_select(0, expert_index)
    else:
        # Each pair's slot in its expert's block: its rank in the expert-sorted list minus the expert's start.
        slot = torch.arange(num_selected, device=x.device) - (ends - counts).index_select(0, expert_index)
        padded = rows.new_zeros(E, N, D).index_put((expert_index, slot), rows)
        hid = torch.baddbmm(b1.unsqueeze(1), padded, w1)
        out = torch.baddbmm(b2.unsqueeze(1), F.gelu(hid, approximate="tanh"), w2)
        y = out[expert_index, slot]
    return x.new_zeros(N, D, dtype=dtype).index_add_(0, token_index, y * weights.unsqueeze(1))


def _no_pairs(x: torch.Tensor, scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Keep the graph connected so callers can always backpropagate through the layer.
    return x.new_zeros(x.shape, dtype=dtype) + 0.0 * scores.sum().to(dtype)


def _dispatch_fused_loop(x, mask, scores, experts, dtype) -> torch.Tensor:
    """The eager kernel: per-expert counts read on the host, then `_FusedExpertLoop`."""
    E = mask.shape[1]
    counts = mask.sum(dim=0).tolist()
    total = sum(counts)
    if total == 0:
        return _no_pairs(x, scores, dtype)
    pairs = torch.nonzero_static(mask.t(), size=total)
    expert_index, token_index = pairs[:, 0], pairs[:, 1]
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    params = [p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2)]
    return _FusedExpertLoop.apply(x.to(dtype), token_index, expert_index, weights, *params, counts)


class _FusedExpertLoop(torch.autograd.Function):
    """Gather, the k-in-E experts, gate weighting and combine as one autograd node with a hand-written backward.

    Rows are expert-sorted, so each expert's rows are one contiguous slice. Per expert only the matmuls
    run in the loop (in place into preallocated (n_sel, h) / (n_sel, D) buffers that start as the gathered biases);
    bias gradients are one `index_add_` each. Compared with composing autograd ops per expert this saves
    the concatenations, the split/stack of the backward and most per-expert kernel launches (each one an
    OpenMP region on CPU, which is what costs most when the cores are shared), and writes the weight
    gradients straight into (E, D, h) / (E, h, D). The slices come from host-read counts: eager only.
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
