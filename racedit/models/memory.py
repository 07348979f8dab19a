"""Memory layers beside the DiT feed-forward: product-key memory (PKM), UltraMem and UltraMemV2.

A memory layer reads the same adaLN-modulated, normalised input u as the block's feed-forward and adds
`gate(c) * Mem(u)` to the feed-forward output, before the connection's depth step (racedit.models.dit).
Its gate is its own adaLN head `Linear(SiLU(c))`, zero-initialised by `DiT.initialize_weights`, so a
fresh model with memory layers computes exactly what the same model without them computes.

Kinds: `pkm` (product keys, Lample et al., arXiv 1907.05242), `ultramem` (UltraMem, arXiv 2411.12364:
Tucker-decomposed retrieval with a rank-1 pre-filter, multi-core scoring, implicit value expansion) and
`ultramemv2` (UltraMemV2, arXiv 2508.18756: one query per Tucker rank, PEER-style slots without
activation, variance-matching table init, Dk from the memory share of compute). What each computes, the
init derivation and every assumption (each a config option where a choice matters): docs/method/memory.md.
What they cost in a DiT: docs/memory.md (bench/memory_step.py).

Letters (docs/method/README.md): B images, L tokens per image, N = B*L query tokens, D model width,
n_head query heads, n_key physical keys per side, n_slot = n_key^2 table rows ("slots"), n_blk
implicit-value-expansion blocks, n_vkey = sqrt(n_blk)*n_key virtual keys per side (n_vkey^2 = n_blk*n_slot
virtual addresses), m_read slots read per head (TopM), J = n_head*m_read slots read per token, Dk key,
Dv value and Dp pre-value widths, r Tucker rank, n_core scoring cores, k_r / k_c rows / columns kept by
the Tucker pre-filter.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from racedit.config import ConfigError
from racedit.models.records import ForwardRecord

KINDS = ("pkm", "ultramem", "ultramemv2")


# --------------------------------------------------------------------------------------------------------------
# Retrieval and gathering as plain functions (the tests compare them with brute force)
# --------------------------------------------------------------------------------------------------------------

def product_key_topk(s_row: torch.Tensor, s_col: torch.Tensor, m_read: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-m_read of the additive product-key grid s_row[a] + s_col[b] over all n_key*n_key slots.

    s_row, s_col (..., n_key) -> scores (..., m_read) in descending order, differentiable in s_row and s_col,
    and slot indices (..., m_read) = a * n_key + b. Searches only the m_read*m_read sums of the top-m_read of
    each side, which contain the exact top-m_read (a pair outside them is beaten by m_read pairs that are
    inside).
    """
    n_key = s_row.shape[-1]
    with torch.no_grad():
        row_val, row_idx = s_row.topk(m_read, dim=-1)
        col_val, col_idx = s_col.topk(m_read, dim=-1)
        cand = (row_val.unsqueeze(-1) + col_val.unsqueeze(-2)).flatten(-2)  # (..., m_read*m_read)
        flat = cand.topk(m_read, dim=-1).indices
        rows = row_idx.gather(-1, torch.div(flat, m_read, rounding_mode="floor"))
        cols = col_idx.gather(-1, flat % m_read)
    scores = s_row.gather(-1, rows) + s_col.gather(-1, cols)
    return scores, rows * n_key + cols


def _prefilter(x: torch.Tensor, m_read: int, signed: bool) -> torch.Tensor:
    """Indices (..., k_r) of the rows kept by the rank-1 pre-filter of scores x (..., n_vkey)."""
    n_vkey = x.shape[-1]
    if signed:
        if 2 * m_read >= n_vkey:
            return torch.arange(n_vkey, device=x.device).expand(*x.shape[:-1], n_vkey)
        return torch.cat([x.topk(m_read, dim=-1).indices, x.topk(m_read, dim=-1, largest=False).indices], dim=-1)
    return x.topk(min(m_read, n_vkey), dim=-1).indices


def tucker_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                m_read: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker-decomposed query-key retrieval (TDQKR) with multi-core scoring and the rank-1 pre-filter.

    s_row, s_col (N, n_head, r, n_vkey): each rank's row and column key scores. cores (n_head, n_core, r, r):
    the Tucker cores, whose sum `core` ranks the grid score s_row^T core s_col (r x r per slot). u, t
    (n_head, r): the rank-1 part of `core` (top singular vectors, `TuckerRetrieval.refresh`). Keeps the
    m_read rows with the best u^T s_row and the m_read columns with the best t^T s_col (with `signed`, also
    the m_read worst), scores the kept grid exactly with `core` and returns the per-core scores
    (N, n_head, n_core, m_read) of its top-m_read, differentiable in s_row, s_col and cores, and their
    addresses (N, n_head, m_read) = row * n_vkey + col. The search runs without autograd; only the m_read
    chosen slots are rescored with gradients.
    """
    N, n_head, r, n_vkey = s_row.shape
    with torch.no_grad():
        rows = _prefilter(torch.einsum("qhrn,hr->qhn", s_row, u), m_read, signed)  # (N, n_head, k_r)
        cols = _prefilter(torch.einsum("qhrn,hr->qhn", s_col, t), m_read, signed)  # (N, n_head, k_c)
    sr = s_row.gather(-1, rows.unsqueeze(2).expand(N, n_head, r, rows.shape[-1]))  # (N, n_head, r, k_r)
    sc = s_col.gather(-1, cols.unsqueeze(2).expand(N, n_head, r, cols.shape[-1]))  # (N, n_head, r, k_c)
    k_c = cols.shape[-1]
    with torch.no_grad():
        total = torch.einsum("qhra,hrs,qhsb->qhab", sr, cores.sum(1), sc).flatten(-2)  # (N, n_head, k_r * k_c)
        flat = total.topk(m_read, dim=-1).indices  # (N, n_head, m_read)
        a, b = torch.div(flat, k_c, rounding_mode="floor"), flat % k_c
    ra = sr.gather(-1, a.unsqueeze(2).expand(N, n_head, r, m_read))  # (N, n_head, r, m_read)
    cb = sc.gather(-1, b.unsqueeze(2).expand(N, n_head, r, m_read))
    core_scores = torch.einsum("qhrm,hirs,qhsm->qhim", ra, cores, cb)  # (N, n_head, n_core, m_read)
    return core_scores, rows.gather(-1, a) * n_vkey + cols.gather(-1, b)


def weighted_bag(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor | None = None,
                 num_blocks: int = 1) -> torch.Tensor:
    """Weighted sums of table rows with `F.embedding_bag(mode="sum", per_sample_weights=...)`.

    table (n_slot, Dv); slots (N, J) row indices; weights (N, J, n_core): weight of slot j for the i-th
    Dv/n_core columns (multi-core scoring; n_core = 1 weights whole rows); blocks (N, J) in [0, num_blocks)
    or None. Returns (N, num_blocks, Dv):
    out[q, p, cols_i] = sum_{j: blocks[q, j] = p} weights[q, j, i] table[slots[q, j], cols_i].
    The (N, J, Dv) gather is never materialised: the table is viewed as (n_slot*n_core, Dv/n_core) rows and
    each (token, block, core) is one bag, bags of one token ordered by block through a stable sort.
    """
    with torch.autocast(device_type=table.device.type, enabled=False):  # sums in the table's precision
        return _weighted_bag(table, slots, weights, blocks, num_blocks)


def _weighted_bag(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor | None,
                  num_blocks: int) -> torch.Tensor:
    n_slot, Dv = table.shape
    N, J, n_core = weights.shape
    if Dv % n_core:
        raise ValueError(f"value width {Dv} is not divisible by {n_core} cores")
    # row s*n_core + i holds columns i*Dv/n_core ... (i+1)*Dv/n_core - 1 of slot s
    chunks = table.view(n_slot * n_core, Dv // n_core)
    cores = torch.arange(n_core, device=slots.device)
    index = slots.long().unsqueeze(-1) * n_core + cores  # (N, J, n_core)
    w = weights.to(table.dtype)
    if blocks is None or num_blocks == 1:
        out = F.embedding_bag(index.transpose(1, 2).reshape(N * n_core, J), chunks,
                              per_sample_weights=w.transpose(1, 2).reshape(N * n_core, J), mode="sum")
        return out.view(N, 1, Dv)
    blocks = blocks.long()
    order = blocks.argsort(dim=-1, stable=True)
    blocks = blocks.gather(1, order)
    index = index.gather(1, order.unsqueeze(-1).expand(N, J, n_core))
    w = w.gather(1, order.unsqueeze(-1).expand(N, J, n_core))
    counts = torch.zeros(N, num_blocks, dtype=torch.long, device=slots.device).scatter_add_(
        1, blocks, torch.ones_like(blocks))  # (N, n_blk)
    start = counts.cumsum(-1) - counts  # (N, n_blk) first sorted position of each block
    base = torch.arange(N, device=slots.device) * (J * n_core)
    st, ct = start.gather(1, blocks), counts.gather(1, blocks)  # (N, J) for each sorted slot
    rank = torch.arange(J, device=slots.device) - st  # position within its block
    pos = (base[:, None, None] + (st * n_core + rank).unsqueeze(-1) + cores * ct.unsqueeze(-1)).reshape(-1)
    flat_index = torch.empty(N * J * n_core, dtype=torch.long, device=slots.device).scatter_(0, pos, index.reshape(-1))
    flat_w = torch.zeros(N * J * n_core, dtype=w.dtype, device=w.device).scatter(0, pos, w.reshape(-1))
    offsets = (base[:, None, None] + (start * n_core).unsqueeze(-1) + cores * counts.unsqueeze(-1)).reshape(-1)
    # (N*n_blk*n_core, Dv/n_core)
    out = F.embedding_bag(flat_index, chunks, offsets, per_sample_weights=flat_w, mode="sum")
    return out.view(N, num_blocks, Dv)


def variance_matching_std(dim: int, depth: int, mlp_ratio: float, topk: int, heads: int, prevalue_dim: int,
                          value_dim: int, score_var: float = 0.1) -> float:
    """UltraMemV2's table std (App. A): (0.2 mlp_ratio dim / (topk heads (1 + score_var) prevalue_dim value_dim
    depth)) ** (1/4), the fourth root of what the paper prints as sigma_V^2 (Eq. 26); derivation and the reason
    for the fourth root in docs/method/memory.md."""
    return (0.2 * mlp_ratio * dim / (topk * heads * (1 + score_var) * prevalue_dim * value_dim * depth)) ** 0.25


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class SlotTables(nn.Module):
    """The sparse part of a memory layer: values (n_slot, Dv) and, for PEER-style slots, pre-values (n_slot, Dp).

    `activated_fraction` (J/n_slot) is what `count_params` counts as used by one token.
    """

    def __init__(self, slots: int, value_dim: int, prevalue_dim: int = 0, reads_per_token: int = 1):
        super().__init__()
        self.values = nn.Parameter(torch.empty(slots, value_dim))
        self.prevalues = nn.Parameter(torch.empty(slots, prevalue_dim)) if prevalue_dim else None
        self.activated_fraction = min(1.0, reads_per_token / slots)


class TuckerRetrieval(nn.Module):
    """Query/key-LayerNorm'd TDQKR over an n_vkey x n_vkey grid.

    x (N, D) -> core scores (N, n_head, n_core, m_read), addresses (N, n_head, m_read). query
    (D -> n_head*2*r_q*Dk, r_q = r with `query_per_rank` (UltraMemV2) or 1 (UltraMem: one query scores
    every rank's keys)); keys (n_head, 2, r, n_vkey, Dk); cores (n_head, n_core, r, r). Buffers `prefilter_u`,
    `prefilter_t` (n_head, r): the rank-1 part of the summed cores, recomputed by `refresh()` once per
    optimizer step outside autograd and sign-aligned with the previous step (persistent, so a resumed run
    continues with the same pre-filter).
    """

    def __init__(self, dim: int, keys: int, topk: int, heads: int, key_dim: int, rank: int, cores: int,
                 query_per_rank: bool, norm_gain: float, prefilter_signed: bool):
        super().__init__()
        self.dim, self.keys_per_side, self.topk, self.heads, self.key_dim = dim, keys, topk, heads, key_dim
        self.rank, self.num_cores, self.prefilter_signed, self.norm_gain = rank, cores, prefilter_signed, norm_gain
        self.query_ranks = rank if query_per_rank else 1
        self.query = nn.Linear(dim, heads * 2 * self.query_ranks * key_dim, bias=False)
        self.query_norm = nn.LayerNorm(key_dim)
        self.key_norm = nn.LayerNorm(key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, rank, keys, key_dim))
        self.cores = nn.Parameter(torch.empty(heads, cores, rank, rank))
        self.register_buffer("prefilter_u", torch.zeros(heads, rank))
        self.register_buffer("prefilter_t", torch.zeros(heads, rank))

    def initialize_weights(self) -> None:
        nn.init.xavier_uniform_(self.query.weight)
        for norm in (self.query_norm, self.key_norm):
            nn.init.constant_(norm.weight, self.norm_gain)
            nn.init.zeros_(norm.bias)
        nn.init.normal_(self.keys, std=self.key_dim ** -0.5)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        self.prefilter_u.zero_()
        self.prefilter_t.zero_()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the rank-1 pre-filter (u, t) from the SVD of the summed cores, outside autograd."""
        if self.cores.is_meta:  # shape-only model (parameter counting)
            return
        cores = self.cores.detach()
        if isinstance(cores, DTensor):  # sharded by FSDP: every process gathers the whole (small) cores
            cores = cores.full_tensor()
        core = cores.sum(1).double()  # (n_head, r, r)
        left, _, right_t = torch.linalg.svd(core)
        u, t = left[..., :, 0], right_t[..., 0, :]
        flip = (u * self.prefilter_u.double()).sum(-1) < 0  # keep the sign of the previous step
        sign = 1.0 - 2.0 * flip.double()
        self.prefilter_u.copy_(u * sign[:, None])
        self.prefilter_t.copy_(t * sign[:, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, n_head, Dk = x.shape[0], self.heads, self.key_dim
        q = self.query(x)  # the one large matmul: under autocast if enabled
        with torch.autocast(device_type=x.device.type, enabled=False):  # scores and top-m_read in full precision
            dt = self.keys.dtype
            q = self.query_norm(q.to(dt).view(N, n_head, 2, self.query_ranks, Dk))
            k = self.key_norm(self.keys)  # (n_head, 2, r, n_vkey, Dk)
            if self.query_ranks == 1:
                s = torch.einsum("qhsk,hsrnk->qhsrn", q.squeeze(3), k)
            else:
                s = torch.einsum("qhsrk,hsrnk->qhsrn", q, k)  # (N, n_head, 2, r, n_vkey)
            return tucker_topk(s[:, :, 0], s[:, :, 1], self.cores, self.prefilter_u.to(dt), self.prefilter_t.to(dt),
                               self.topk, self.prefilter_signed)

    def macs_per_token(self) -> int:
        """Query projection, key scores, pre-filter, candidate grid with the summed core, per-core rescoring."""
        n_head, r, n_vkey, Dk, m_read = self.heads, self.rank, self.keys_per_side, self.key_dim, self.topk
        k_r = min(2 * m_read, n_vkey) if self.prefilter_signed else m_read  # = k_c
        query = self.dim * n_head * 2 * self.query_ranks * Dk
        keys = n_head * 2 * r * n_vkey * Dk
        prefilter = n_head * 2 * r * n_vkey
        candidates = n_head * (r * r * k_r + r * k_r * k_r)
        rescore = n_head * self.num_cores * m_read * (r * r + r)
        return query + keys + prefilter + candidates + rescore


class MemoryLayer(nn.Module, ABC):  # ABC: `read` is each kind's own
    """Base: `forward(u (B, L, D), c (B, D), record) -> gate(c) * read(u)` (B, L, D).

    Subclasses define `read(x (N, D)) -> (out (N, D), physical slots (N, J))` and `read_macs_per_token()`.
    The gate is `adaLN_gate = Sequential(SiLU, Linear(D, D))` on the conditioning; `zero_init_gate()` zeroes
    its last layer (called by `DiT.initialize_weights`, the model's one place for zero-inits).
    """

    kind = ""

    def __init__(self, dim: int, slots: int, layer_index: int, value_lr_scale: float, value_lr_decay: float):
        super().__init__()
        self.dim, self.slots, self.layer_index = dim, slots, layer_index
        self.value_lr_scale, self.value_lr_decay = value_lr_scale, value_lr_decay
        self.adaLN_gate = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))

    def zero_init_gate(self) -> None:
        nn.init.zeros_(self.adaLN_gate[-1].weight)
        nn.init.zeros_(self.adaLN_gate[-1].bias)

    @abstractmethod
    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory read of x (N, D): the kind's retrieval and value pooling (subclasses)."""

    @abstractmethod
    def read_macs_per_token(self) -> int:
        """Forward MACs of one token's read (subclasses)."""

    def forward(self, u: torch.Tensor, c: torch.Tensor, record: ForwardRecord | None = None) -> torch.Tensor:
        """u (B, L, D), c (B, D) -> (B, L, D). With `record.diagnostics`, fills record.memory[layer_index] with
        "slots_touched" (a () tensor: the fraction of the n_slot rows this batch read) and "reads" (B*L*J)."""
        B, L, D = u.shape
        out, slots = self.read(u.reshape(B * L, D))
        if record is not None and record.diagnostics:
            with torch.no_grad():
                hit = torch.zeros(self.slots, device=slots.device).index_fill_(0, slots.reshape(-1), 1.0)
            record.memory[self.layer_index] = {"slots_touched": hit.mean(), "reads": slots.numel()}
        return self.adaLN_gate(c).unsqueeze(1) * out.view(B, L, D)

    def macs(self, num_tokens: int) -> int:
        """Forward MACs for one image of `num_tokens` tokens: the read of every token plus the gate."""
        return num_tokens * self.read_macs_per_token() + self.dim * self.dim

    def optimizer_groups(self) -> list[dict]:
        """The value (and pre-value) tables in their own AdamW group: no weight decay, learning rate
        scaled by `lr_scale`, decaying linearly to 1x over the fraction `lr_scale_decay` of the run
        (0 = constant); racedit.training.loop builds the per-group schedule from these two keys."""
        return [{"params": [p for p in self.tables.parameters()], "weight_decay": 0.0, "name": "memory_values",
                 "lr_scale": float(self.value_lr_scale), "lr_scale_decay": float(self.value_lr_decay)}]

    def after_optimizer_step(self) -> None:
        """Per-optimizer-step upkeep outside autograd (the Tucker pre-filter refresh); a no-op for PKM."""
        refresh = getattr(self, "refresh", None)
        if refresh is not None:
            refresh()


class ProductKeyMemory(MemoryLayer):
    """Classic product-key memory (Lample et al., 2019) with a LayerNorm'd query and softmax weights.

    query Linear(D, n_head*2*Dk) -> LayerNorm(Dk) per half; sub-keys (n_head, 2, n_key, Dk); values
    (n_slot, D), no output projection. x (N, D) -> sum over heads of softmax(top-m_read scores) . values.
    """

    kind = "pkm"

    def __init__(self, dim: int, keys: int, topk: int, heads: int = 1, key_dim: int = 0, value_std: float = 0.0,
                 value_lr_scale: float = 1.0, value_lr_decay: float = 0.0, layer_index: int = 0):
        super().__init__(dim, keys * keys, layer_index, value_lr_scale, value_lr_decay)
        self.keys_per_side, self.topk, self.heads = keys, topk, heads
        self.key_dim = key_dim or dim // 2
        self.value_std = value_std or dim ** -0.5
        self.query = nn.Linear(dim, heads * 2 * self.key_dim, bias=False)
        self.query_norm = nn.LayerNorm(self.key_dim)
        self.keys = nn.Parameter(torch.empty(heads, 2, keys, self.key_dim))
        self.tables = SlotTables(self.slots, dim, reads_per_token=heads * topk)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.xavier_uniform_(self.query.weight)
        nn.init.ones_(self.query_norm.weight)
        nn.init.zeros_(self.query_norm.bias)
        bound = self.key_dim ** -0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.tables.values, std=self.value_std)

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, n_head, m_read = x.shape[0], self.heads, self.topk
        q = self.query(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = self.query_norm(q.to(self.keys.dtype).view(N, n_head, 2, self.key_dim))
            s = torch.einsum("qhsk,hsnk->qhsn", q, self.keys)  # (N, n_head, 2, n_key)
            scores, slots = product_key_topk(s[:, :, 0], s[:, :, 1], m_read)  # (N, n_head, m_read)
            weights = scores.softmax(dim=-1)
        out = weighted_bag(self.tables.values, slots.view(N, n_head * m_read), weights.view(N, n_head * m_read, 1))
        return out.view(N, self.dim), slots.view(N, n_head * m_read)

    def read_macs_per_token(self) -> int:
        n_head, n_key, Dk, m_read = self.heads, self.keys_per_side, self.key_dim, self.topk
        return self.dim * n_head * 2 * Dk + n_head * 2 * n_key * Dk + n_head * m_read * self.dim

    def extra_repr(self) -> str:
        return f"slots={self.slots}, topk={self.topk}, heads={self.heads}, key_dim={self.key_dim}, value_dim={self.dim}"


class _TuckerMemory(MemoryLayer):
    """Shared by UltraMem and UltraMemV2: TDQKR over the virtual grid and the fixed address shuffle."""

    def __init__(self, dim: int, keys: int, topk: int, heads: int, key_dim: int, rank: int, cores: int,
                 expansion: int, query_per_rank: bool, norm_gain_exponent: float, prefilter_signed: bool,
                 value_lr_scale: float, value_lr_decay: float, layer_index: int):
        super().__init__(dim, keys * keys, layer_index, value_lr_scale, value_lr_decay)
        side = math.isqrt(expansion)
        if side * side != expansion:
            raise ConfigError(f"bad value for 'model.memory_expansion': {expansion}. Must be a square (1, 4, 9, 16)")
        self.keys_per_side, self.topk, self.heads, self.expansion = keys, topk, heads, expansion
        self.virtual_keys = side * keys  # n_vkey: n_blk*n_slot virtual addresses
        self.key_dim, self.rank, self.num_cores = key_dim, rank, cores
        if topk > self.virtual_keys:
            raise ConfigError(f"model.memory_topk={topk} exceeds the {self.virtual_keys} keys per side")
        self.retrieval = TuckerRetrieval(dim, self.virtual_keys, topk, heads, key_dim, rank, cores, query_per_rank,
                                         key_dim ** -norm_gain_exponent, prefilter_signed)
        if expansion > 1:
            # Fixed random shuffle of the n_blk*n_slot virtual addresses (physical row = a mod n_slot,
            # block = a div n_slot),
            # drawn once at construction and saved with the weights, so a reloaded model reads the same slots.
            self.register_buffer("address_shuffle", torch.randperm(expansion * self.slots).to(torch.int32))
        else:
            self.address_shuffle = None

    def physical(self, address: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Virtual addresses -> (physical rows, virtual blocks); blocks are None without expansion."""
        if self.address_shuffle is None:
            return address, None
        shuffled = self.address_shuffle[address].long()
        return shuffled % self.slots, torch.div(shuffled, self.slots, rounding_mode="floor")

    def refresh(self) -> None:
        """Recompute the rank-1 Tucker pre-filter; the training loop calls it after every optimizer step."""
        self.retrieval.refresh()


class UltraMem(_TuckerMemory):
    """UltraMem (Huang et al., ICLR 2025): TDQKR + multi-core scoring + implicit value expansion, raw scores.

    x (N, D) -> retrieval (core scores (N, n_head, n_core, m_read), virtual addresses) -> shuffled into
    physical rows and blocks -> per-block pooling of the values, core i weighting columns i*Dv/n_core.. of
    each row -> Linear(n_blk*Dv, D) of the n_blk pooled vectors (= sum of the n_blk block projectors, pooling
    before projecting).
    """

    kind = "ultramem"

    def __init__(self, dim: int, keys: int, topk: int, heads: int = 1, key_dim: int = 0, value_dim: int = 0,
                 rank: int = 2, cores: int = 2, expansion: int = 4, prefilter_signed: bool = False,
                 value_std: float = 0.0, depth: int = 12, value_lr_scale: float = 1.0, value_lr_decay: float = 0.0,
                 layer_index: int = 0):
        super().__init__(dim, keys, topk, heads, key_dim or dim // 2, rank, cores, expansion, False, 1 / 3,
                         prefilter_signed, value_lr_scale, value_lr_decay, layer_index)
        self.value_dim = value_dim or dim // 2
        if self.value_dim % cores:
            raise ConfigError(f"model.memory_value_dim={self.value_dim} is not divisible by model.memory_cores={cores}")
        self.value_std = value_std or math.sqrt(expansion / (2 * topk * heads * depth))
        self.tables = SlotTables(self.slots, self.value_dim, reads_per_token=heads * topk)
        self.value_proj = nn.Linear(expansion * self.value_dim, dim, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.retrieval.initialize_weights()
        nn.init.normal_(self.tables.values, std=self.value_std)
        nn.init.xavier_uniform_(self.value_proj.weight)

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, J, n_core = x.shape[0], self.heads * self.topk, self.num_cores
        core_scores, address = self.retrieval(x)  # (N, n_head, n_core, m_read), (N, n_head, m_read)
        rows, blocks = self.physical(address.reshape(N, J))
        weights = core_scores.permute(0, 1, 3, 2).reshape(N, J, n_core)
        pooled = weighted_bag(self.tables.values, rows, weights, blocks, self.expansion)  # (N, n_blk, Dv)
        return self.value_proj(pooled.reshape(N, self.expansion * self.value_dim).to(x.dtype)), rows

    def read_macs_per_token(self) -> int:
        J = self.heads * self.topk
        return self.retrieval.macs_per_token() + J * self.value_dim + self.expansion * self.value_dim * self.dim

    def extra_repr(self) -> str:
        return (f"slots={self.slots}, expansion={self.expansion}, topk={self.topk}, heads={self.heads}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, rank={self.rank}, cores={self.num_cores}")


class UltraMemV2(_TuckerMemory):
    """UltraMemV2 (Huang et al., 2025): one query per Tucker rank, PEER-style slots without activation.

    x (N, D) -> retrieval -> physical rows (virtual blocks summed) -> a_j = (P x . U_j) * s_j per core ->
    W_v sum_j a_j (.)_split V_j. P: Linear(D, Dp); U (n_slot, Dp) pre-values; V (n_slot, Dv) values;
    W_v: Linear(Dv, D).
    """

    kind = "ultramemv2"

    def __init__(self, dim: int, keys: int, topk: int, heads: int = 1, key_dim: int = 0, value_dim: int = 0,
                 prevalue_dim: int = 0, rank: int = 2, cores: int = 2, expansion: int = 1,
                 prefilter_signed: bool = False, value_std: float = 0.0, depth: int = 12, mlp_ratio: float = 4.0,
                 value_lr_scale: float = 1.0, value_lr_decay: float = 0.0, layer_index: int = 0):
        super().__init__(dim, keys, topk, heads, key_dim or dim // 2, rank, cores, expansion, True, 0.4,
                         prefilter_signed, value_lr_scale, value_lr_decay, layer_index)
        self.value_dim = value_dim or max(cores, 3 * dim // 16)
        self.prevalue_dim = prevalue_dim or max(1, dim // 16)
        if self.value_dim % cores:
            raise ConfigError(f"model.memory_value_dim={self.value_dim} is not divisible by model.memory_cores={cores}")
        self.value_std = value_std or variance_matching_std(dim, depth, mlp_ratio, topk, heads, self.prevalue_dim,
                                                            self.value_dim)
        self.tables = SlotTables(self.slots, self.value_dim, self.prevalue_dim, reads_per_token=heads * topk)
        self.prevalue_proj = nn.Linear(dim, self.prevalue_dim, bias=False)
        self.value_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self.retrieval.initialize_weights()
        nn.init.normal_(self.tables.values, std=self.value_std)
        nn.init.normal_(self.tables.prevalues, std=self.value_std)
        nn.init.xavier_uniform_(self.prevalue_proj.weight)
        nn.init.xavier_uniform_(self.value_proj.weight)

    def read(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, J, n_core = x.shape[0], self.heads * self.topk, self.num_cores
        core_scores, address = self.retrieval(x)  # (N, n_head, n_core, m_read), (N, n_head, m_read)
        rows, _ = self.physical(address.reshape(N, J))  # virtual blocks share the one projection: summed
        p = self.prevalue_proj(x)  # (N, Dp)
        pre = F.embedding(rows, self.tables.prevalues)  # (N, J, Dp)
        dot = torch.einsum("qjd,qd->qj", pre, p.to(pre.dtype))  # PEER's one-neuron "expert", no activation
        weights = core_scores.permute(0, 1, 3, 2).reshape(N, J, n_core) * dot.unsqueeze(-1)
        pooled = weighted_bag(self.tables.values, rows, weights)  # (N, 1, Dv)
        return self.value_proj(pooled.view(N, self.value_dim).to(x.dtype)), rows

    def read_macs_per_token(self) -> int:
        J = self.heads * self.topk
        return (self.retrieval.macs_per_token() + self.dim * self.prevalue_dim + J * self.prevalue_dim
                + J * self.value_dim + self.value_dim * self.dim)

    def extra_repr(self) -> str:
        return (f"slots={self.slots}, expansion={self.expansion}, topk={self.topk}, heads={self.heads}, "
                f"key_dim={self.key_dim}, prevalue_dim={self.prevalue_dim}, value_dim={self.value_dim}, "
                f"rank={self.rank}, cores={self.num_cores}")


# --------------------------------------------------------------------------------------------------------------
# Construction from a resolved ModelConfig
# --------------------------------------------------------------------------------------------------------------

def memory_blocks(cfg) -> list[int]:
    """Block indices that get a memory layer (none when model.memory = none; empty list = every block)."""
    if cfg.memory == "none":
        return []
    blocks = sorted(set(cfg.memory_blocks)) if cfg.memory_blocks else list(range(cfg.depth))
    bad = [b for b in blocks if not 0 <= b < cfg.depth]
    if bad:
        raise ConfigError(f"bad value for 'model.memory_blocks': {bad} outside the {cfg.depth} blocks 0..{cfg.depth - 1}")
    return blocks


def _layer(cfg, key_dim: int, layer_index: int) -> MemoryLayer:
    common = dict(topk=cfg.memory_topk, heads=cfg.memory_heads, key_dim=key_dim, value_std=cfg.memory_value_std,
                  value_lr_scale=cfg.memory_value_lr_scale, value_lr_decay=cfg.memory_value_lr_decay,
                  layer_index=layer_index)
    if cfg.memory == "pkm":
        for key in ("memory_value_dim", "memory_prevalue_dim"):
            if getattr(cfg, key):
                raise ConfigError(f"model.{key} does not apply to model.memory=pkm (its values are D wide)")
        if cfg.memory_expansion > 1:
            raise ConfigError("model.memory_expansion (implicit value expansion) does not apply to model.memory=pkm")
        if cfg.memory_topk > cfg.memory_keys:
            raise ConfigError(f"model.memory_topk={cfg.memory_topk} exceeds model.memory_keys={cfg.memory_keys}")
        return ProductKeyMemory(cfg.hidden_size, cfg.memory_keys, **common)
    tucker = dict(value_dim=cfg.memory_value_dim, rank=cfg.memory_rank, cores=cfg.memory_cores,
                  prefilter_signed=cfg.memory_prefilter_signed, depth=cfg.depth)
    if cfg.memory == "ultramem":
        if cfg.memory_prevalue_dim:
            raise ConfigError("model.memory_prevalue_dim applies to model.memory=ultramemv2 only")
        return UltraMem(cfg.hidden_size, cfg.memory_keys, expansion=cfg.memory_expansion or 4, **tucker, **common)
    return UltraMemV2(cfg.hidden_size, cfg.memory_keys, expansion=cfg.memory_expansion or 1,
                      prevalue_dim=cfg.memory_prevalue_dim, mlp_ratio=cfg.mlp_ratio, **tucker, **common)


def read_macs_per_token(cfg, key_dim: int) -> float:
    """MACs per token of one memory layer of this config with key width `key_dim` (built on the meta device)."""
    with torch.device("meta"):
        return _layer(cfg, key_dim, 0).read_macs_per_token()


def build_memory(cfg, layer_index: int) -> MemoryLayer | None:
    """The memory layer of block `layer_index` for a resolved ModelConfig (its `memory_key_dim` already
    solved by `racedit.models.resolve_model_config`), or None."""
    if layer_index not in memory_blocks(cfg):
        return None
    if cfg.memory not in KINDS:
        raise ConfigError(f"bad value for 'model.memory': {cfg.memory!r}. Allowed: {['none', *KINDS]}")
    return _layer(cfg, cfg.memory_key_dim, layer_index)
