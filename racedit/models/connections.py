"""How a sublayer reads from and writes to the residual stream: residual, hyper- and frac-connections.

One interface for all three. `width(h) -> (branch_input, carry)` and `depth(branch_output, carry) -> h`.
The sublayer (attention or feed-forward, with its adaLN norm, modulation and gate inside) runs between them.
What each computes: docs/method/connections.md (Hyper-Connections, arXiv 2409.19606; Frac-Connections,
arXiv 2503.14125).

Letters (docs/method/README.md): B images, L tokens per image, D width, n hyper-connection streams,
n_frac frac-connection fractions (`model.connections_m`). Stream state h between sublayers:
  residual  (B, L, D)
  hyper     (n, B, L, D)        n copies of the stream, stream-major, so the static mix is one
                                (n+1, n) x (n, B*L*D) matmul: half the memory traffic of mixing a
                                (B, L, n, D) layout, which is what bounds HC's cost on CPU
  frac      (B, L, D)           viewed as (B, L, n_frac, D/n_frac) fractions

Initialisation makes every variant equal the plain residual network: hyper uses A_m = e_(sublayer_index
mod n) (attention 2i, feed-forward 2i+1), A_r = I, beta = 1, so all streams stay identical and their sum
before the final layer is n*h (the final LayerNorm removes the factor, up to its eps); frac starts at
Y = A = I, beta = 1, which is exactly the residual. Dynamic weights start at 0 and their scales at 0.01.
The HC paper's optional sqrt(n) output-weight scaling is not applied (its direction is not stated).
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

    static_alpha (n_in, n_out) and static_beta (n_in,) for n_in stream rows and n_out mixing outputs.
    Dynamic: a non-affine LayerNorm of each row (width `row_dim`), zero-initialised projections
    W_alpha (row_dim, n_out) and
    W_beta (row_dim, 1), learnable scalar scales s_alpha = s_beta = 0.01, tanh optional.
    """

    def __init__(self, static_alpha: torch.Tensor, row_dim: int, dynamic: bool, use_tanh: bool):
        super().__init__()
        n_in, n_out = static_alpha.shape
        self.static_alpha = nn.Parameter(static_alpha.clone())
        self.static_beta = nn.Parameter(torch.ones(n_in))
        self.dynamic, self.use_tanh, self.row_dim = dynamic, use_tanh, row_dim
        if dynamic:
            self.norm = nn.LayerNorm(row_dim, elementwise_affine=False)
            self.dynamic_alpha = nn.Parameter(torch.zeros(row_dim, n_out))
            self.dynamic_beta = nn.Parameter(torch.zeros(row_dim, 1))
            self.alpha_scale = nn.Parameter(torch.tensor(0.01))
            self.beta_scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (..., n_in, row_dim) -> alpha (n_in, n_out) or (..., n_in, n_out), beta (n_in,) or (..., n_in)."""
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
        n_in, n_out = self.static_alpha.shape
        return num_tokens * n_in * self.row_dim * (n_out + 1)


class HyperConnection(nn.Module):
    """Hyper-connection of one sublayer over n streams, static (SHC) or dynamic (DHC)."""

    def __init__(self, dim: int, n: int, sublayer_index: int, dynamic: bool = False, use_tanh: bool = True):
        super().__init__()
        read = torch.zeros(n, 1)
        read[sublayer_index % n] = 1.0  # A_m = e_(sublayer_index mod n): consecutive sublayers read different streams
        self.weights = _DynamicWeights(torch.cat([read, torch.eye(n)], dim=1), dim, dynamic, use_tanh)
        self.n, self.dim = n, dim

    def width(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """h (n, B, L, D) -> branch input (B, L, D), carry (residual mix (n, B, L, D), beta)."""
        n = self.n
        if not self.weights.dynamic:
            alpha, beta = self.weights.static_alpha.to(h.dtype), self.weights.static_beta.to(h.dtype)
            mix = (alpha.t() @ h.reshape(n, -1)).view(n + 1, *h.shape[1:])
            return mix[0], (mix[1:], beta.view(n, 1, 1, 1))
        alpha, beta = self.weights(h.movedim(0, 2))  # per token: (B, L, n, n+1), (B, L, n)
        mix = torch.einsum("sbtd,btsj->jbtd", h, alpha.to(h.dtype))
        return mix[0], (mix[1:], beta.to(h.dtype).permute(2, 0, 1).unsqueeze(-1))

    def depth(self, y: torch.Tensor, carry: tuple) -> torch.Tensor:
        """y (B, L, D) -> stream i gets residual_i + beta_i * y: (n, B, L, D)."""
        residual, beta = carry
        return residual + beta * y.unsqueeze(0)

    def macs(self, num_tokens: int) -> int:
        n = self.n
        return num_tokens * self.dim * (n * (n + 1) + n) + self.weights.macs(num_tokens)


class FracConnection(nn.Module):
    """Frac-connection of one sublayer over n_frac fractions of the stream, static (SFC) or dynamic (DFC)."""

    def __init__(self, dim: int, n_frac: int, dynamic: bool = False, use_tanh: bool = True):
        super().__init__()
        if dim % n_frac:
            raise ValueError(f"model.connections_m={n_frac} must divide the width {dim}")
        self.weights = _DynamicWeights(torch.cat([torch.eye(n_frac), torch.eye(n_frac)], dim=1), dim // n_frac,
                                       dynamic, use_tanh)
        self.n_frac, self.dim = n_frac, dim

    def width(self, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """h (B, L, D) -> branch input (B, L, D) = Y^T h_f, carry (A^T h_f (B, L, n_frac, D/n_frac), beta),
        h_f being h as fractions."""
        fractions = h.unflatten(-1, (self.n_frac, self.dim // self.n_frac))
        alpha, beta = self.weights(fractions)
        if alpha.ndim == 2:
            mix = torch.einsum("btsd,sj->btjd", fractions, alpha.to(h.dtype))
        else:
            mix = torch.einsum("btsd,btsj->btjd", fractions, alpha.to(h.dtype))
        return mix[:, :, :self.n_frac].flatten(-2), (mix[:, :, self.n_frac:], beta.to(h.dtype))

    def depth(self, y: torch.Tensor, carry: tuple) -> torch.Tensor:
        """y (B, L, D) -> A^T h_f + beta (per fraction) * y, back to (B, L, D)."""
        residual, beta = carry
        return (residual + beta.unsqueeze(-1) * y.unflatten(-1, (self.n_frac, self.dim // self.n_frac))).flatten(-2)

    def macs(self, num_tokens: int) -> int:
        n_frac = self.n_frac
        return num_tokens * self.dim * (2 * n_frac + 1) + self.weights.macs(num_tokens)


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
    """Embedded tokens (B, L, D) -> the stream state the first block reads."""
    if cfg.connections == "hyper":
        return h.unsqueeze(0).expand(cfg.connections_n, -1, -1, -1).contiguous()
    return h


def merge_streams(h: torch.Tensor, cfg) -> torch.Tensor:
    """The last block's stream state -> (B, L, D) for the final layer (hyper: sum over streams)."""
    if cfg.connections == "hyper":
        return h.sum(dim=0)
    return h
