"""Compare produced item features with a dataset's reference features.

For each modality (text, image) the script loads ``<modality>_feat.npy`` from
the features folder and from the data folder, computes the cosine similarity
of every row pair and prints the fraction of items with cosine >= THRESHOLD,
the minimum and the median, and the worst items. A row that is zero in both
matrices (an item without content) counts as matching; a row zero in only
one of them counts as cosine 0. When the features folder holds a
``manifest.json``, the sha256 checksums it lists are verified as well.

Exit status: 0 when every compared modality has at least MIN_FRACTION of its
items at or above THRESHOLD and every checksum matches, 1 otherwise, 2 on
unusable input (missing or mismatched files).

Usage::

    python -m evaluations.check_features --data ../shared/datasets/ml-100k-mm \\
        --features features/ml-100k-mm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["compare", "main", "row_cosines", "verify_manifest"]

MODALITIES = ("text", "image")


class CheckError(Exception):
    """Input files missing or inconsistent."""


def row_cosines(produced: np.ndarray, reference: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity of matching rows.

    Parameters
    ----------
    produced, reference : np.ndarray
        ``[N, D]`` feature matrices.
    eps : float
        Norm below which a row counts as zero.

    Returns
    -------
    np.ndarray
        ``float64 [N]``; 1.0 where both rows are zero, 0.0 where exactly one is.
    """
    a = produced.astype(np.float64)
    b = reference.astype(np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    zero_a, zero_b = na < eps, nb < eps
    cos = np.einsum("nd,nd->n", a, b) / np.maximum(na * nb, eps * eps)
    cos[zero_a != zero_b] = 0.0
    cos[zero_a & zero_b] = 1.0
    return cos


def compare(
    produced: np.ndarray, reference: np.ndarray, threshold: float
) -> dict[str, float | int]:
    """Summary of :func:`row_cosines`: fraction at or above ``threshold``, min, median, counts."""
    if produced.shape != reference.shape:
        raise CheckError(
            f"shape {produced.shape} of the produced features differs from the reference {reference.shape}"
        )
    cos = row_cosines(produced, reference)
    return {
        "items": int(cos.size),
        "fraction_ok": float((cos >= threshold).mean()) if cos.size else 0.0,
        "min": float(cos.min()) if cos.size else float("nan"),
        "median": float(np.median(cos)) if cos.size else float("nan"),
        "both_zero": int(((np.abs(produced).sum(1) == 0) & (np.abs(reference).sum(1) == 0)).sum()),
        "max_abs_diff": float(np.abs(produced.astype(np.float64) - reference).max())
        if cos.size
        else 0.0,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(folder: Path) -> list[str]:
    """Problems found checking the sha256 of every file listed in ``folder/manifest.json``.

    Returns an empty list when all match, or when there is no manifest.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return []
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    problems = []
    for modality, section in manifest.get("modalities", {}).items():
        for role, entry in section.get("files", {}).items():
            path = folder / entry["file"]
            if not path.is_file():
                problems.append(f"{modality} {role}: {path} listed in the manifest is missing")
            elif _sha256(path) != entry["sha256"]:
                problems.append(f"{modality} {role}: {path} does not match its manifest sha256")
    return problems


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CheckError(f"{path}: no such file")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2:
        raise CheckError(f"{path}: expected a 2-D matrix, got shape {array.shape}")
    return array


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluations.check_features",
        description="Compare produced text/image features with the reference .npy files of a data folder.",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="data folder holding the reference text_feat.npy / image_feat.npy",
    )
    parser.add_argument(
        "--features",
        metavar="DIR",
        help="folder written by 'gfmfr-secure encode' (default: ./features/<data folder name>)",
    )
    parser.add_argument(
        "--modalities",
        nargs="+",
        choices=MODALITIES,
        default=list(MODALITIES),
        help="modalities to compare (default: both)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.99,
        help="per-item cosine to reach (default: %(default)s)",
    )
    parser.add_argument(
        "--min-fraction",
        type=float,
        default=0.99,
        help="fraction of items that must reach it (default: %(default)s)",
    )
    parser.add_argument(
        "--worst", type=int, default=5, help="how many worst items to list (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    data = Path(args.data)
    features = Path(args.features) if args.features else Path("features") / data.resolve().name
    ok = True
    try:
        for modality in args.modalities:
            name = f"{modality}_feat.npy"
            produced, reference = _load(features / name), _load(data / name)
            stats = compare(produced, reference, args.threshold)
            passed = stats["fraction_ok"] >= args.min_fraction
            ok &= passed
            print(
                f"{modality:<5} items={stats['items']} cos>={args.threshold}: {stats['fraction_ok']:.4%} "
                f"min={stats['min']:.6f} median={stats['median']:.6f} both-zero={stats['both_zero']} "
                f"max|diff|={stats['max_abs_diff']:.3g}  {'PASS' if passed else 'FAIL'}"
            )
            cos = row_cosines(produced, reference)
            worst = np.argsort(cos, kind="stable")[: args.worst]
            print("      worst rows: " + ", ".join(f"{int(k)} ({cos[k]:.6f})" for k in worst))
        problems = verify_manifest(features)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"checksum: {problem}")
    if (features / "manifest.json").is_file():
        print("manifest checksums: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    ok &= not problems
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
