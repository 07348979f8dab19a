"""Expert parallelism: each process of an expert group holds E/n_ep of a layer's experts, rows travel to them.

Routing is untouched: every process routes its own tokens over all E experts with the full router (local or
global race, any strategy, the eval threshold), so the mask and the scores are what one process would
compute. Only the experts' work moves. Process j of an expert group of n_ep holds the experts
j*E_loc .. (j+1)*E_loc - 1 (`shard_experts`). One MoE forward (`dispatch_expert_parallel`):

1. the selected (token, expert) pairs, sorted by expert, are already sorted by the process holding the expert;
   each process sends the others its per-expert counts (`all_to_all_single` of E integers), which gives
   every split size of the exchange;
2. the rows x[token] travel to the experts' processes (`all_to_all_single`: ~n_sel * D values out, as many
   in on average), are sorted by local expert, run through the experts (the grouped matmul, or the CPU
   expert loop), and travel back the same way (the inverse exchange);
3. each process weights its own rows by their gate values and sums them per token, as the local dispatch does.

The backward mirrors it: autograd runs the inverse exchanges on the gradients (`all_to_all_rows` and
`all_to_all_rows_sized` are custom ops with registered autograd, opaque to torch.compile, which sees an
unbacked number of received rows). So an expert's weight gradient sums over the rows of every process of
the expert group; `racedit.training.expert_sharding` reduces it over the data-parallel replicas of the shard.
Everything else is index_select, repeat_interleave with its output size, sort and `expert_rows`, so a model
compiles whole (`compile_model`, fullgraph=True, activation checkpointing and the eval threshold included)
and a new per-process load never recompiles (tests/test_compile.py).

Every process of the expert group must run each MoE layer together, also with no token selected (it may
still receive rows): training steps do, and expert-parallel sampling runs the processes in lockstep.

Letters (docs/method/README.md): N tokens, D width, E experts, n_ep processes of an expert group, E_loc =
E/n_ep experts per process, n_sel selected pairs of this process, n_recv rows this process receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.distributed_c10d import _resolve_process_group

from racedit.models.global_select import world_size
from racedit.models.moe_dispatch import _pairs, compute_dtype, expert_rows, resolve_implementation


def _exchange(rows: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, group_name: str) -> torch.Tensor:
    """rows (sum send, D) -> (sum recv, D): rows[...] for process j go to j. send and recv are on the CPU
    (`dispatch_expert_parallel` copies them there once per forward: all_to_all_single takes host split sizes)."""
    group = _resolve_process_group(group_name)
    send_sizes, recv_sizes = send.tolist(), recv.tolist()
    out = rows.new_empty(sum(recv_sizes), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv_sizes, send_sizes, group=group)
    return out


@torch.library.custom_op("racedit::all_to_all_rows", mutates_args=())
def all_to_all_rows(rows: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, group_name: str) -> torch.Tensor:
    """Row exchange over the process group `group_name`: rows (sum send, D), send (n_ep,) rows for each process,
    recv (n_ep,) rows from each -> (sum recv, D), in process order. The received count is data dependent
    (unbacked under torch.compile)."""
    return _exchange(rows, send, recv, group_name)


@all_to_all_rows.register_fake
def _(rows, send, recv, group_name):
    return rows.new_empty(torch.library.get_ctx().new_dynamic_size(), *rows.shape[1:])


@torch.library.custom_op("racedit::all_to_all_rows_sized", mutates_args=())
def all_to_all_rows_sized(rows: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, group_name: str,
                          out_rows: int) -> torch.Tensor:
    """`all_to_all_rows` whose received count the caller knows (`out_rows` = sum recv): the return exchange,
    which gives each process back as many rows as it sent, and every backward exchange."""
    return _exchange(rows, send, recv, group_name)


@all_to_all_rows_sized.register_fake
def _(rows, send, recv, group_name, out_rows):
    return rows.new_empty(out_rows, *rows.shape[1:])


def _setup(ctx, inputs, output):
    rows, send, recv, group_name = inputs[:4]
    ctx.send, ctx.recv, ctx.group_name, ctx.rows = send, recv, group_name, rows.shape[0]


def _inverse(ctx, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of an exchange is the inverse exchange of the gradient."""
    return all_to_all_rows_sized(grad.contiguous(), ctx.recv, ctx.send, ctx.group_name, ctx.rows)


def _backward(ctx, grad):
    return _inverse(ctx, grad), None, None, None


def _backward_sized(ctx, grad):
    return _inverse(ctx, grad), None, None, None, None


all_to_all_rows.register_autograd(_backward, setup_context=_setup)
all_to_all_rows_sized.register_autograd(_backward_sized, setup_context=_setup)


@torch.library.custom_op("racedit::exchange_counts", mutates_args=())
def exchange_counts(counts: torch.Tensor, group_name: str) -> torch.Tensor:
    """counts (E,) of this process's pairs per expert -> (n_ep, E_loc): row j, the pairs process j sends to each of
    this process's experts (one `all_to_all_single` of E integers; no gradient). A custom op, so the collective
    stays out of a compiled graph."""
    group = _resolve_process_group(group_name)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received.view(world_size(group), -1)


@exchange_counts.register_fake
def _(counts, group_name):
    n = dist.get_world_size(_resolve_process_group(group_name))
    return counts.new_empty(n, counts.shape[0] // n)


def dispatch_expert_parallel(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, experts, group,
                             implementation: str = "auto") -> torch.Tensor:
    """`moe_dispatch.dispatch` with the experts spread over the processes of `group` (see the module doc):
    y[i] = sum_e mask[i, e] * scores[i, e] * expert_e(x[i]), (N, D) -> (N, D).

    x (N, D), mask and scores (N, E) over all E experts; `experts` holds this process's E_loc = E/n_ep of them
    (w1 (E_loc, D, h), ...; `shard_experts`). N may differ between processes and be 0. Collective over `group`.
    """
    N, D = x.shape
    E = mask.shape[1]
    n = world_size(group)
    E_l = E // n
    if experts.w1.shape[0] != E_l:
        raise ValueError(f"this process holds {experts.w1.shape[0]} experts, not E/n_ep = {E_l}: call shard_experts")
    dtype = compute_dtype(x)
    kernel = resolve_implementation(implementation, x.device, dtype, experts.dim, experts.hidden)
    kernel = "grouped_mm" if kernel == "grouped_mm" else "expert_loop"  # padded_bmm needs a static bound
    name = group.group_name
    expert_index, token_index = _pairs(mask, None)  # expert-major, so also sorted by destination process
    weights = scores.reshape(-1).index_select(0, token_index * E + expert_index).to(dtype)
    counts = mask.sum(dim=0)  # (E,)
    received_counts = exchange_counts(counts, name)  # (n_ep, E_loc)
    # the split sizes of all four exchanges (two here, their inverses in the backward), on the host once
    send, recv = torch.stack([counts.view(n, E_l).sum(dim=1), received_counts.sum(dim=1)]).cpu()
    rows = all_to_all_rows(x.to(dtype).index_select(0, token_index), send, recv, name)  # (n_recv, D)
    # received in (source process, local expert) order; the experts want them sorted by local expert
    local_expert = torch.repeat_interleave(torch.arange(E_l, device=x.device).repeat(n), received_counts.reshape(-1),
                                           output_size=rows.shape[0])
    order = torch.sort(local_expert, stable=True).indices
    w1, b1, w2, b2 = (p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2))
    y_sorted = expert_rows(rows.index_select(0, order), local_expert.index_select(0, order),
                           received_counts.sum(dim=0), w1, b1, w2, b2, kernel)
    y_received = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
    y = all_to_all_rows_sized(y_received, recv, send, name, token_index.shape[0])  # (n_sel, D), own rows
    return x.new_zeros(N, D, dtype=dtype).index_add_(0, token_index, y * weights.unsqueeze(1))


def expert_slice(num_experts: int, group) -> slice:
    """The global expert indices this process holds in an expert group `group` of n_ep processes: E/n_ep in a row."""
    n = world_size(group)
    if num_experts % n:
        raise ValueError(f"model.expert_parallel={n} must divide the number of experts, {num_experts}")
    per = num_experts // n
    rank = dist.get_rank(group) if group is not None else 0
    return slice(rank * per, (rank + 1) * per)


@dataclass
class ExpertLayout:
    """Where the experts live: a (data, expert) `DeviceMesh` of shape (n_proc/n_ep, n_ep) over all processes:
    processes g*n_ep .. (g+1)*n_ep - 1 are expert group g, which holds all E experts; the groups are data-parallel
    replicas of one another. Training and expert-parallel sampling make their groups with it."""

    mesh: DeviceMesh
    size: int  # n_ep, processes per expert group

    @property
    def expert_group(self):
        return self.mesh.get_group("expert")

    @property
    def data_group(self):
        return self.mesh.get_group("data")

    @property
    def world(self) -> int:
        return self.mesh.size()


def expert_layout(device: torch.device, size: int) -> ExpertLayout | None:
    """The layout for `size` processes per expert group over all processes (None for size 1: no expert
    parallelism). Collective; needs the process group, and `size` dividing the number of processes."""
    if size == 1:
        return None
    world = dist.get_world_size()
    return ExpertLayout(init_device_mesh(device.type, (world // size, size), mesh_dim_names=("data", "expert")), size)
