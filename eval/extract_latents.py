#!/usr/bin/env python
"""Encode an ImageFolder (e.g. ImageNet train) into sharded VAE latents for `data.kind=latents`.

    python eval/extract_latents.py --data /imagenet/train --vae stabilityai/sd-vae-ft-ema --out latents/in256
    accelerate launch eval/extract_latents.py --data ... --vae ... --out ...     # split over GPUs

Re-running the same command resumes: complete shards are verified and kept. See racedit/data/latent_extract.py.
"""
import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="extract_latents.py", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="image root with one subfolder per class")
    p.add_argument("--vae", required=True, help="AutoencoderKL hub id (stabilityai/sd-vae-ft-ema) or local directory")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--image-size", type=int, default=256, help="side of the ADM center crop")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (each also encoded mirrored)")
    p.add_argument("--shard-size", type=int, default=20_000, help="image files per shard")
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers per process")
    p.add_argument("--store-dtype", choices=["float16", "float32"], default="float16", help="dtype of the shards")
    p.add_argument("--vae-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype the encoder runs in")
    p.add_argument("--verify-checksums", action="store_true", help="re-hash existing shards before reusing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from racedit.data.images import ImageFolderError
    from racedit.data.latent_extract import extract_latents
    from racedit.data.latent_store import LatentStoreError

    try:
        extract_latents(args.data, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                        shard_size=args.shard_size, num_workers=args.num_workers, store_dtype=args.store_dtype,
                        vae_dtype=args.vae_dtype, verify_checksums=args.verify_checksums,
                        progress=not args.no_progress)
    except (ImageFolderError, LatentStoreError, FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
