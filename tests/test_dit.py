"""The DiT backbone against DiT's published table, its formulas, and its adaLN-Zero initialisation.

References used (none produced by running this code):
- the DiT paper's table of its 12 models (arXiv 2212.09748: parameters and "Gflops", which are forward MACs);
- the exact parameter counts of DiT's reference implementation (facebookresearch/DiT, all `.parameters()`)
  for S/2, B/2, L/2, XL/2;
- a parameter count written out from DiT's architecture (below, `dit_param_formula`);
- torch's own FlopCounterMode on a forward pass (MACs = flops / 2);
- the 2-D sin-cos formula written as a float64 numpy loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from racedit.config import ConfigError
from racedit.diffusion.draws import MicroBatchDraws
from racedit.models import count_macs, count_params, create_model
from racedit.models.dit import DiTBlock, LabelEmbedder, TimestepEmbedder
from racedit.models.records import ForwardRecord

# DiT paper's model table (arXiv 2212.09748): name -> (depth, width, heads, params in M, forward GMACs at 256px).
DIT_TABLE = {
    "DiT-S/8": (12, 384, 6, 33.2, 0.36),
    "DiT-S/4": (12, 384, 6, 33.0, 1.41),
    "DiT-S/2": (12, 384, 6, 33.0, 6.06),
    "DiT-B/8": (12, 768, 12, 130.9, 1.42),
    "DiT-B/4": (12, 768, 12, 130.5, 5.56),
    "DiT-B/2": (12, 768, 12, 130.5, 23.01),
    "DiT-L/8": (24, 1024, 16, 458.6, 5.01),
    "DiT-L/4": (24, 1024, 16, 458.1, 19.70),
    "DiT-L/2": (24, 1024, 16, 458.1, 80.71),
    "DiT-XL/8": (28, 1152, 16, 675.7, 7.39),
    "DiT-XL/4": (28, 1152, 16, 675.1, 29.05),
    "DiT-XL/2": (28, 1152, 16, 675.1, 118.64),
}
EXACT_PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


def meta_model(name: str, **overrides):
    """Build on the meta device: shapes and counts without allocating (XL for real takes ~15 s)."""
    with torch.device("meta"):
        return create_model(name, **overrides)


def dit_param_formula(depth: int, d: int, patch: int, channels: int = 4, latent: int = 32, classes: int = 1000,
                      learn_sigma: bool = True, freq: int = 256, mlp_ratio: int = 4) -> int:
    """All parameters of DiT (facebookresearch/DiT models.py), counted by hand from its layers."""
    tokens = (latent // patch) ** 2
    out_ch = 2 * channels if learn_sigma else channels
    hidden = mlp_ratio * d
    x_embed = patch * patch * channels * d + d  # Conv2d(C, D, p, stride p)
    pos = tokens * d  # frozen sin-cos table, a Parameter in DiT
    t_embed = (freq * d + d) + (d * d + d)  # Linear(256, D), Linear(D, D)
    y_embed = (classes + 1) * d  # + the null class row
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + (d * patch * patch * out_ch + patch * patch * out_ch)
    return x_embed + pos + t_embed + y_embed + depth * block + final


# --- sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DIT_TABLE))
def test_preset_shape_params_and_macs_match_dit_table(name):
    depth, width, heads, params_m, gmacs = DIT_TABLE[name]
    model = meta_model(name)
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, width, heads)
    total = count_params(model)["total"]
    patch = int(name.rsplit("/", 1)[1])
    assert total == dit_param_formula(depth, width, patch)
    if name in EXACT_PARAMS:
        assert total == EXACT_PARAMS[name]
    # The table's S/4 (33.0) and S/8 (33.2) read as 32.945M and 33.148M rounded twice (hundredths, then
    # tenths); the formula above pins the exact count, so allow that double rounding here.
    assert abs(total / 1e6 - params_m) <= 0.06, (total, params_m)
    macs = count_macs(model)
    assert abs(macs / 1e9 - gmacs) <= 0.01 * gmacs, (macs / 1e9, gmacs)


def test_m_preset_is_race_dits_medium_size():
    model = meta_model("DiT-M/2")
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (16, 960, 16)
    assert count_params(model)["total"] == dit_param_formula(16, 960, 2)
    assert abs(count_macs(model) / 1e9 - 47.4) <= 0.01 * 47.4  # M/2: ~47.4 GMACs by DiT's MAC convention (computed, not a published figure)


def meta_flops(model) -> int:
    """Total flops torch's FlopCounterMode sees in a meta-device forward of a batch of 2 latents 32x32x4."""
    model.eval()
    with torch.device("meta"):
        x, t, y = torch.randn(2, 4, 32, 32), torch.ones(2), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", [*DIT_TABLE, "DiT-M/2", "DiT-M/4", "DiT-M/8"])
def test_count_macs_equals_torch_flop_counter(name):
    """Every width and patch size; two blocks suffice (blocks are identical and a meta forward is slow)."""
    model = meta_model(name, depth=2)
    assert meta_flops(model) == 2 * 2 * count_macs(model)  # flops = 2 x MACs, batch of 2


def test_count_macs_equals_torch_flop_counter_full_xl2():
    model = meta_model("DiT-XL/2")
    assert meta_flops(model) == 2 * 2 * count_macs(model)


def test_count_macs_equals_torch_flop_counter_on_real_forward():
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=8, in_channels=3, num_classes=7, depth=2, hidden_size=48,
                         num_heads=3, patch_size=2, mlp_ratio=2.0).eval()
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3) * 999, torch.tensor([0, 6, 3])
    # The math attention backend runs QK^T and AV as bmm, which the counter sees; the fused CPU kernel
    # has no flop formula registered and would be silently left out.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = model(x, t, y)
    assert out.shape == (3, 6, 8, 8)
    assert counter.get_total_flops() == 2 * 3 * count_macs(model)


def test_count_params_counts_every_parameter_and_paper_convention_only_block_matrices():
    model = create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                         num_heads=2, patch_size=2)
    assert count_params(model)["total"] == sum(p.numel() for p in model.parameters())
    assert count_params(model)["total"] == dit_param_formula(2, 32, 2, channels=1, latent=8, classes=10)
    d = 32
    per_block_matrices = 3 * d * d + d * d + 2 * 4 * d * d + 6 * d * d
    assert count_params(model, convention="paper") == {"total": 2 * per_block_matrices,
                                                       "activated": 2 * per_block_matrices}


# --- adaLN-Zero ----------------------------------------------------------------------------------------------


def small_dit(**overrides):
    torch.manual_seed(0)
    kw = dict(input_size=8, in_channels=4, num_classes=10, depth=3, hidden_size=64, num_heads=4, patch_size=2)
    kw.update(overrides)
    return create_model("DiT-S/2", **kw)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_fresh_dit_outputs_exact_zeros(learn_sigma):
    model = small_dit(learn_sigma=learn_sigma)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 3, 9, 10])
    for mode in (model.train, model.eval):
        mode()
        out = model(x, t, y)
        assert out.shape == (4, 8 if learn_sigma else 4, 8, 8)
        assert torch.equal(out, torch.zeros_like(out))


def test_every_block_is_the_identity_at_init():
    model = small_dit()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 16, 64, generator=g) * 3
    c = torch.randn(3, 64, generator=g)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


def test_block_with_nonzero_modulation_is_not_the_identity():
    """The identity test above can fail: the same block with random adaLN weights changes its input."""
    model = small_dit()
    block = model.blocks[0]
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.1)
    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(3, 16, 64, generator=g), torch.randn(3, 64, generator=g)
    out = block(h, c)
    assert (out - h).abs().max() > 1e-2
    # ...and the whole model then no longer outputs zeros once the final layer is non-zero too
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.1)
    assert model(torch.randn(2, 4, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long)).abs().max() > 1e-3


def test_block_feedforward_slot_output_enters_the_residual_through_the_mlp_gate():
    """A custom module in the feed-forward slot is called once, on u = LN(h1) * (1 + scale_mlp) + shift_mlp,
    with the block's record, and the block returns h1 + gate_mlp * mlp(u), where h1 = h + gate_msa *
    attn(LN(h) * (1 + scale_msa) + shift_msa) and the six modulation vectors come from adaLN(c) in DiT's
    order. Compared with the block written out by hand in float64 (LayerNorm, softmax attention)."""
    D, heads, B, L = 16, 2, 2, 5
    g = torch.Generator().manual_seed(0)

    class Probe(torch.nn.Module):
        """mlp(u) = tanh(u W) + 0.5: not the identity, not zero, and nothing the block could produce itself."""

        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(D, D, generator=g, dtype=torch.float64))
            self.calls = []

        def forward(self, u, record=None):
            self.calls.append((u.detach().clone(), record))
            return torch.tanh(u @ self.w) + 0.5

        def macs(self, num_tokens):
            return num_tokens * D * D

    probe = Probe()
    block = DiTBlock(D, heads, probe).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    h = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    c = torch.randn(B, D, generator=g, dtype=torch.float64)
    record = ForwardRecord()
    out = block(h, c, record)

    def layer_norm(x):  # no affine, eps 1e-6
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    lin = block.adaLN_modulation[-1]
    mod = torch.nn.functional.silu(c) @ lin.weight.T + lin.bias
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i * D:(i + 1) * D, None].transpose(1, 2)
                                                                      for i in range(6))
    a = layer_norm(h) * (1 + scale_msa) + shift_msa
    qkv = a @ block.attn.qkv.weight.T + block.attn.qkv.bias
    hd = D // heads
    attn = torch.zeros_like(h)
    for b in range(B):
        for i in range(heads):
            q, k, v = (qkv[b, :, j * D + i * hd: j * D + (i + 1) * hd] for j in range(3))
            attn[b, :, i * hd:(i + 1) * hd] = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1) @ v
    h1 = h + gate_msa * (attn @ block.attn.proj.weight.T + block.attn.proj.bias)
    u = layer_norm(h1) * (1 + scale_mlp) + shift_mlp
    expected = h1 + gate_mlp * (torch.tanh(u @ probe.w) + 0.5)

    assert len(probe.calls) == 1 and probe.calls[0][1] is record
    torch.testing.assert_close(probe.calls[0][0], u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# --- position embedding, patches, labels -------------------------------------------------------------------


def sincos_2d_reference(dim: int, grid: int) -> np.ndarray:
    """DiT's 2-D sin-cos table, written out per entry in float64.

    Token k = r * grid + c (row-major). Channels [0, dim/2) encode the column c, [dim/2, dim) the row r; within
    each half, the first quarter is sin(pos * w_j) and the second cos(pos * w_j), w_j = 10000^(-j / (dim/4)).
    """
    quarter = dim // 4
    out = np.zeros((grid * grid, dim), dtype=np.float64)
    for r in range(grid):
        for c in range(grid):
            k = r * grid + c
            for j in range(quarter):
                w = 10000.0 ** (-j / quarter)
                out[k, j] = np.sin(c * w)
                out[k, quarter + j] = np.cos(c * w)
                out[k, 2 * quarter + j] = np.sin(r * w)
                out[k, 3 * quarter + j] = np.cos(r * w)
    return out


@pytest.mark.parametrize("grid,dim,patch", [(4, 64, 2), (8, 32, 1), (2, 16, 4)])
def test_pos_embed_matches_the_sincos_formula(grid, dim, patch):
    model = create_model("DiT-S/2", input_size=grid * patch, in_channels=1, num_classes=2, depth=1,
                         hidden_size=dim, num_heads=2, patch_size=patch)
    ref = sincos_2d_reference(dim, grid)
    got = model.pos_embed.detach().double().squeeze(0).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    assert not model.pos_embed.requires_grad


def test_unpatchify_layout_and_patchify_round_trip():
    model = create_model("DiT-S/2", input_size=8, in_channels=3, num_classes=2, depth=1, hidden_size=32,
                         num_heads=2, patch_size=2, learn_sigma=False)
    p, side, ch = 2, 4, 3
    tokens = torch.randn(2, side * side, p * p * ch)
    img = model.unpatchify(tokens)
    assert img.shape == (2, ch, 8, 8)
    # DiT's layout: token (h, w) holds its patch as (p, q, c) with c fastest.
    for n in range(2):
        for h in range(side):
            for w in range(side):
                for i in range(p):
                    for j in range(p):
                        for c in range(ch):
                            assert img[n, c, h * p + i, w * p + j] == tokens[n, h * side + w, (i * p + j) * ch + c]
    assert torch.equal(model.patchify(img), tokens)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_dropped_labels_embed_as_the_null_class_row():
    emb = LabelEmbedder(num_classes=10, hidden_size=8, null_class=True)
    table = emb.embedding_table.weight
    assert table.shape[0] == 11 and LabelEmbedder(10, 8, null_class=False).embedding_table.weight.shape[0] == 10
    labels = torch.arange(10).repeat(4)
    drop = torch.arange(40) % 3 == 0  # the caller's dropout mask (the training step's seeded draws)
    draws = MicroBatchDraws(t=torch.zeros(40), noise=torch.zeros(40, 1), drop_labels=drop, null_class=10)
    out = emb.train()(draws.labels(labels))
    assert torch.equal(out[drop], table[10].expand(int(drop.sum()), -1))  # the extra row is the null class 10
    assert torch.equal(out[~drop], table[labels[~drop]])
    assert torch.equal(emb(labels), table[labels])  # nothing dropped inside, training mode or not


def test_training_mode_forward_uses_the_labels_as_given(tiny_config):
    model = create_model(tiny_config().model).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(32, 1, 8, 8), torch.arange(32) * 30, torch.arange(32) % 10
    # DiT's in-model dropout (10% here) would change some of 32 rows with probability 1 - 0.9^32 = 97%
    assert torch.equal(model(x, t, y), model.eval()(x, t, y))


def test_create_model_unknown_override_names_it():
    with pytest.raises(ConfigError, match="hiden_size"):
        create_model("DiT-S/2", hiden_size=64)
    with pytest.raises(ConfigError, match="DiT-Q/2"):
        create_model("DiT-Q/2")


@pytest.mark.parametrize("freq_shift", [0.0, 1.0])
def test_timestep_sinusoid_is_cos_then_sin_of_the_frequency_ladder(freq_shift):
    """DiT's (freq_shift 0) and diffusers' (1) sinusoid, written out in float64: cos(t w_j) then sin(t w_j),
    w_j = exp(-ln(10^4) j / (128 - freq_shift)), j < 128."""
    t = torch.tensor([0.0, 1.0, 17.0, 250.5, 999.0])
    w = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / (128 - freq_shift))
    args = t.double()[:, None] * w[None]
    reference = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    got = TimestepEmbedder(32, frequency_embedding_size=256, freq_shift=freq_shift).sinusoid(t)
    assert got.dtype == torch.float32 and got.shape == (5, 256)
    torch.testing.assert_close(got.double(), reference, atol=1e-4, rtol=0)  # float32 arguments up to ~1e3
    other = TimestepEmbedder(32, frequency_embedding_size=256, freq_shift=1.0 - freq_shift).sinusoid(t)
    assert (other.double() - reference).abs().max() > 0.1  # the two ladders are told apart
