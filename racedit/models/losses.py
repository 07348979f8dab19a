"""Auxiliary losses of the MoE routers: router similarity, per-layer regularization, balance, z-loss.

Each loss reads what the MoE layers wrote into the side channel (`racedit.models.records.ForwardRecord`)
and is weighted by its own `LossConfig` coefficient (0 = off; the loss is then not computed at all).
`auxiliary_losses` is what the training step calls; the single-layer functions are public for tests,
ablations and users.

Coefficients. The Race-DiT paper (arXiv 2503.16057) publishes neither its loss coefficients nor the
reductions over layers. The values the shipped configs use are this project's assumptions, starting points
for a sweep: docs/method/losses.md ("Coefficients the shipped configs assume"), with the formulas.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, E experts, p patch side,
C data channels (the epsilon / velocity part of the output, also for learn_sigma models); a target head
predicts p*p*C values per token. In the formulas P = softmax(logits) over experts, a tensor, and M the
routing mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from racedit.models.global_select import sum_over_ranks, world_size
from racedit.models.records import ForwardRecord, MoELayerRecord
from racedit.models.routing import GLOBAL_SELECT_METHODS, gather_rows

__all__ = [
    "router_similarity_loss",
    "balance_loss",
    "z_loss",
    "per_layer_regularization",
    "patchify_target",
    "auxiliary_losses",
    "AUX_LOSS_NAMES",
]

# LossConfig field -> logged name of the loss term (flat names; "loss" itself is the weighted total).
AUX_LOSS_NAMES = {
    "router_similarity": "loss/router_similarity",
    "per_layer_reg": "loss/per_layer_reg",
    "balance": "loss/balance",
    "z_loss": "loss/z_loss",
}


def _gathered(logits: torch.Tensor, mask: torch.Tensor, group, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows every loss reads: all ranks' logits and masks for method="gather", else this rank's own."""
    if method not in GLOBAL_SELECT_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {list(GLOBAL_SELECT_METHODS)}")
    if method == "gather":
        return gather_rows(logits, group)[0], gather_rows(mask, group)[0]
    return logits, mask


def _global_gradient(loss: torch.Tensor, world: int) -> torch.Tensor:
    """Same value, gradient multiplied by `world`.

    A loss over the all-gathered batch is computed identically on every rank, but each rank backpropagates
    only through its own rows; data-parallel training then averages the ranks' gradients, which would divide
    the global loss's gradient by the world size. Scaling here makes the update the gradient of the loss.
    """
    return loss if world == 1 else loss + (world - 1) * (loss - loss.detach())


def router_similarity_loss(logits: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-6,
                           method: str = "radix") -> torch.Tensor:
    """Router similarity loss of one MoE layer (Race-DiT §5, Eqs. 9-11; docs/method/losses.md), a scalar.

    logits (N, E): gating-head logits; mask (N, E) bool: the routing mask (no gradient).
    P = softmax(logits) over experts (used by this loss only, whatever the gating function), P' = P^T P,
    M' = M^T M (co-selection counts). Weights W_ii = E * M'_ii / sum_j M'_jj and, off the diagonal,
    W_ij = (E^2 - E) * M'_ij / sum_{a != b} M'_ab; loss = (1/N) sum_ij W_ij P'_ij. Equals 1 when every expert
    and every pair of experts is used equally often (any P). The denominators are guarded by `eps` (the
    off-diagonal sum is 0 when no token has two experts). Computed in float32 (float64 stays float64).

    `group`: the process group the routing selection spanned (race_scope=global, `MoELayerRecord.group`);
    the loss is then computed over the batch of all its ranks, with gradient to this rank's logits, scaled
    so that data-parallel gradient averaging yields the gradient of the global loss. method "radix": from
    M', P' (symmetric: their upper triangles) and N summed over the ranks, one all_reduce of E(E+1) + 1
    values; "gather": over the all-gathered logits and masks (the reference).
    """
    logits, mask = _gathered(logits, mask, group, method)
    world = world_size(group)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    E = logits.shape[1]
    p = torch.softmax(logits.to(dtype), dim=-1)
    m = mask.detach().to(dtype)
    co, pp, n = m.t() @ m, p.t() @ p, m.new_tensor([logits.shape[0]])  # (E, E), (E, E), (1,)
    if method != "gather" and world > 1:
        co, pp, n = _sum_symmetric_over_ranks(co, pp, n, group)
    diag = torch.diagonal(co)
    off = co - torch.diag_embed(diag)
    weights = off * ((E * E - E) / off.sum().clamp_min(eps)) + torch.diag_embed(diag * (E / diag.sum().clamp_min(eps)))
    loss = (weights * pp).sum() / n.clamp_min(1).squeeze(0)
    return _global_gradient(loss, world)


def _sum_symmetric_over_ranks(co: torch.Tensor, pp: torch.Tensor, n: torch.Tensor,
                              group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric (E, E) co and pp and n (1,) summed over the ranks (`sum_over_ranks`) through their upper
    triangles, half the bytes of the full matrices."""
    E = co.shape[0]
    upper = torch.triu_indices(E, E, device=co.device)
    co_t, pp_t, n = sum_over_ranks([co[upper[0], upper[1]], pp[upper[0], upper[1]], n], group)

    def full(t: torch.Tensor) -> torch.Tensor:
        m = t.new_zeros(E, E).index_put((upper[0], upper[1]), t)
        return m + m.t() - torch.diag_embed(torch.diagonal(m))

    return full(co_t), full(pp_t), n


def balance_loss(logits: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-6,
                 method: str = "radix") -> torch.Tensor:
    """Switch-Transformer load-balance loss E * sum_e f_e * P_e of one MoE layer, a scalar.

    f_e = share of the selected (token, expert) pairs that went to expert e (from the mask, no gradient),
    P_e = mean over tokens of softmax(logits)_e. Equals 1 at uniform load. logits (N, E), mask (N, E) bool.
    `group` as in `router_similarity_loss`; method "radix" all_reduces the E-vectors of loads and summed
    probabilities and N (2E + 1 values). Not in the Race-DiT recipe; its Table 2 compares against it.
    """
    logits, mask = _gathered(logits, mask, group, method)
    world = world_size(group)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    E = logits.shape[1]
    load = mask.detach().to(dtype).sum(dim=0)
    p_sum = torch.softmax(logits.to(dtype), dim=-1).sum(dim=0)
    n = load.new_tensor([logits.shape[0]])
    if method != "gather" and world > 1:
        load, p_sum, n = sum_over_ranks([load, p_sum, n], group)
    f = load / load.sum().clamp_min(eps)
    p_mean = p_sum / n.clamp_min(1)
    return _global_gradient(E * (f * p_mean).sum(), world)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss mean_i (logsumexp_e logits[i, e])^2 over tokens i of one layer, a scalar; logits (N, E).

    Keeps the logits small, which matters with identity gating where nothing bounds their scale.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.logsumexp(logits.to(dtype), dim=-1).square().mean()


def patchify_target(target: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Diffusion target (B, C, H, W) -> per-token target (B, L, p*p*C) for L = num_tokens patches.

    The layout is `DiT.patchify`'s ((p, q, c) inside a token, tokens row-major), the one the final layer's
    unpatchify and the router target heads use; the patch side p follows from H and L.
    """
    B, C, H, W = target.shape
    side = int(round(num_tokens ** 0.5))
    if side * side != num_tokens or H % side or W % side or H // side != W // side:
        raise ValueError(f"cannot cut a {H}x{W} target into {num_tokens} square patches")
    p = H // side
    return rearrange(target, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def per_layer_regularization(predictions: list[torch.Tensor], target_tokens: torch.Tensor) -> torch.Tensor:
    """Per-layer regularization (Race-DiT §6 and §9, Fig. 12; docs/method/losses.md), a scalar.

    predictions: the router target-head outputs of the MoE layers, each (B, L, p*p*C); target_tokens
    (B, L, p*p*C): the objective's target patchified to tokens (`patchify_target`). Per-element mean squared
    error, averaged over layers, in float32. The heads are trained by this loss only and do not take part
    in the forward output, so they change nothing at sampling time.
    """
    if not predictions:
        raise ValueError("per-layer regularization needs at least one MoE layer with a target head")
    target = target_tokens.detach().float()
    losses = []
    for pred in predictions:
        if pred.shape != target.shape:
            raise ValueError(f"target head predicts {tuple(pred.shape)} per layer but the target is "
                             f"{tuple(target.shape)} per token")
        losses.append(F.mse_loss(pred.float(), target))
    return torch.stack(losses).mean()


def _layers(record: ForwardRecord) -> list[MoELayerRecord]:
    layers = record.moe_layers()
    if not layers:
        raise ValueError("an auxiliary routing loss is switched on (loss.* > 0) but the model has no MoE layer; "
                         "set the loss coefficients to 0 for dense models")
    return layers


def auxiliary_losses(record: ForwardRecord, loss_cfg, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The auxiliary losses switched on in `loss_cfg` (a `LossConfig`), unweighted, by logged name.

    record: the filled side channel of the forward pass; target (B, C, H, W): the objective's target (only
    needed for per-layer regularization). Every loss is the mean over MoE layers. Returns e.g.
    {"loss/router_similarity": L_sim, "loss/per_layer_reg": L_plr}; the caller adds coefficient * term.
    """
    out: dict[str, torch.Tensor] = {}
    if loss_cfg.router_similarity > 0:
        out[AUX_LOSS_NAMES["router_similarity"]] = torch.stack(
            [router_similarity_loss(r.logits, r.mask, group=r.group, method=r.global_select) for r in _layers(record)]).mean()
    if loss_cfg.balance > 0:
        out[AUX_LOSS_NAMES["balance"]] = torch.stack(
            [balance_loss(r.logits, r.mask, group=r.group, method=r.global_select) for r in _layers(record)]).mean()
    if loss_cfg.z_loss > 0:
        out[AUX_LOSS_NAMES["z_loss"]] = torch.stack([z_loss(r.logits) for r in _layers(record)]).mean()
    if loss_cfg.per_layer_reg > 0:
        layers = _layers(record)
        if any(r.target_pred is None for r in layers):
            raise ValueError("loss.per_layer_reg > 0 needs the router target heads: set model.router_target_head=true")
        if target is None:
            raise ValueError("per-layer regularization needs the diffusion target")
        tokens = patchify_target(target, layers[0].target_pred.shape[1])
        out[AUX_LOSS_NAMES["per_layer_reg"]] = per_layer_regularization([r.target_pred for r in layers], tokens)
    return out
