"""How a sublayer reads from and writes to the residual stream: residual, hyper- and frac-connections.

One interface for all three. `width(h) -> (branch_input, carry)` and `depth(branch_output, carry) -> h`.
The sublayer (attention or feed-forward, with its adaLN norm, modulation and gate inside) runs between them.

Letters: B images, T tokens, D width, n hyper-connection streams, m frac-connection fractions.
Stream state h between sublayers:
  residual  (B, T, D)
  hyper     (n, B, T, D)   n copies of the stream (Hyper-Connections, Zhu et al., ICLR 2025); stream-major,
                           so the static mix is one (n+1, n) x (n, B*T*D) matmul: half the memory traffic of
                           mixing a (B, T, n, D) layout, which is what bounds HC's cost on CPU
  frac      (B, T, D)      viewed as (B, T, m, D/m) fractions (Frac-Connections, Zhu et al., 2025)

Initialisation makes every variant equal the plain residual network: hyper uses A_m = e_{k mod n} (k =
sublayer number: attention 2i, feed-forward 2i+1), A_r = I, B = 1, so all streams stay identical and their
sum before the final layer is n·h (the final LayerNorm removes the factor, up to its eps); frac starts at
Y = A = I, B = 1, which is exactly the residual. Dynamic weights start at 0 and their scales at 0.01.
The notes' optional sqrt(n) output-weight scaling is not applied (its direction is not stated).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ResidualConnection(nn.Module):
    """Plain pre-norm residual: the branch reads h and h + branch is written back."""

    def width(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, h

    def depth(self, y: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        return carry + y

    def macs(self, num_tokens: int) -> int:
        return 0


class _DynamicWeights(nn.Module):
    """Static connection weights plus optional token-dependent corrections (DHC / DFC).

    static_alpha (S, J) and static_beta (S,) for S stream rows and J mixing outputs. Dynamic: a non-affine
    LayerNorm of each row (width `row_dim`), zero-initialised projections W_alpha (row_dim, J) and
    W_beta (row_dim, 1), learnable scalar scales s_alpha = s_beta = 0.01, tanh optional.
    """

    def __init__(self, static_alpha: torch.Tensor, row_dim: int, dynamic: bool, use_tanh: bool):
        super().__init__()
        rows, outs = static_alpha.shape
        self.static_alpha = nn.Parameter(static_alpha.clone())
        self.static_beta = nn.Parameter(torch.ones(rows))
        self.dynamic, self.use_tanh, self.row_dim = dynamic, use_tanh, row_dim
        if dynamic:
            self.norm = nn.LayerNorm(row_dim, elementwise_affine=False)
            self.dynamic_alpha = nn.Parameter(torch.zeros(row_dim, outs))
            self.dynamic_beta = nn.Parameter(torch.zeros(row_dim, 1))
            self.alpha_scale = nn.Parameter(torch.tensor(0.01))
            self.beta_scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (..., S, row_dim) -> alpha (S, J) or (..., S, J), beta (S,) or (..., S)."""
        if not self.dynamic:
            return self.static_alpha, self.static_beta
        act = torch.tanh if self.use_tanh else (lambda z: z)
        normed = self.norm(rows)
        alpha = self.static_alpha + self.alpha_scale * act(normed @ self.dynamic_alpha)
        beta = self.static_beta + self.beta_scale * act(normed @ self.dynamic_beta).squeeze(-1)
        return alpha, beta

    def no_weight_decay(self) -> set[str]:
        """Static weights and scales are not decayed; the dynamic projections are (HC/FC papers)."""
        names = {"static_alpha", "static_beta"}
        return names | ({"alpha_scale", "beta_scale"} if self.dynamic else set())

    def macs(self, num_tokens: int) -> int:
        if not self.dynamic:
            return 0
        rows, outs = self.static_alpha.shape
        return num_tokens * rows * self.row_dim * (outs + 1)


class HyperConnection(nn.Module):
    """Hyper-connection of one sublayer over n streams, static (SHC) or dynamic (DHC)."""

    def __init__(self, dim: int, n: int, sublayer_index: int, dynamic: bool = False, use_tanh: bool = True):
        super().__init__()
        read = torch.zeros(n, 1)
        read[sublayer_index % n] = 1.0  # A_m = e_{k mod n}: consecutive sublayers read different streams
        self.weights = _DynamicWeights(torch.cat([read, torch.eye(n)], dim=1), dim, dynamic, use_tanh)
        self.n, self.dim = n, dim

    def width(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """h (n, B, T, D) -> branch input (B, T, D), carry (residual mix (n, B, T, D), beta)."""
        n = self.n
        if not self.weights.dynamic:
            alpha, beta = self.weights.static_alpha.to(h.dtype), self.weights.static_beta.to(h.dtype)
            mix = (alpha.t() @ h.reshape(n, -1)).view(n + 1, *h.shape[1:])
            return mix[0], (mix[1:], beta.view(n, 1, 1, 1))
        alpha, beta = self.weights(h.movedim(0, 2))  # per token: (B, T, n, n+1), (B, T, n)
        mix = torch.einsum("sbtd,btsj->jbtd", h, alpha.to(h.dtype))
        return mix[0], (mix[1:], beta.to(h.dtype).permute(2, 0, 1).unsqueeze(-1))

    def depth(self, y: torch.Tensor, carry: tuple) -> torch.Tensor:
        """y (B, T, D) -> stream i gets residual_i + beta_i * y: (n, B, T, D)."""
        residual, beta = carry
        return residual + beta * y.unsqueeze(0)

    def macs(self, num_tokens: int) -> int:
        n = self.n
        return num_tokens * self.dim * (n * (n + 1) + n) + self.weights.macs(num_tokens)


class FracConnection(nn.Module):
    """Frac-connection of one sublayer over m fractions of the stream, static (SFC) or dynamic (DFC)."""

    def __init__(self, dim: int, m: int, dynamic: bool = False, use_tanh: bool = True):
        super().__init__()
        if dim % m:
            raise ValueError(f"model.connections_m={m} must divide the width {dim}")
        self.weights = _DynamicWeights(torch.cat([torch.eye(m), torch.eye(m)], dim=1), dim // m, dynamic, use_tanh)
        self.m, self.dim = m, dim

    def width(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """h (B, T, D) -> branch input (B, T, D) = Y^T H, carry (A^T H (B, T, m, D/m), beta)."""
        fractions = h.unflatten(-1, (self.m, self.dim // self.m))
        alpha, beta = self.weights(fractions)
        if alpha.ndim == 2:
            mix = torch.einsum("btsd,sj->btjd", fractions, alpha.to(h.dtype))
        else:
            mix = torch.einsum("btsd,btsj->btjd", fractions, alpha.to(h.dtype))
        return mix[:, :, :self.m].flatten(-2), (mix[:, :, self.m:], beta.to(h.dtype))

    def depth(self, y: torch.Tensor, carry: tuple) -> torch.Tensor:
        """y (B, T, D) -> A^T H + beta (per fraction) * y, back to (B, T, D)."""
        residual, beta = carry
        return (residual + beta.unsqueeze(-1) * y.unflatten(-1, (self.m, self.dim // self.m))).flatten(-2)

    def macs(self, num_tokens: int) -> int:
        m = self.m
        return num_tokens * self.dim * (2 * m + 1) + self.weights.macs(num_tokens)


def build_connection(cfg, dim: int, sublayer_index: int) -> nn.Module:
    """The connection module of one sublayer for a resolved ModelConfig."""
    if cfg.connections == "residual":
        return ResidualConnection()
    if cfg.connections == "hyper":
        return HyperConnection(dim, cfg.connections_n, sublayer_index, cfg.connections_dynamic, cfg.connections_tanh)
    if cfg.connections == "frac":
        return FracConnection(dim, cfg.connections_m, cfg.connections_dynamic, cfg.connections_tanh)
    raise ValueError(f"unknown model.connections {cfg.connections!r}; allowed: residual, hyper, frac")


def expand_streams(h: torch.Tensor, cfg) -> torch.Tensor:
    """Embedded tokens (B, T, D) -> the stream state the first block reads."""
    if cfg.connections == "hyper":
        return h.unsqueeze(0).expand(cfg.connections_n, -1, -1, -1).contiguous()
    return h


def merge_streams(h: torch.Tensor, cfg) -> torch.Tensor:
    """The last block's stream state -> (B, T, D) for the final layer (hyper: sum over streams)."""
    if cfg.connections == "hyper":
        return h.sum(dim=0)
    return h
