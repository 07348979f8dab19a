"""Memory layers beside the DiT feed-forward: product-key memory (PKM), UltraMem and UltraMemV2.

A memory layer reads the same adaLN-modulated, normalised input u as the block's feed-forward and adds
`gate(c) * Mem(u)` to the feed-forward output, before the connection's depth step (racedit.models.dit).
Its gate is its own adaLN head `Linear(SiLU(c))`, zero-initialised by `DiT.initialize_weights`, so a
fresh model with memory layers computes exactly what the same model without them computes. Method
details and tags ((P) paper, (C) official code, (A) our assumption): ../shared/reference/connections-memory.md
sections 4-6.

Letters: B images, T tokens per image, Q = B*T query tokens, D model width, H query heads, n physical keys
per side, S = n*n physical table rows ("slots"), E implicit-value-expansion blocks, n_v = sqrt(E)*n
virtual keys per side (n_v*n_v = E*S virtual addresses), m slots read per head (TopM), J = H*m slots read
per token, Dk key width, Dv value width, Dp pre-value width, r Tucker rank, h scoring cores.

Kinds:
  pkm         classic product keys: LayerNorm'd query, two sub-key tables of n keys, top-m per side,
              top-m over the m*m candidate sums, softmax weights, values of width D gathered with
              `F.embedding_bag(mode="sum", per_sample_weights=...)`.
  ultramem    UltraMem: query/key LayerNorm; Tucker-decomposed retrieval (rank r, h cores) with the
              rank-1 SVD pre-filter refreshed once per optimizer step (`refresh()`); raw scores (no
              softmax); multi-core scoring (core i weights the i-th Dv/h columns of each value); implicit
              value expansion: E virtual blocks addressed through a fixed random shuffle (the persistent
              buffer `address_shuffle`, saved in checkpoints), pooled per block and then projected by
              one Linear(E*Dv -> D), i.e. the sum of E block projectors.
  ultramemv2  UltraMemV2: the same retrieval with one query per Tucker rank; PEER-style slots, each a
              pre-value vector U_j (Dp) and a value vector V_j (Dv) with no activation:
              out = W_v sum_j (P x . U_j) s_j V_j; virtual blocks (E > 1) share the one projection, so
              they are summed; variance-matching table init; Dk set from the memory share of compute.

Assumptions ((A) in the notes, each a config option where a choice matters):
  - Queries are normalised with LayerNorm, not PKM/PEER's BatchNorm (fragile with CFG batches and mixed
    timesteps). Keys are LayerNorm'd for ultramem/ultramemv2 only, as in UltraMem.
  - Query/key LayerNorm gains start at Dk^-1/3 (ultramem) and Dk^-0.4 (ultramemv2), the official code's
    values; Tucker cores ~ U[0, 1]; Tucker keys ~ N(0, 1/Dk); PKM keys ~ U(+-1/sqrt(Dk)); memory linears
    take the model's xavier init.
  - Value tables (`model.memory_value_std` = 0): pkm N(0, 1/D); ultramem N(0, E/(2 m H L)) (the UltraMem
    paper's formula, L = model depth); ultramemv2 the variance-matching init of UltraMemV2 App. A with
    sigma_V = (0.2 k_inner D / (m H (1 + sigma_s^2) Dp Dv L))^(1/4), k_inner = model.mlp_ratio and
    sigma_s^2 = 0.1. The paper prints this expression as sigma_V^2 (Eq. 26), but equating its Eq. 22
    (which carries sigma_V^4) with the MLP's output variance gives sigma_V^4: we read the printed square
    as a typo and take the fourth root (0.066 for the paper's 227M config, against 0.0044 as printed).
    A positive `memory_value_std` sets one fixed std for every table (the official code uses 0.02).
    With the gate at zero this only sets how fast the gate opens.
  - The Tucker pre-filter keeps the m best rows and columns under the rank-1 part u t^T of the summed core
    (the paper). That contains the exact top-m when the core is rank 1 and the rank-1 row and column
    scores are positive; `memory_prefilter_signed` also keeps the m lowest ones (4x the candidates), which
    is exact for a rank-1 core whatever the signs.
  - Multi-core scores and the PEER pre-value dot combine as in the official code: the dot multiplies
    every core's score, each applied to its own Dv/h columns of V_j.
  - Value and pre-value tables are never weight-decayed; their learning rate is the base rate times
    `memory_value_lr_scale`, decaying linearly to 1x over `memory_value_lr_decay` of the run (UltraMem),
    or constant when that is 0 (UltraMemV2 prefers a constant 1x). Both go through an optimizer group
    (`optimizer_groups()`, read by racedit.training.loop.param_groups).
  - Not implemented: tables shared across layers (ring), UltraMem's skip-layer placement (a layer here
    reads and writes in the same block), the causal query convolution (meaningless without causality),
    the Tucker-core auxiliary loss (UltraMemV2 found it unnecessary).
  - The EMA copy of a model gets its own pre-filter refresh from its averaged cores (the training loop).

Cost in a DiT (the notes, section 0): a training batch makes B*T*J reads per layer, usually many times the
S rows (`ForwardRecord(diagnostics=True).memory[i]["slots_touched"]` measures the share of rows read: about 20-30% at
init, 76-97% in most layers of a digits model after 400 steps). And training pays for the whole table
every step anyway: dense table gradients and AdamW state. So the small-batch decoding advantage of
memory layers does not carry over; what does is a large parameter increase for few MACs, paid for in
memory and step time. Measurements: docs/memory.md (bench/memory_step.py).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from racedit.config import ConfigError
from racedit.models.records import ForwardRecord

KINDS = ("pkm", "ultramem", "ultramemv2")


# --------------------------------------------------------------------------------------------------------------
# Retrieval and gathering as plain functions (the tests compare them with brute force)
# --------------------------------------------------------------------------------------------------------------

def product_key_topk(s_row: torch.Tensor, s_col: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-m of the additive product-key grid s_row[a] + s_col[b] over all n*n slots.

    s_row, s_col (..., n) -> scores (..., m) in descending order, differentiable in s_row and s_col, and
    slot indices (..., m) = a * n + b. Searches only the m*m sums of the top-m of each side, which contain
    the exact top-m (a pair outside them is beaten by m pairs that are inside).
    """
    n = s_row.shape[-1]
    with torch.no_grad():
        row_val, row_idx = s_row.topk(m, dim=-1)
        col_val, col_idx = s_col.topk(m, dim=-1)
        cand = (row_val.unsqueeze(-1) + col_val.unsqueeze(-2)).flatten(-2)  # (..., m*m)
        flat = cand.topk(m, dim=-1).indices
        rows = row_idx.gather(-1, torch.div(flat, m, rounding_mode="floor"))
        cols = col_idx.gather(-1, flat % m)
    scores = s_row.gather(-1, rows) + s_col.gather(-1, cols)
    return scores, rows * n + cols


def _prefilter(x: torch.Tensor, m: int, signed: bool) -> torch.Tensor:
    """Indices (..., k) of the rows kept by the rank-1 pre-filter of scores x (..., n)."""
    n = x.shape[-1]
    if signed:
        if 2 * m >= n:
            return torch.arange(n, device=x.device).expand(*x.shape[:-1], n)
        return torch.cat([x.topk(m, dim=-1).indices, x.topk(m, dim=-1, largest=False).indices], dim=-1)
    return x.topk(min(m, n), dim=-1).indices


def tucker_topk(s_row: torch.Tensor, s_col: torch.Tensor, cores: torch.Tensor, u: torch.Tensor, t: torch.Tensor,
                m: int, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tucker-decomposed query-key retrieval (TDQKR) with multi-core scoring and the rank-1 pre-filter.

    s_row, s_col (Q, H, r, n): each rank's row and column key scores. cores (H, h, r, r): the Tucker cores,
    whose sum C ranks the grid score S_row^T C S_col (r x r per slot). u, t (H, r): the rank-1 part of C
    (top singular vectors, `TuckerRetrieval.refresh`). Keeps the m rows with the best u^T S_row and the m
    columns with the best t^T S_col (with `signed`, also the m worst), scores the kept grid exactly with C
    and returns the per-core scores (Q, H, h, m) of its top-m, differentiable in s_row, s_col and cores,
    and their addresses (Q, H, m) = row * n + col. The search runs without autograd; only the m chosen
    slots are rescored with gradients.
    """
    Q, H, r, n = s_row.shape
    with torch.no_grad():
        rows = _prefilter(torch.einsum("qhrn,hr->qhn", s_row, u), m, signed)  # (Q, H, k_r)
        cols = _prefilter(torch.einsum("qhrn,hr->qhn", s_col, t), m, signed)  # (Q, H, k_c)
    sr = s_row.gather(-1, rows.unsqueeze(2).expand(Q, H, r, rows.shape[-1]))  # (Q, H, r, k_r)
    sc = s_col.gather(-1, cols.unsqueeze(2).expand(Q, H, r, cols.shape[-1]))  # (Q, H, r, k_c)
    k_c = cols.shape[-1]
    with torch.no_grad():
        total = torch.einsum("qhra,hrs,qhsb->qhab", sr, cores.sum(1), sc).flatten(-2)  # (Q, H, k_r * k_c)
        flat = total.topk(m, dim=-1).indices  # (Q, H, m)
        a, b = torch.div(flat, k_c, rounding_mode="floor"), flat % k_c
    ra = sr.gather(-1, a.unsqueeze(2).expand(Q, H, r, m))  # (Q, H, r, m)
    cb = sc.gather(-1, b.unsqueeze(2).expand(Q, H, r, m))
    core_scores = torch.einsum("qhrm,hirs,qhsm->qhim", ra, cores, cb)  # (Q, H, h, m)
    return core_scores, rows.gather(-1, a) * n + cols.gather(-1, b)


def weighted_bag(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor | None = None,
                 num_blocks: int = 1) -> torch.Tensor:
    """Weighted sums of table rows with `F.embedding_bag(mode="sum", per_sample_weights=...)`.

    table (S, Dv); slots (Q, J) row indices; weights (Q, J, h): weight of slot j for the i-th Dv/h columns
    (multi-core scoring; h = 1 weights whole rows); blocks (Q, J) in [0, num_blocks) or None.
    Returns (Q, num_blocks, Dv): out[q, p, cols_i] = sum_{j: blocks[q, j] = p} weights[q, j, i] table[slots[q, j], cols_i].
    The (Q, J, Dv) gather is never materialised: the table is viewed as (S*h, Dv/h) rows and each
    (token, block, core) is one bag, bags of one token ordered by block through a stable sort.
    """
    with torch.autocast(device_type=table.device.type, enabled=False):  # sums in the table's precision
        return _weighted_bag(table, slots, weights, blocks, num_blocks)


def _weighted_bag(table: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, blocks: torch.Tensor | None,
                  num_blocks: int) -> torch.Tensor:
    S, Dv = table.shape
    Q, J, h = weights.shape
    if Dv % h:
        raise ValueError(f"value width {Dv} is not divisible by {h} cores")
    chunks = table.view(S * h, Dv // h)  # row s*h + i holds columns i*Dv/h ... (i+1)*Dv/h - 1 of slot s
    cores = torch.arange(h, device=slots.device)
    index = slots.long().unsqueeze(-1) * h + cores  # (Q, J, h)
    w = weights.to(table.dtype)
    if blocks is None or num_blocks == 1:
        out = F.embedding_bag(index.transpose(1, 2).reshape(Q * h, J), chunks,
                              per_sample_weights=w.transpose(1, 2).reshape(Q * h, J), mode="sum")
        return out.view(Q, 1, Dv)
    blocks = blocks.long()
    order = blocks.argsort(dim=-1, stable=True)
    blocks = blocks.gather(1, order)
    index = index.gather(1, order.unsqueeze(-1).expand(Q, J, h))
    w = w.gather(1, order.unsqueeze(-1).expand(Q, J, h))
    counts = torch.zeros(Q, num_blocks, dtype=torch.long, device=slots.device).scatter_add_(
        1, blocks, torch.ones_like(blocks))  # (Q, E)
    start = counts.cumsum(-1) - counts  # (Q, E) first sorted position of each block
    base = torch.arange(Q, device=slots.device) * (J * h)
    st, ct = start.gather(1, blocks), counts.gather(1, blocks)  # (Q, J) for each sorted slot
    rank = torch.arange(J, device=slots.device) - st  # position within its block
    pos = (base[:, None, None] + (st * h + rank).unsqueeze(-1) + cores * ct.unsqueeze(-1)).reshape(-1)
    flat_index = torch.empty(Q * J * h, dtype=torch.long, device=slots.device).scatter_(0, pos, index.reshape(-1))
    flat_w = torch.zeros(Q * J * h, dtype=w.dtype, device=w.device).scatter(0, pos, w.reshape(-1))
    offsets = (base[:, None, None] + (start * h).unsqueeze(-1) + cores * counts.unsqueeze(-1)).reshape(-1)
    out = F.embedding_bag(flat_index, chunks, offsets, per_sample_weights=flat_w, mode="sum")  # (Q*E*h, Dv/h)
    return out.view(Q, num_blocks, Dv)


def variance_matching_std(dim: int, depth: int, mlp_ratio: float, topk: int, heads: int, prevalue_dim: int,
                          value_dim: int, score_var: float = 0.1) -> float:
    """UltraMemV2's table std (App. A, Eq. 26) in the fourth-root form: the memory output variance
    0.16 (1 + s2) sigma^4 Dp m H Dv / D (Eq. 22) set equal to the MLP's gives sigma^4 = the printed
    expression 0.2 k_inner D / (m H (1 + s2) Dp Dv L); the paper prints sigma^2 (a likely typo)."""
    return (0.2 * mlp_ratio * dim / (topk * heads * (1 + score_var) * prevalue_dim * value_dim * depth)) ** 0.25


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------

class SlotTables(nn.Module):
    """The sparse part of a memory layer: values (S, Dv) and, for PEER-style slots, pre-values (S, Dp).

    `activated_fraction` (J/S) is what `count_params` counts as used by one token.
    """

    def __init__(self, slots: int, value_dim: int, prevalue_dim: int = 0, reads_per_token: int = 1):
        super().__init__()
        self.values = nn.Parameter(torch.empty(slots, value_dim))
        self.prevalues = nn.Parameter(torch.empty(slots, prevalue_dim)) if prevalue_dim else None
        self.activated_fraction = min(1.0, reads_per_token / slots)


class TuckerRetrieval(nn.Module):
    """Query/key-LayerNorm'd TDQKR over an n_v x n_v grid: x (Q, D) -> core scores (Q, H, h, m), addresses (Q, H, m).

    query (D -> H*2*r_q*Dk, r_q = r with `query_per_rank` (UltraMemV2) or 1 (UltraMem: one query scores
    every rank's keys)); keys (H, 2, r, n_v, Dk); cores (H, h, r, r). Buffers `prefilter_u`,
    `prefilter_t` (H, r): the rank-1 part of the summed cores, recomputed by `refresh()` once per
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
        core = self.cores.detach().sum(1).double()  # (H, r, r)
        left, _, right_t = torch.linalg.svd(core)
        u, t = left[..., :, 0], right_t[..., 0, :]
        flip = (u * self.prefilter_u.double()).sum(-1) < 0  # keep the sign of the previous step
        sign = 1.0 - 2.0 * flip.double()
        self.prefilter_u.copy_(u * sign[:, None])
        self.prefilter_t.copy_(t * sign[:, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        Q, H, Dk = x.shape[0], self.heads, self.key_dim
        q = self.query(x)  # the one large matmul: under autocast if enabled
        with torch.autocast(device_type=x.device.type, enabled=False):  # scores and top-m in full precision
            dt = self.keys.dtype
            q = self.query_norm(q.to(dt).view(Q, H, 2, self.query_ranks, Dk))
            k = self.key_norm(self.keys)  # (H, 2, r, n_v, Dk)
            if self.query_ranks == 1:
                s = torch.einsum("qhsk,hsrnk->qhsrn", q.squeeze(3), k)
            else:
                s = torch.einsum("qhsrk,hsrnk->qhsrn", q, k)  # (Q, H, 2, r, n_v)
            return tucker_topk(s[:, :, 0], s[:, :, 1], self.cores, self.prefilter_u.to(dt), self.prefilter_t.to(dt),
                               self.topk, self.prefilter_signed)

    def macs_per_token(self) -> int:
        """Query projection, key scores, pre-filter, candidate grid with the summed core, per-core rescoring."""
        H, r, n, Dk, m = self.heads, self.rank, self.keys_per_side, self.key_dim, self.topk
        k = min(2 * m, n) if self.prefilter_signed else m
        query = self.dim * H * 2 * self.query_ranks * Dk
        keys = H * 2 * r * n * Dk
        prefilter = H * 2 * r * n
        candidates = H * (r * r * k + r * k * k)
        rescore = H * self.num_cores * m * (r * r + r)
        return query + keys + prefilter + candidates + rescore


class MemoryLayer(nn.Module, ABC):  # ABC: `read` is each kind's own
    """Base: `forward(u (B, T, D), c (B, D), record) -> gate(c) * read(u)` (B, T, D).

    Subclasses define `read(x (Q, D)) -> (out (Q, D), physical slots (Q, J))` and `read_macs_per_token()`.
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
        """u (B, T, D), c (B, D) -> (B, T, D). With `record.diagnostics`, fills record.memory[layer_index] with
        "slots_touched" (a () tensor: the fraction of the S rows this batch read) and "reads" (B*T*J)."""
        B, T, D = u.shape
        out, slots = self.read(u.reshape(B * T, D))
        if record is not None and record.diagnostics:
            with torch.no_grad():
                hit = torch.zeros(self.slots, device=slots.device).index_fill_(0, slots.reshape(-1), 1.0)
            record.memory[self.layer_index] = {"slots_touched": hit.mean(), "reads": slots.numel()}
        return self.adaLN_gate(c).unsqueeze(1) * out.view(B, T, D)

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

    query Linear(D, H*2*Dk) -> LayerNorm(Dk) per half; sub-keys (H, 2, n, Dk); values (S, D), no output
    projection. x (Q, D) -> sum over heads of softmax(top-m scores) . values.
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
        Q, H, m = x.shape[0], self.heads, self.topk
        q = self.query(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = self.query_norm(q.to(self.keys.dtype).view(Q, H, 2, self.key_dim))
            s = torch.einsum("qhsk,hsnk->qhsn", q, self.keys)  # (Q, H, 2, n)
            scores, slots = product_key_topk(s[:, :, 0], s[:, :, 1], m)  # (Q, H, m)
            weights = scores.softmax(dim=-1)
        out = weighted_bag(self.tables.values, slots.view(Q, H * m), weights.view(Q, H * m, 1))
        return out.view(Q, self.dim), slots.view(Q, H * m)

    def read_macs_per_token(self) -> int:
        H, n, Dk, m = self.heads, self.keys_per_side, self.key_dim, self.topk
        return self.dim * H * 2 * Dk + H * 2 * n * Dk + H * m * self.dim

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
        self.virtual_keys = side * keys  # n_v: E*S virtual addresses
        self.key_dim, self.rank, self.num_cores = key_dim, rank, cores
        if topk > self.virtual_keys:
            raise ConfigError(f"model.memory_topk={topk} exceeds the {self.virtual_keys} keys per side")
        self.retrieval = TuckerRetrieval(dim, self.virtual_keys, topk, heads, key_dim, rank, cores, query_per_rank,
                                         key_dim ** -norm_gain_exponent, prefilter_signed)
        if expansion > 1:
            # Fixed random shuffle of the E*S virtual addresses (physical row = a mod S, block = a div S),
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

    x (Q, D) -> retrieval (core scores (Q, H, h, m), virtual addresses) -> shuffled into physical rows and
    blocks -> per-block pooling of the values, core i weighting columns i*Dv/h.. of each row ->
    Linear(E*Dv, D) of the E pooled vectors (= sum of the E block projectors, pooling before projecting).
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
        Q, J, h = x.shape[0], self.heads * self.topk, self.num_cores
        core_scores, address = self.retrieval(x)  # (Q, H, h, m), (Q, H, m)
        rows, blocks = self.physical(address.reshape(Q, J))
        weights = core_scores.permute(0, 1, 3, 2).reshape(Q, J, h)
        pooled = weighted_bag(self.tables.values, rows, weights, blocks, self.expansion)  # (Q, E, Dv)
        return self.value_proj(pooled.reshape(Q, self.expansion * self.value_dim).to(x.dtype)), rows

    def read_macs_per_token(self) -> int:
        J = self.heads * self.topk
        return self.retrieval.macs_per_token() + J * self.value_dim + self.expansion * self.value_dim * self.dim

    def extra_repr(self) -> str:
        return (f"slots={self.slots}, expansion={self.expansion}, topk={self.topk}, heads={self.heads}, "
                f"key_dim={self.key_dim}, value_dim={self.value_dim}, rank={self.rank}, cores={self.num_cores}")


class UltraMemV2(_TuckerMemory):
    """UltraMemV2 (Huang et al., 2025): one query per Tucker rank, PEER-style slots without activation.

    x (Q, D) -> retrieval -> physical rows (virtual blocks summed) -> a_j = (P x . U_j) * s_j per core ->
    W_v sum_j a_j (.)_split V_j. P: Linear(D, Dp); U (S, Dp) pre-values; V (S, Dv) values; W_v: Linear(Dv, D).
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
        Q, J, h = x.shape[0], self.heads * self.topk, self.num_cores
        core_scores, address = self.retrieval(x)  # (Q, H, h, m), (Q, H, m)
        rows, _ = self.physical(address.reshape(Q, J))  # virtual blocks share the one projection: summed
        p = self.prevalue_proj(x)  # (Q, Dp)
        pre = F.embedding(rows, self.tables.prevalues)  # (Q, J, Dp)
        dot = torch.einsum("qjd,qd->qj", pre, p.to(pre.dtype))  # PEER's one-neuron "expert", no activation
        weights = core_scores.permute(0, 1, 3, 2).reshape(Q, J, h) * dot.unsqueeze(-1)
        pooled = weighted_bag(self.tables.values, rows, weights)  # (Q, 1, Dv)
        return self.value_proj(pooled.view(Q, self.value_dim).to(x.dtype)), rows

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
