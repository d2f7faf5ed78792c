"""Write our ML-100K split in the input format of the published GFMFR code.

A measurement helper, not part of the library: it lets the authors' own code
(GitHub ``Zhangwp2420/GFMFR``) run on exactly the split this project evaluates
on, so that its figure and ours are comparable. It writes, under ``--out``:

- ``inter.csv`` with columns ``userId,itemId,rating,timestamp``: one row per
  interaction, sorted by user (their evaluation pairs scores with users by row
  order, so users must appear as ``0..U-1``), rating 1, and per-user synthetic
  timestamps that make their split (latest -> test, second latest ->
  validation) equal ours: the training items get ``0..n-1``, the validation
  item ``n`` and the test item ``n+1``;
- ``text_features.npy`` and ``image_features.npy``, ``float32 [I, dim]``: their
  fusion layer projects both modalities from ``dim`` (their ``embedding_size``,
  512) inputs, so each feature matrix is zero-padded to ``dim`` columns if it
  is narrower and reduced to ``dim`` by PCA if it is wider (the script prints
  the variance kept).

Item and user ids are this project's indices. Every user needs a validation and
a test item (true on ML-100K, where every user has at least 20 ratings).

    python evaluations/export_authors_format.py --data ../shared/datasets/ml-100k-mm --out /tmp/GFMFR/dataset/ml100k
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA

from gfmfr_secure.data.load import load_dataset
from gfmfr_secure.data.split import Split, leave_one_out
from gfmfr_secure.errors import DataError


def interactions_table(split: Split) -> np.ndarray:
    """``int64 [N, 4]`` rows ``(user, item, 1, timestamp)`` sorted by user, reproducing ``split``.

    Raises
    ------
    DataError
        A user without a validation or a test item.
    """
    missing = np.flatnonzero((split.val_items < 0) | (split.test_items < 0))
    if missing.size:
        raise DataError(
            f"{missing.size} users have no validation or test item (first: {missing[:5].tolist()}); "
            "the authors' split needs both for every user"
        )
    counts = np.diff(split.train_indptr)
    users = np.repeat(np.arange(split.n_users), counts + 2)
    starts = np.concatenate([[0], np.cumsum(counts + 2)[:-1]])
    stamps = np.arange(users.size) - np.repeat(starts, counts + 2)  # 0..n+1 within each user
    items = np.empty(users.size, np.int64)
    is_train = stamps < np.repeat(counts, counts + 2)
    items[is_train] = split.train_items
    items[stamps == np.repeat(counts, counts + 2)] = split.val_items
    items[stamps == np.repeat(counts + 1, counts + 2)] = split.test_items
    return np.stack([users, items, np.ones_like(users), stamps], axis=1)


def to_width(features: np.ndarray, dim: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """``float32 [I, dim]``: zero-padded if narrower, PCA-reduced if wider; with the variance kept."""
    x = np.asarray(features, dtype=np.float32)
    if x.shape[1] <= dim:
        return np.pad(x, ((0, 0), (0, dim - x.shape[1]))), 1.0
    pca = PCA(n_components=dim, random_state=seed)
    return pca.fit_transform(x).astype(np.float32), float(pca.explained_variance_ratio_.sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/ml-100k-mm")
    ap.add_argument("--out", required=True, help="folder to create (their dataset/<name>/)")
    ap.add_argument("--dim", type=int, default=512, help="feature width their fusion layer expects")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    data = load_dataset(args.data)
    if data.text_features is None or data.image_features is None:
        raise DataError(f"{args.data} lacks text or image features")
    table = interactions_table(leave_one_out(data))
    text, kept_text = to_width(data.text_features, args.dim)
    image, kept_image = to_width(data.image_features, args.dim)
    tmp = out.with_name(out.name + ".partial")  # renamed into place once complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savetxt(tmp / "inter.csv", table, fmt="%d", delimiter=",", header="userId,itemId,rating,timestamp", comments="")
    np.save(tmp / "text_features.npy", text)
    np.save(tmp / "image_features.npy", image)
    tmp.rename(out)
    print(
        f"wrote {out}: {table.shape[0]} interactions of {data.n_users} users on {data.n_items} items; "
        f"text {data.text_features.shape[1]} -> {args.dim} (variance kept {kept_text:.4f}), "
        f"image {data.image_features.shape[1]} -> {args.dim} (variance kept {kept_image:.4f})"
    )


if __name__ == "__main__":
    main()
