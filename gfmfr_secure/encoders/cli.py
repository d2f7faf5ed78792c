"""The ``encode`` subcommand: item text and images -> feature files.

The main command line (:mod:`gfmfr_secure.cli`) imports this module and calls
:func:`register`; ``python -m gfmfr_secure.encoders.cli encode ...`` runs it
on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gfmfr_secure.errors import ConfigError

__all__ = ["main", "register"]

_DESCRIPTION = """\
Encode every item of a dataset folder with the server's content encoders and
write, into the output folder:

  text_feat.npy   float32 [I, Dt]  one row per item, in the dataset's item order
  image_feat.npy  float32 [I, Dv]
  text_mask.npy   bool [I]         True where the item has text / an image;
  image_mask.npy  bool [I]         items without one get a zero row
  manifest.json   encoders and package versions, input recipe, dimensions,
                  sha256 of the inputs and outputs, counts of missing items

Default encoders (configs/encoders/default.yaml): all-MiniLM-L6-v2 for text,
input "<title>. Genres: <g1>, <g2>." + " <overview>" when present, L2-normalised;
EfficientNet-Lite0 (ImageNet) for images, 224x224 bicubic, (x-127)/128, global
average pool: 1280-d. A config can select hf-text / hf-image / hf-clip with a
local Hugging Face model folder instead (configs/encoders/clip-local.yaml).

Results are cached by content: the key hashes the encoder (name, package
versions, weights, recipe) and the inputs, so a second run on the same data
only copies from the cache. Cache folder precedence: --cache-dir >
$GFMFR_CACHE > $XDG_CACHE_HOME/gfmfr-secure/encoders > ~/.cache/gfmfr-secure/encoders.

The data folder is only read. Files appear in the output folder only once all
of them are complete."""

_EXAMPLE = (
    "gfmfr-secure encode --data ../shared/datasets/ml-100k-mm --out features/ml-100k-mm "
    "--config configs/encoders/default.yaml --threads 2"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", metavar="DIR", help="dataset folder to encode (read only; default: $GFMFR_DATA)"
    )
    p.add_argument(
        "--out", metavar="DIR", help="output folder (default: ./features/<dataset name>)"
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="encoder config YAML (default: built-in minilm + efficientnet-lite0, "
        "as configs/encoders/default.yaml)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache folder (default: $GFMFR_CACHE, else <$XDG_CACHE_HOME or ~/.cache>"
        "/gfmfr-secure/encoders)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads during encoding (default: torch's own setting)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    p.set_defaults(handler=run_encode)


def register(subparsers: Any) -> None:
    """Add the ``encode`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "encode",
        help="encode item text and images into feature files",
        description=_DESCRIPTION,
        epilog="example:\n  " + _EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)


def _data_folder(given: str | None) -> str:
    from gfmfr_secure.config import resolve_data_folder

    return resolve_data_folder(given)


def run_encode(args: argparse.Namespace) -> int:
    """Handler of ``encode``; returns the exit status."""
    from gfmfr_secure.encoders.pipeline import (
        EncodeConfig,
        FeatureCache,
        default_cache_dir,
        encode_dataset,
        load_encode_config,
    )

    if args.no_cache and args.cache_dir is not None:
        raise ConfigError("--no-cache and --cache-dir contradict each other; pass one of them")
    data_dir = _data_folder(args.data)
    config = load_encode_config(args.config) if args.config is not None else EncodeConfig()
    cache = (
        None
        if args.no_cache
        else FeatureCache(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    )
    out, manifest = encode_dataset(
        data_dir, args.out, config, cache=cache, progress=not args.quiet, num_threads=args.threads
    )
    if not args.quiet:
        for modality, section in manifest["modalities"].items():
            source = "cache" if section["cache"]["hit"] else "encoded"
            print(
                f"{modality:<5} {section['encoder']:<18} dim={section['dim']:<5} "
                f"missing={section['n_missing']}/{section['n_items']}  {source} in {section['seconds']:.1f} s"
            )
        print(f"wrote {out / 'manifest.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``encode ...`` through the main command line; returns the exit status."""
    from gfmfr_secure.cli import main as cli_main

    return cli_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
