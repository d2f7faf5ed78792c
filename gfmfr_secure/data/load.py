"""Format detection and the single entry point :func:`load_dataset`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gfmfr_secure.data.csv_loader import find_interactions_csv, load_interactions_csv
from gfmfr_secure.data.dataset import InteractionData
from gfmfr_secure.data.movielens import load_ml100k_mm
from gfmfr_secure.errors import ConfigError, DataError

__all__ = ["LOADERS", "detect_format", "load_dataset"]

LOADERS: dict[str, Callable[..., InteractionData]] = {
    "ml100k-mm": load_ml100k_mm,
    "csv": load_interactions_csv,
}


def detect_format(path: Path) -> str:
    """``"ml100k-mm"`` for a folder with ``u.data``; ``"csv"`` for a ``.csv`` file or a
    folder holding ``interactions.csv`` or exactly one other interactions ``.csv``.

    Raises
    ------
    DataError
        The path does not exist, is a file other than ``.csv``, or is a folder
        with neither layout, or with several CSV files and no
        ``interactions.csv`` (they are listed, with how to pick one).
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "u.data").is_file():
            return "ml100k-mm"
        find_interactions_csv(path)
        return "csv"
    if path.suffix.lower() == ".csv":
        return "csv"
    raise DataError(
        f"{path}: cannot tell the format: expected a folder or a .csv file "
        "(MovieLens folder with u.data, or interactions CSV)"
    )


def load_dataset(
    path: str | Path,
    *,
    fmt: str = "auto",
    text_features: str | Path | None = None,
    image_features: str | Path | None = None,
    user_attributes: str | Path | None = None,
    duplicates: str = "error",
) -> InteractionData:
    """Load an interaction dataset from a folder or file.

    Parameters
    ----------
    path : str or Path
        A MovieLens-100K(-mm) folder, a generic interactions ``.csv`` file, or a
        folder holding ``interactions.csv`` (or a single other interactions ``.csv``).
    fmt : {"auto", "ml100k-mm", "csv"}
        Format; ``"auto"`` detects it as described in :func:`detect_format`.
    text_features, image_features : str or Path, optional
        ``.npy`` item features ``[I, D]``, replacing ``text_feat.npy`` /
        ``image_feat.npy`` found in the folder (``ml100k-mm``) or beside the
        interactions file (``csv``). For ``ml100k-mm`` rows are in ascending
        movie id order; for ``csv`` they follow ``items.csv`` beside the
        interactions, or ascending item id without it.
    user_attributes : str or Path, optional
        ``ml100k-mm``: a ``u.user``-format file replacing the folder's ``u.user``.
        ``csv``: a CSV with a ``userId`` column plus attribute columns.
    duplicates : {"error", "keep-latest"}
        Policy for a ``(user, item)`` pair that occurs on several rows.
        ``"error"`` (default) raises a :class:`DataError` naming the first two
        rows holding the earliest repeated pair. ``"keep-latest"`` keeps the
        row with the latest timestamp; on equal timestamps the later row of the
        file wins. Kept rows stay in file order.

    Returns
    -------
    InteractionData
        Users and items indexed by ascending original id. Loaders never return
        users without interactions: for ``ml100k-mm`` a user of ``u.user``
        without ratings is an error; for ``csv`` the user universe is the set
        of users in the interactions.

    Raises
    ------
    DataError
        Unreadable, malformed or inconsistent input; the message names the
        file, the row or column and the problem.
    ConfigError
        Unknown ``fmt`` or ``duplicates`` policy.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    loader = LOADERS.get(fmt)
    if loader is None:
        raise ConfigError(
            f"unknown dataset format {fmt!r}; known formats: auto, {', '.join(sorted(LOADERS))}"
        )
    return loader(
        path,
        text_features=text_features,
        image_features=image_features,
        user_attributes=user_attributes,
        duplicates=duplicates,
    )
