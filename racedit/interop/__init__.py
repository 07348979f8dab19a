"""Interoperability: official DiT checkpoints in, diffusers DiT models in and out, and upcycling a dense
checkpoint into a Race-DiT one. Every conversion is checked strictly (each key and shape that does not fit
is named) and writes an ordinary racedit checkpoint."""

from racedit.interop.common import DEFAULT_VAE, ConversionError, converted_config, save_converted
from racedit.interop.diffusers import (
    convert_diffusers_dir,
    export_diffusers,
    from_diffusers_state_dict,
    read_diffusers_transformer,
    to_diffusers,
    to_diffusers_state_dict,
)
from racedit.interop.dit_official import (
    convert_dit_file,
    from_dit_state_dict,
    infer_dit_config,
    load_dit_checkpoint,
)
from racedit.interop.upcycle import parse_model_overrides, upcycle_checkpoint
from racedit.models.upcycle import UpcycleError, init_moe_from_dense, moe_dense_gap, upcycle

__all__ = [
    "ConversionError", "UpcycleError", "DEFAULT_VAE", "load_dit_checkpoint", "infer_dit_config",
    "from_dit_state_dict", "read_diffusers_transformer", "from_diffusers_state_dict", "to_diffusers_state_dict",
    "to_diffusers", "converted_config", "save_converted", "convert_dit_file", "convert_diffusers_dir",
    "export_diffusers", "upcycle", "init_moe_from_dense", "moe_dense_gap", "upcycle_checkpoint",
    "parse_model_overrides",
]
