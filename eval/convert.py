#!/usr/bin/env python
"""Convert pretrained DiT weights to racedit checkpoints and back, and upcycle a dense DiT into a Race-DiT
(see docs/interop.md and racedit/interop/):

    python eval/convert.py from-dit DiT-XL-2-256x256.pt --out ckpt/dit-xl2-256 [--image-size 256]
    python eval/convert.py from-diffusers DiT-XL-2-256/ --out ckpt/dit-xl2-256-hf
    python eval/convert.py to-diffusers ckpt/dit-xl2-256-hf exported/ [--vae VAE_DIR]
    python eval/convert.py upcycle ckpt/dit-xl2-256 --to RaceDiT-XL/2-4in32 --out ckpt/race-xl2 [--noise-std 0.01]
        [--set model.gating=sigmoid ...]
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/convert.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("from-dit", help="official DiT checkpoint (.pt, facebookresearch/DiT layout) -> racedit")
    p.add_argument("path", help="e.g. DiT-XL-2-256x256.pt (read with torch.load(weights_only=True))")
    p.add_argument("--out", required=True, help="new checkpoint directory (sample.py --ckpt OUT)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=None,
                   help="check the weights are for this image size (default: read from pos_embed)")
    p.add_argument("--num-heads", type=int, default=None, help="only for sizes that are no DiT preset")
    p.add_argument("--vae", default=None, help="VAE for decoding: hub id or local dir (default stabilityai/sd-vae-ft-ema)")
    p = sub.add_parser("from-diffusers", help="diffusers DiTTransformer2DModel / DiTPipeline directory -> racedit")
    p.add_argument("path", help="transformer directory, or a pipeline directory with transformer/")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--vae", default=None, help="VAE for decoding (default: the pipeline's vae/, else sd-vae-ft-ema)")
    p = sub.add_parser("to-diffusers", help="dense racedit checkpoint -> diffusers DiTPipeline directory")
    p.add_argument("ckpt", help="racedit checkpoint (dir, run dir or .../checkpoints/last)")
    p.add_argument("dir", help="new output directory")
    p.add_argument("--vae", default=None, help="local VAE directory to include as vae/ (default: data.vae if local)")
    p.add_argument("--no-ema", action="store_true", help="export the live weights instead of the EMA")
    p = sub.add_parser("upcycle", help="dense racedit checkpoint -> Race-DiT checkpoint (MoE from the dense MLPs)")
    p.add_argument("ckpt", help="dense racedit checkpoint")
    p.add_argument("--to", required=True, help="RaceDiT preset of the same size, e.g. RaceDiT-XL/2-4in32")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--noise-std", type=float, default=0.01, help="expert noise, relative to the weights' std")
    p.add_argument("--seed", type=int, default=0, help="noise and router direction")
    p.add_argument("--no-ema", action="store_true", help="upcycle the live weights instead of the EMA")
    p.add_argument("--no-probe", action="store_true", help="skip measuring the gap on a random batch")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="model.KEY=VALUE",
                   help="model options of the MoE model, e.g. --set model.gating=sigmoid model.routing=token_choice")
    args = parser.parse_args(argv)

    from racedit import interop as convert
    from racedit.checkpoint import CheckpointError
    from racedit.config import ConfigError

    try:
        if args.command == "from-dit":
            out = convert.convert_dit_file(args.path, args.out, image_size=args.image_size,
                                           vae=args.vae or convert.DEFAULT_VAE, num_heads=args.num_heads)
        elif args.command == "from-diffusers":
            out = convert.convert_diffusers_dir(args.path, args.out, vae=args.vae)
        elif args.command == "to-diffusers":
            out = convert.export_diffusers(args.ckpt, args.dir, vae=args.vae, use_ema=not args.no_ema)
        else:
            out, gap = convert.upcycle_checkpoint(args.ckpt, args.to, args.out, noise_std=args.noise_std,
                                                  seed=args.seed, use_ema=not args.no_ema,
                                                  overrides=convert.parse_model_overrides(args.overrides),
                                                  probe=not args.no_probe)
            if gap is not None:
                print("gap to the dense model on a random batch (relative L2 of the outputs; worst MoE layer): "
                      f"eval routing {gap['eval_relative']:.2e}; {gap['eval_max_layer_relative']:.2e} | "
                      f"train routing {gap['train_relative']:.2e}; {gap['train_max_layer_relative']:.2e}")
    except (convert.ConversionError, convert.UpcycleError, ConfigError, CheckpointError, OSError) as e:  # OSError: a VAE dir that is none
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
