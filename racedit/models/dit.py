"""The DiT backbone: embedders, one pluggable `DiTBlock`, `FinalLayer`, `DiT`.

Letters (docs/method/README.md): B images, C input channels, H x W input side, p patch side,
L = (H/p)(W/p) tokens per image, D width, C_out output channels (2C with learned variance), h MLP hidden
width, n hyper-connection streams.

The block follows DiT's adaLN-Zero design: six modulation vectors from the conditioning c (timestep +
class embedding), LayerNorm without affine (eps 1e-6), and zero-initialised gates so every block is the
identity at initialisation. The feed-forward part is a slot: the dense MLP, or a Mixture of Experts
(`racedit.models.moe`); an optional memory layer (`racedit.models.memory`) reads the same input beside it
through its own zero-initialised gate. All zero-inits live in `DiT.initialize_weights`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.embeddings import get_timestep_embedding
from einops import rearrange
from timm.models.vision_transformer import Attention, PatchEmbed
from torch.utils.checkpoint import checkpoint

from racedit.models.connections import ResidualConnection, build_connection, expand_streams, merge_streams
from racedit.models.memory import build_memory
from racedit.models.moe import MoEFeedForward
from racedit.models.records import ForwardRecord


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of x (B, L, D) by per-image shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of positions (M,) into (M, dim): sines of all frequencies, then cosines."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim), row-major tokens.

    The first half of the channels encodes the column index, the second half the row index (the layout
    of the official DiT checkpoints, so their stored `pos_embed` equals this one).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): 256-dim sinusoidal frequency embedding, then a 2-layer MLP.

    The sinusoid is diffusers' `get_timestep_embedding`, cosines first: cos(t w_j), then sin(t w_j), with
    w_j = exp(-ln(10^4) j / (128 - freq_shift)). `freq_shift` 0 is DiT's frequency ladder; 1 is the one of
    diffusers' DiTTransformer2DModel. The MLP keeps DiT's key names (mlp.0, mlp.2).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, frequency_embedding_size) float32."""
        return get_timestep_embedding(t, self.frequency_embedding_size, flip_sin_to_cos=True,
                                      downscale_freq_shift=self.freq_shift, max_period=10000)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). With `null_class`, label `num_classes` has its own row: the class of
    classifier-free guidance's unconditional half and of dropped labels.

    Labels are dropped by the caller, from its seeded draws (`MicroBatchDraws.labels`), not in here, so a
    training step does not depend on the global RNG.
    """

    def __init__(self, num_classes: int, hidden_size: int, null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class FeedForward(nn.Module):
    """The dense DiT MLP: Linear(D, h) -> GELU(tanh) -> Linear(h, D), on (B, L, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, u: torch.Tensor, record: ForwardRecord | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(u)))

    def macs(self, num_tokens: int) -> int:
        """Forward multiply-accumulates for `num_tokens` tokens."""
        return num_tokens * 2 * self.fc1.in_features * self.fc1.out_features


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block with a pluggable feed-forward `mlp` and pluggable stream connections.

    `mlp` is any module called as `mlp(u, record) -> (B, L, D)` where u is the modulated, normalised
    input; its output is scaled by the block's zero-initialised gate. `attn_connection` and
    `mlp_connection` (racedit.models.connections) decide how each sublayer reads from and writes to the
    stream state h: plain residual (B, L, D), hyper-connections (n, B, L, D) (stream-major) or
    frac-connections. `memory` (optional, racedit.models.memory) is called as
    `memory(u, c, record) -> (B, L, D)` on the same u; it applies its own adaLN gate, and its output is
    added to the gated feed-forward output before the connection's depth step.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp: nn.Module, qk_norm: bool = False,
                 layer_index: int = 0, attn_connection: nn.Module | None = None,
                 mlp_connection: nn.Module | None = None, memory: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.attn_connection = attn_connection or ResidualConnection()
        self.mlp_connection = mlp_connection or ResidualConnection()
        self.memory = memory
        self.layer_index = layer_index

    def forward(self, h: torch.Tensor, c: torch.Tensor, record: ForwardRecord | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x, carry = self.attn_connection.width(h)
        attn_out = gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = self.attn_connection.depth(attn_out, carry)
        x, carry = self.mlp_connection.width(h)
        u = modulate(self.norm2(x), shift_mlp, scale_mlp)
        ff_out = gate_mlp.unsqueeze(1) * self.mlp(u, record)
        if self.memory is not None:
            ff_out = ff_out + self.memory(u, c, record)
        if record is not None and record.diagnostics:  # Fig. 5: size of what each branch adds to the residual
            record.block_output_norms[self.layer_index] = torch.stack(
                [attn_out.detach().float().norm(dim=-1).mean(), ff_out.detach().float().norm(dim=-1).mean()])
        return self.mlp_connection.depth(ff_out, carry)

    def macs(self, num_tokens: int) -> int:
        """Forward MACs for one image of `num_tokens` tokens (DiT's "Gflops" convention)."""
        d = self.norm1.normalized_shape[0]
        attention = num_tokens * 4 * d * d + 2 * num_tokens * num_tokens * d  # qkv + proj, QK^T + AV
        connections = self.attn_connection.macs(num_tokens) + self.mlp_connection.macs(num_tokens)
        memory = self.memory.macs(num_tokens) if self.memory is not None else 0
        return attention + 6 * d * d + self.mlp.macs(num_tokens) + connections + memory


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map of each token (B, L, D) to its patch (B, L, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_feedforward(cfg, layer_index: int) -> nn.Module:
    """The block's feed-forward slot for a resolved ModelConfig: dense MLP or MoE."""
    d = cfg.hidden_size
    if not cfg.moe_experts:
        return FeedForward(d, int(d * cfg.mlp_ratio))
    return MoEFeedForward(
        d, cfg.moe_experts, cfg.moe_k, mlp_ratio=cfg.mlp_ratio, routing=cfg.routing, gating=cfg.gating,
        race_scope=cfg.race_scope, global_select=cfg.global_select, threshold_decay=cfg.threshold_decay,
        inference_routing=cfg.inference_routing,
        target_dim=cfg.patch_size ** 2 * cfg.in_channels if cfg.router_target_head else 0,
        layer_index=layer_index,
    )


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer.

    forward(x (B, C, H, W), t (B,), y (B,), record=None) -> (B, C_out, H, W), where C_out = 2C with
    learned variance and C otherwise. `record`, a `ForwardRecord`, collects what MoE layers report.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg  # resolved ModelConfig (every preset field filled in)
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * 2 if cfg.learn_sigma else cfg.in_channels
        self.learn_sigma = cfg.learn_sigma
        self.num_classes = cfg.num_classes
        self.patch_size = cfg.patch_size
        self.input_size = cfg.input_size
        self.grad_checkpointing = False
        d = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, d, bias=True)
        self.t_embedder = TimestepEmbedder(d, freq_shift=cfg.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, null_class=cfg.class_dropout_prob > 0)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table, kept as a frozen parameter as in DiT (so it counts in DiT's parameter table).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(d, cfg.num_heads, build_feedforward(cfg, i), qk_norm=cfg.qk_norm, layer_index=i,
                     attn_connection=build_connection(cfg, d, 2 * i),
                     mlp_connection=build_connection(cfg, d, 2 * i + 1), memory=build_memory(cfg, i))
            for i in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(d, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every initialisation of the model, the adaLN-Zero zero-inits included, in one place."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).float().unsqueeze(0))
        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            if hasattr(block.mlp, "initialize_weights"):
                block.mlp.initialize_weights()
            if block.memory is not None:  # tables, keys, cores; then its gate to zero: memory starts off
                block.memory.initialize_weights()
                block.memory.zero_init_gate()
            # adaLN-Zero: zero modulation, so every gate is 0 and every block is the identity.
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def after_optimizer_step(self) -> None:
        """Upkeep outside autograd after each optimizer step (UltraMem's Tucker pre-filter refresh): visits the
        submodules that define `after_optimizer_step`. The training loop calls it on the model and its EMA."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C_out) -> (B, C_out, H, W)."""
        side = int(x.shape[1] ** 0.5)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=side, w=side, p=self.patch_size,
                         q=self.patch_size)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), the inverse of `unpatchify` (used for per-token targets)."""
        return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=self.patch_size, q=self.patch_size)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (B, L, D) and conditioning c (B, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, record: ForwardRecord | None = None) -> torch.Tensor:
        """y is used as given, in training mode too: unlike DiT, label dropout is the caller's (the training
        step's seeded `MicroBatchDraws.labels`), with the null class `num_classes`."""
        h, c = self.embed(x, t, y)
        h = expand_streams(h, self.config)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, record, use_reentrant=False)
            else:
                h = block(h, c, record)
        return self.unpatchify(self.final_layer(merge_streams(h, self.config), c))

    def macs(self) -> int:
        """Forward multiply-accumulates for one image (DiT's "Gflops" convention; MoE at mean k)."""
        d, t = self.config.hidden_size, self.x_embedder.num_patches
        p, c = self.patch_size, self.in_channels
        embed = t * p * p * c * d + self.t_embedder.frequency_embedding_size * d + d * d
        final = 2 * d * d + t * d * self.final_layer.linear.out_features
        return embed + sum(block.macs(t) for block in self.blocks) + final
