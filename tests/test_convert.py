"""racedit.interop: official DiT state dicts and diffusers DiT models in and out (CPU, no network).

The official layout's forward is written out below from its equations (facebookresearch/DiT models.py), on
the raw state dict only, so the racedit model is checked against an independent implementation.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from racedit import interop as convert
from racedit.checkpoint import load_config_of, load_weights, resolve_checkpoint
from racedit.cli import main
from racedit.interop import ConversionError
from racedit.models.dit import sincos_2d

# ------------------------------------------------------------------ the official layout, written independently


def official_state_dict(depth=2, hidden=32, patch=2, input_size=8, channels=4, classes=10, learn_sigma=True,
                        mlp_ratio=4, seed=0) -> dict[str, torch.Tensor]:
    """Random values under facebookresearch/DiT's key names and shapes (adaLN and final layer non-zero)."""
    g = torch.Generator().manual_seed(seed)
    d, h = hidden, int(hidden * mlp_ratio)
    out = channels * 2 if learn_sigma else channels
    tokens = (input_size // patch) ** 2

    def r(*shape, gain=1.0):
        """Random values; matrices scaled by 1 / sqrt(fan_in) so activations stay O(1) at any width."""
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 25
        return torch.randn(*shape, generator=g) * gain / math.sqrt(fan_in)

    sd = {
        "pos_embed": r(1, tokens, d, gain=0.5 * math.sqrt(tokens * d)),
        "x_embedder.proj.weight": r(d, channels, patch, patch), "x_embedder.proj.bias": r(d),
        "t_embedder.mlp.0.weight": r(d, 256, gain=4.0), "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(classes + 1, d, gain=math.sqrt(d)),
        "final_layer.linear.weight": r(patch * patch * out, d), "final_layer.linear.bias": r(patch * patch * out),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d, gain=0.5), "final_layer.adaLN_modulation.1.bias": r(2 * d),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
            b + "mlp.fc1.weight": r(h, d), b + "mlp.fc1.bias": r(h),
            b + "mlp.fc2.weight": r(d, h), b + "mlp.fc2.bias": r(d),
            b + "adaLN_modulation.1.weight": r(6 * d, d, gain=0.5), b + "adaLN_modulation.1.bias": r(6 * d),
        }
    return sd


def official_forward(sd: dict[str, torch.Tensor], x, t, y, num_heads: int) -> torch.Tensor:
    """DiT's forward from the state dict alone: patch embed + pos, [cos, sin] timestep frequencies
    exp(-ln(1e4) i / 128), adaLN-Zero blocks (LayerNorm eps 1e-6, no affine), final adaLN layer, unpatchify."""
    w = sd["x_embedder.proj.weight"]
    d, p = w.shape[0], w.shape[-1]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(w.dtype)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda v: F.layer_norm(v, (d,), eps=1e-6)
    mod = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    B, N = h.shape[:2]
    hd = d // num_heads
    for i in range(depth):
        b = f"blocks.{i}."
        m = F.linear(F.silu(c), sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = mod(ln(h), m[0], m[1])
        qkv = F.linear(a, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, num_heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, N, d), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = h + m[2][:, None] * att
        f = mod(ln(h), m[3], m[4])
        f = F.linear(F.gelu(F.linear(f, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        h = h + m[5][:, None] * f
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(mod(ln(h), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    side = int(N ** 0.5)
    c_out = out.shape[-1] // (p * p)
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, side, side, p, p, c_out))
    return out.reshape(B, c_out, side * p, side * p)


def inputs(channels=4, size=8, classes=10, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])[:batch]
    y = torch.tensor([0, 3, classes - 1, classes])[:batch]  # the last one is the null (CFG) class
    return x, t, y


def run_cli(argv: list[str]) -> int:
    """`racedit convert ARGV...`: its exit status."""
    return main(["convert", *argv])


# ------------------------------------------------------------------------------------ official DiT -> racedit


def test_small_preset_matches_the_official_equations():
    """DiT-S/8 (12 blocks, width 384, 6 heads) on 16 x 16 latents: shapes give the preset, output to 1e-5."""
    sd = official_state_dict(depth=12, hidden=384, patch=8, input_size=16, classes=1000)
    model = convert.from_dit_state_dict(sd, image_size=128)
    cfg = model.config
    assert (cfg.name, cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == ("DiT-S/8", 12, 384, 6, 8)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (16, 4, 1000, True)
    assert cfg.moe_experts == 0 and cfg.timestep_freq_shift == 0.0
    x, t, y = inputs(size=16, classes=1000)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), official_forward(sd, x, t, y, num_heads=6), atol=1e-5, rtol=1e-5)


def test_custom_size_and_no_learned_sigma():
    sd = official_state_dict(depth=2, hidden=32, learn_sigma=False, classes=7)
    with pytest.raises(ConversionError, match=r"no DiT preset.*num_heads"):
        convert.from_dit_state_dict(sd)
    model = convert.from_dit_state_dict(sd, num_heads=2)
    assert not model.config.learn_sigma and model.config.num_classes == 7 and model.out_channels == 4
    x, t, y = inputs(classes=7)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), official_forward(sd, x, t, y, num_heads=2), atol=1e-5, rtol=1e-5)


def test_wrong_keys_and_shapes_are_named():
    good = official_state_dict()
    renamed = dict(good)
    renamed["blocks.1.attn.projection.weight"] = renamed.pop("blocks.1.attn.proj.weight")
    with pytest.raises(ConversionError) as info:
        convert.from_dit_state_dict(renamed, num_heads=2)
    msg = str(info.value)
    assert "missing keys (1): ['blocks.1.attn.proj.weight']" in msg
    assert "unexpected keys (1): ['blocks.1.attn.projection.weight']" in msg

    wrong = dict(good)
    wrong["blocks.0.mlp.fc2.weight"] = torch.zeros(32, 100)
    with pytest.raises(ConversionError, match=r"blocks\.0\.mlp\.fc2\.weight: file \(32, 100\) vs expected \(32, 128\)"):
        convert.from_dit_state_dict(wrong, num_heads=2)

    no_patch = {k: v for k, v in good.items() if k != "x_embedder.proj.weight"}
    with pytest.raises(ConversionError, match="'x_embedder.proj.weight' is missing"):
        convert.from_dit_state_dict(no_patch, num_heads=2)
    bad_pos = dict(good, pos_embed=torch.zeros(1, 15, 32))
    with pytest.raises(ConversionError, match=r"pos_embed \(1, 15, 32\)"):
        convert.from_dit_state_dict(bad_pos, num_heads=2)
    with pytest.raises(ConversionError, match=r"image_size 512 does not match.*8 x 8 latents"):
        convert.from_dit_state_dict(good, image_size=512, num_heads=2)
    with pytest.raises(ConversionError, match="not tensors"):
        convert.from_dit_state_dict({**good, "args": "lr=1e-4"}, num_heads=2)


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_pickle_carrying_code_is_refused_and_runs_nothing(tmp_path):
    live = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(_Payload(live)))  # an unrestricted unpickler does run the payload
    assert live.exists()

    marker = tmp_path / "pwned.txt"
    zipped = tmp_path / "evil.pt"
    torch.save({"x_embedder.proj.weight": torch.zeros(1), "evil": _Payload(marker)}, zipped)
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps({"evil": _Payload(marker)}, protocol=2))
    for f in (zipped, legacy):
        with pytest.raises(ConversionError, match=r"refused by torch\.load\(weights_only=True\).*never runs code"):
            convert.load_dit_checkpoint(f)
        assert not marker.exists()
    out = tmp_path / "ckpt"
    assert run_cli(["from-dit", str(zipped), "--out", str(out)]) == 2
    assert not marker.exists() and not out.exists()


def test_dit_training_checkpoint_gives_its_ema(tmp_path):
    sd = official_state_dict()
    f = tmp_path / "0400000.pt"
    torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {"state": {}},
                "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, f)
    loaded = convert.load_dit_checkpoint(f)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    with pytest.raises(ConversionError, match="checkpoint file not found"):
        convert.load_dit_checkpoint(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def standin_vae(tmp_path_factory) -> Path:
    from racedit.testing import save_standin_vae

    return save_standin_vae(tmp_path_factory.mktemp("vae") / "vae")


def test_from_dit_cli_then_sample(tmp_path, standin_vae):
    """`racedit convert from-dit` a .pt file, then `racedit sample` a grid from it (3-channel guidance)."""
    sd = official_state_dict(depth=2, hidden=32)
    f = tmp_path / "DiT-tiny.pt"
    torch.save(sd, f)
    out = tmp_path / "converted"
    assert run_cli(["from-dit", str(f), "--out", str(out), "--num-heads", "2", "--vae", str(standin_vae)]) == 0
    ckpt = resolve_checkpoint(out)
    cfg = load_config_of(ckpt)
    assert cfg.data.kind == "latents" and cfg.data.latents == "" and cfg.data.vae == str(standin_vae)
    assert (cfg.diffusion.objective, cfg.sample.sampler, cfg.sample.steps, cfg.sample.cfg_scale) == ("ddpm", "ddpm", 250, 4.0)
    for which in ("ema", "model"):
        weights = load_weights(ckpt, which)
        assert all(torch.equal(weights[k], v) for k, v in sd.items())
    assert run_cli(["from-dit", str(f), "--out", str(out), "--num-heads", "2"]) == 2  # never overwrites


    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(out), "--classes", "1", "7", "--per-class", "2", "--steps", "2",
                        "--sampler", "ddpm", "--guidance-channels", "3", "--out", str(grid), "--device", "cpu",
                        "--quiet"]) == 0
    with Image.open(grid) as img:
        assert img.size == (2 * 65 + 1, 2 * 65 + 1)  # 2 x 2 cells of 64 x 64 (8 x 8 latents, VAE downsample 8)


# ----------------------------------------------------------------------------------------------- diffusers


def tiny_diffusers(norm_eps=1e-6, seed=0, tie_embedders=True, learn_sigma=True):
    """A random DiTTransformer2DModel; like diffusers' port of DiT, every block holds the same embedders."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=8, patch_size=2,
                              num_embeds_ada_norm=10, norm_eps=norm_eps)
    if tie_embedders:
        first = m.transformer_blocks[0].norm1.emb.state_dict()
        for block in m.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return m.eval()


def diffusers_out(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def test_diffusers_round_trip_is_exact(tmp_path):
    theirs = tiny_diffusers()
    theirs.save_pretrained(tmp_path / "transformer")
    state, config, root = convert.read_diffusers_transformer(tmp_path / "transformer")
    assert root is None
    ours = convert.from_diffusers_state_dict(state, config)
    assert ours.config.timestep_freq_shift == 1.0 and ours.config.num_heads == 2 and ours.config.hidden_size == 32
    x, t, y = inputs()
    ref = diffusers_out(theirs, x, t, y)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref, atol=1e-5, rtol=1e-5)
    back = convert.to_diffusers(ours)
    assert back.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in theirs.state_dict().items())
    torch.testing.assert_close(diffusers_out(back, x, t, y), ref, atol=1e-5, rtol=1e-5)
    # the hub's port is saved as a Transformer2DModel; diffusers' defaults fill the keys it leaves out
    cfg_file = tmp_path / "transformer" / "config.json"
    hub_like = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in ("activation_fn", "attention_bias")}
    cfg_file.write_text(json.dumps({**hub_like, "_class_name": "Transformer2DModel"}))
    state, config, _ = convert.read_diffusers_transformer(tmp_path / "transformer")
    assert convert.from_diffusers_state_dict(state, config).config == ours.config


def test_diffusers_conventions_are_measured():
    """diffusers' default norm_eps (1e-5) warns, and stays within 1e-3; a DiT-convention model (timestep
    shift 0) exports with a warning, and its gap is the timestep-frequency difference."""
    theirs = tiny_diffusers(norm_eps=1e-5, learn_sigma=False)
    with pytest.warns(UserWarning, match="norm_eps=1e-05"):
        ours = convert.from_diffusers_state_dict(theirs.state_dict(), dict(theirs.config))
    x, t, y = inputs()
    ref = diffusers_out(theirs, x, t, y)
    with torch.no_grad():
        eps_gap = float((ours(x, t, y) - ref).norm() / ref.norm())
    assert eps_gap < 1e-3

    sd = official_state_dict()
    with pytest.raises(ConversionError, match="pos_embed is not the fixed sin-cos table"):
        convert.to_diffusers(convert.from_dit_state_dict(sd, num_heads=2))
    sd["pos_embed"] = sincos_2d(32, 4).float().unsqueeze(0)  # what the official checkpoints hold
    dit = convert.from_dit_state_dict(sd, num_heads=2)
    with pytest.warns(UserWarning, match="timestep frequencies"):
        exported = convert.to_diffusers(dit)
    with torch.no_grad():
        a, b = dit(x, t, y), diffusers_out(exported, x, t, y)
    torch.testing.assert_close(a[:1], b[:1], atol=1e-5, rtol=1e-5)  # t = 0: the frequencies do not matter
    assert float((a - b).norm() / a.norm()) > 1e-4  # they do at t > 0


def test_diffusers_bad_inputs(tmp_path):
    theirs = tiny_diffusers(tie_embedders=False)
    with pytest.raises(ConversionError, match=r"transformer_blocks\.1\.norm1\.emb\..* differs from block 0"):
        convert.from_diffusers_state_dict(theirs.state_dict(), dict(theirs.config))
    good = tiny_diffusers()
    sd = dict(good.state_dict())
    sd.pop("proj_out_2.bias")
    sd["transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(32, 31)
    with pytest.raises(ConversionError) as info:
        convert.from_diffusers_state_dict(sd, dict(good.config))
    assert "missing keys (1): ['proj_out_2.bias']" in str(info.value)
    assert "transformer_blocks.0.attn1.to_q.weight: file (32, 31) vs expected (32, 32)" in str(info.value)
    with pytest.raises(ConversionError, match="activation_fn='geglu'"):
        convert.from_diffusers_state_dict(good.state_dict(), {**good.config, "activation_fn": "geglu"})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConversionError, match="_class_name 'UNet2DModel'"):
        convert.read_diffusers_transformer(tmp_path)
    moe = convert.upcycle(convert.from_dit_state_dict(official_state_dict(), num_heads=2), "RaceDiT-S/2-2in4")
    with pytest.raises(ConversionError, match="Mixture of Experts"):
        convert.to_diffusers_state_dict(moe)


def test_diffusers_pipeline_in_and_out(tmp_path, standin_vae):
    """from-diffusers on a DiTPipeline directory, then to-diffusers: DiTPipeline loads and runs the export."""
    from diffusers import DDIMScheduler, DiTPipeline

    from racedit.data.codec import load_autoencoder_kl

    theirs = tiny_diffusers()
    vae = load_autoencoder_kl(standin_vae)
    DiTPipeline(transformer=theirs, vae=vae, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "pipe")
    assert run_cli(["from-diffusers", str(tmp_path / "pipe"), "--out", str(tmp_path / "ckpt")]) == 0
    cfg = load_config_of(resolve_checkpoint(tmp_path / "ckpt"))
    assert cfg.data.vae == str((tmp_path / "pipe" / "vae").resolve()) and cfg.model.timestep_freq_shift == 1.0

    with pytest.warns(UserWarning, match="guidance_scale=1"):  # 10 classes, not ImageNet's 1000
        assert run_cli(["to-diffusers", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "export")]) == 0
    assert {p.name for p in (tmp_path / "export").iterdir()} >= {"model_index.json", "transformer", "scheduler", "vae"}
    pipe = DiTPipeline.from_pretrained(tmp_path / "export")
    x, t, y = inputs()
    torch.testing.assert_close(diffusers_out(pipe.transformer, x, t, y), diffusers_out(theirs, x, t, y),
                               atol=1e-5, rtol=1e-5)
    # guidance_scale 1: DiTPipeline hard-codes the null class 1000 (ImageNet), this model has 10 classes
    images = pipe(class_labels=[1, 4], num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 64, 64, 3)

    # no local VAE: the directory still loads when the VAE is passed in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert.export_diffusers(resolve_checkpoint(tmp_path / "ckpt"), tmp_path / "bare", vae="owner/hub-vae")
    assert not (tmp_path / "bare" / "vae").exists()
    pipe = DiTPipeline.from_pretrained(tmp_path / "bare", vae=vae)
    assert pipe(class_labels=[2], num_inference_steps=1, guidance_scale=1.0, output_type="np").images.shape == (1, 64, 64, 3)


def test_sample_with_vae_flag_overrides_the_configured_vae(tmp_path, standin_vae):
    """A converted checkpoint names the hub VAE (unreachable offline); `racedit sample --vae DIR` decodes with a
    local one instead."""
    f = tmp_path / "DiT-tiny.pt"
    torch.save(official_state_dict(depth=2, hidden=32), f)
    out = tmp_path / "converted"
    assert run_cli(["from-dit", str(f), "--out", str(out), "--num-heads", "2"]) == 0
    assert load_config_of(resolve_checkpoint(out)).data.vae == "stabilityai/sd-vae-ft-ema"

    grid = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(out), "--classes", "3", "--per-class", "1", "--steps", "2", "--sampler",
                        "ddim", "--vae", str(standin_vae), "--out", str(grid), "--device", "cpu", "--quiet"]) == 0
    with Image.open(grid) as img:
        assert img.size == (64, 64)  # one 8 x 8 latent decoded by the local VAE (downsample 8); no padding
