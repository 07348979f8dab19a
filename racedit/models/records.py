"""The side channel of one DiT forward pass.

MoE layers (and later memory layers) write what the training losses and routing diagnostics need into a
`ForwardRecord` that the caller passes to `DiT.forward(..., record=rec)`. Nothing travels through tuple
returns. Each layer writes under its own block index, so a recomputation under activation checkpointing
overwrites its own entry instead of appending a duplicate.

Letters (docs/method/README.md): B images, L tokens per image, N = B*L tokens, E experts, p patch side,
C input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoELayerRecord:
    """What one MoE feed-forward layer reports for one forward pass: its router's output (`Router.forward`)."""

    logits: torch.Tensor  # (N, E) gating-head logits, before the gating function (fp32)
    scores: torch.Tensor  # (N, E) gate values S = G(logits); also the output weights
    mask: torch.Tensor  # (N, E) bool, selected (token, expert) pairs; carries no gradient
    target_pred: torch.Tensor | None = None  # (B, L, p*p*C) router target-head output (per-layer regularization)
    kth_score: torch.Tensor | None = None  # () the batch's K-th largest score (training, batch-coupled routing);
    # the inference threshold's EMA is updated from it after the backward (`moe.update_thresholds`)
    group: object | None = None  # process group the selection spanned (race_scope=global), for global losses
    global_select: str = "radix"  # how the global losses reduce over `group`: radix (small sums) | gather


class ForwardRecord:
    """Filled during one `DiT.forward`; read by the losses and the diagnostics, then dropped.

    `moe` is always filled (the losses need it). The diagnostics-only fields, `block_output_norms` and
    `memory`, are filled only when `diagnostics` is set, so ordinary training steps do not pay for them.

    A plain class, not a dataclass: FSDP2 rebuilds the dataclass (and dict) arguments of a sharded block's
    forward around the tensors in them that need gradients, so a dataclass record would reach each block as a
    copy and the layers' entries would be lost (`racedit.training.sharding`). A plain object passes as it is.
    """

    def __init__(self, diagnostics: bool = False, moe: dict[int, MoELayerRecord] | None = None,
                 block_output_norms: dict[int, torch.Tensor] | None = None, memory: dict[int, dict] | None = None):
        self.diagnostics = diagnostics
        self.moe: dict[int, MoELayerRecord] = {} if moe is None else moe  # block index -> record
        # block index -> (2,) attn/ff branch norms
        self.block_output_norms: dict[int, torch.Tensor] = {} if block_output_norms is None else block_output_norms
        self.memory: dict[int, dict] = {} if memory is None else memory  # block index -> memory-layer statistics

    def moe_layers(self) -> list[MoELayerRecord]:
        """MoE records in block order."""
        return [self.moe[i] for i in sorted(self.moe)]

    def kth_scores(self) -> dict[int, torch.Tensor]:
        """Block index -> K-th largest score () of each MoE layer that recorded one (training, batch-coupled
        routing): what `racedit.models.moe.update_thresholds` moves the inference thresholds by."""
        return {i: self.moe[i].kth_score for i in sorted(self.moe) if self.moe[i].kth_score is not None}
