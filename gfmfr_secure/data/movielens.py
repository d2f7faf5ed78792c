"""Loader for MovieLens-100K folders, with the multimodal extras of ``ml-100k-mm``.

Files read from the folder (only ``u.data`` is required):

``u.data``
    Tab-separated ``user item rating timestamp``, no header; integer ids.
``u.user``
    ``|``-separated ``user_id|age|gender|occupation|zip`` (Latin-1). Defines the
    user universe; every listed user must have at least one rating.
``items.csv``
    ``movie_id,title,release_date,genres,overview,has_poster,imdb_url``. Defines
    the item universe (items without ratings are kept). When absent, the
    original ``u.item`` is used instead; when both are absent the item universe
    is the set of rated items.
``posters/<movie_id>.jpg``
    Item images; items without a file get ``None``.
``text_feat.npy``, ``image_feat.npy``
    ``[I, D]`` features whose row ``k`` belongs to the ``k``-th item in ascending
    movie id order (row ``k`` = movie id ``k + 1`` for ids ``1..I``).

Users and items are indexed by ascending original id. An optional file that is
absent leaves its field ``None``; a file that is present but malformed raises.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr_secure.data.dataset import IdMap, InteractionData
from gfmfr_secure.data.readers import (
    default_feature_paths,
    describe_rows,
    load_feature_file,
    read_table,
)
from gfmfr_secure.data.validate import (
    IdColumn,
    check_known_ids,
    check_unique_ids,
    check_users_have_interactions,
    duplicate_policy_keep,
    parse_float,
    parse_ids,
    parse_int,
    require_columns,
)
from gfmfr_secure.errors import DataError

__all__ = ["ML100K_GENRES", "load_ml100k_mm"]

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_USER_COLUMNS = ("age", "gender", "occupation", "zip")


def _read_ratings(path: Path) -> tuple[IdColumn, IdColumn, np.ndarray, np.ndarray]:
    """``u.data`` as (user ids, item ids, ratings ``[N]``, timestamps ``[N]``)."""
    frame, first = read_table(path, sep="\t", header=False, n_columns=4, quoted=False)
    users = parse_ids(frame[0], path, "user_id", first, integer_only=True)
    items = parse_ids(frame[1], path, "item_id", first, integer_only=True)
    ratings = parse_float(frame[2], path, "rating", first)
    timestamps = parse_int(frame[3], path, "timestamp", first)
    return users, items, ratings, timestamps


def _read_users(path: Path) -> tuple[IdMap, pd.DataFrame]:
    """``u.user`` as the user map and its attribute table (``U`` rows, index order)."""
    frame, first = read_table(
        path, sep="|", header=False, n_columns=5, encoding="latin-1", quoted=False
    )
    id_col = parse_ids(frame[0], path, "user_id", first, integer_only=True)
    check_unique_ids(id_col)
    ids = id_col.ids()
    age = parse_int(frame[1], path, "age", first)
    gender = frame[2].str.strip().to_numpy(dtype=str)
    bad = ~np.isin(gender, ("M", "F"))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: row {row + first}, column 'gender': expected 'M' or 'F', "
            f"got {str(gender[row])!r}"
        )
    order = np.argsort(ids)
    table = pd.DataFrame(
        {
            "gender": gender[order],
            "age": age[order],
            "occupation": frame[3].str.strip().to_numpy(dtype=str)[order],
            "zip": frame[4].str.strip().to_numpy(dtype=str)[order],
        }
    )
    return IdMap(ids[order]), table


def _text_column(values: pd.Series) -> np.ndarray:
    """Object array of strings with ``None`` for empty cells."""
    arr = values.to_numpy(dtype=object)
    arr[arr == ""] = None
    return arr


def _read_items_csv(path: Path) -> tuple[IdMap, pd.DataFrame]:
    """``items.csv`` as the item map and its table (``I`` rows, index order, id column dropped)."""
    frame, first = read_table(path)
    require_columns(frame, ("movie_id", "title"), path)
    id_col = parse_ids(frame["movie_id"], path, "movie_id", first, integer_only=True)
    check_unique_ids(id_col)
    ids = id_col.ids()
    order = np.argsort(ids)
    columns: dict[str, np.ndarray] = {}
    for name in frame.columns:
        if name == "movie_id":
            continue
        col = frame[name].str.strip()
        if name == "has_poster":
            lowered = col.str.lower()
            if not lowered.isin(("true", "false")).all():
                row = int(np.flatnonzero(~lowered.isin(("true", "false")).to_numpy())[0])
                raise DataError(
                    f"{path}: row {row + first}, column 'has_poster': expected True or False, "
                    f"got {col.iloc[row]!r}"
                )
            columns[name] = (lowered == "true").to_numpy(dtype=bool)[order]
        else:
            columns[name] = _text_column(col)[order]
    return IdMap(ids[order]), pd.DataFrame(columns)


def _read_u_item(path: Path) -> tuple[IdMap, pd.DataFrame]:
    """The original ``u.item``: item map and table (title, release_date, genres, imdb_url)."""
    n_fields = 5 + len(ML100K_GENRES)
    frame, first = read_table(
        path, sep="|", header=False, n_columns=n_fields, encoding="latin-1", quoted=False
    )
    id_col = parse_ids(frame[0], path, "movie_id", first, integer_only=True)
    check_unique_ids(id_col)
    ids = id_col.ids()
    flags = np.stack(
        [
            parse_int(frame[5 + g], path, f"genre {name}", first)
            for g, name in enumerate(ML100K_GENRES)
        ],
        axis=1,
    )
    bad = (flags != 0) & (flags != 1)
    if bad.any():
        row, g = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"{path}: row {row + first}, genre column {ML100K_GENRES[g]!r}: "
            f"expected 0 or 1, got {flags[row, g]}"
        )
    names = np.array(ML100K_GENRES, dtype=object)
    genres = np.array(["|".join(names[f.astype(bool)]) for f in flags], dtype=object)
    order = np.argsort(ids)
    table = pd.DataFrame(
        {
            "title": _text_column(frame[1].str.strip())[order],
            "release_date": _text_column(frame[2].str.strip())[order],
            "genres": genres[order],
            "imdb_url": _text_column(frame[4].str.strip())[order],
        }
    )
    return IdMap(ids[order]), table


def _poster_paths(folder: Path, item_map: IdMap) -> tuple[Path | None, ...] | None:
    """``posters/<id>.jpg`` per item (``None`` where absent); ``None`` without ``posters/``."""
    posters = folder / "posters"
    if not posters.is_dir():
        return None
    present = set(os.listdir(posters))
    return tuple(
        posters / f"{item_id}.jpg" if f"{item_id}.jpg" in present else None
        for item_id in item_map.ids.tolist()
    )


def _optional_file(given: str | Path | None, default: Path) -> Path | None:
    """The explicitly given path (which must exist), else ``default`` when it exists, else None."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        return path
    return default if default.is_file() else None


def load_ml100k_mm(
    folder: str | Path,
    *,
    text_features: str | Path | None = None,
    image_features: str | Path | None = None,
    user_attributes: str | Path | None = None,
    duplicates: str = "error",
) -> InteractionData:
    """Load a MovieLens-100K(-mm) folder (layout in the module docstring).

    Parameters
    ----------
    folder : str or Path
        Folder holding ``u.data`` and optionally the other files.
    text_features, image_features : str or Path, optional
        ``.npy`` files used instead of ``text_feat.npy`` / ``image_feat.npy``.
    user_attributes : str or Path, optional
        A ``u.user``-format file used instead of ``<folder>/u.user``.
    duplicates : {"error", "keep-latest"}
        ``"error"`` (default): a repeated ``(user, item)`` pair raises, naming
        the first two rows holding it. ``"keep-latest"``: keep only the row
        with the latest timestamp (the later row on a timestamp tie).

    Returns
    -------
    InteractionData
        For ml-100k-mm: 943 users, 1682 items, 100000 ratings, text features
        ``[1682, 384]``, image features ``[1682, 1280]``.

    Raises
    ------
    DataError
        Any malformed or inconsistent file, ids in ``u.data`` unknown to
        ``u.user`` / the item file, users without ratings.
    """
    folder = Path(folder)
    ratings_path = folder / "u.data"
    raw_users, raw_items, ratings, timestamps = _read_ratings(ratings_path)

    users_path = _optional_file(user_attributes, folder / "u.user")
    if users_path is not None:
        user_map, attributes = _read_users(users_path)
        user_idx = check_known_ids(raw_users, user_map, str(users_path))
    else:
        user_map, attributes = IdMap.from_sorted_unique(raw_users.values), None
        user_idx = user_map.index_of(raw_users.values)[raw_users.codes]

    items_csv, u_item = folder / "items.csv", folder / "u.item"
    item_table: pd.DataFrame | None
    if items_csv.is_file():
        item_map, item_table = _read_items_csv(items_csv)
        item_source = str(items_csv)
    elif u_item.is_file():
        item_map, item_table = _read_u_item(u_item)
        item_source = str(u_item)
    else:
        item_map, item_table, item_source = IdMap.from_sorted_unique(raw_items.values), None, ""
    if item_source:
        item_idx = check_known_ids(raw_items, item_map, item_source)
    else:
        item_idx = item_map.index_of(raw_items.values)[raw_items.codes]

    keep = duplicate_policy_keep(
        user_idx,
        item_idx,
        timestamps,
        len(item_map),
        duplicates,
        ratings_path,
        1,
        user_map,
        item_map,
    )
    if keep is not None:
        user_idx, item_idx = user_idx[keep], item_idx[keep]
        ratings, timestamps = ratings[keep], timestamps[keep]
    if users_path is not None:
        check_users_have_interactions(user_idx, user_map, ratings_path, str(users_path))

    listing = Path(item_source).name if item_source else ratings_path.name
    row_order = describe_rows(item_map.ids, f"ascending movie id order of {listing}")
    features: dict[str, np.ndarray | None] = {}
    feature_files: dict[str, Path] = {}
    beside = default_feature_paths(folder)
    for key, given in (("text_features", text_features), ("image_features", image_features)):
        path = _optional_file(given, beside[key])
        features[key] = None
        if path is not None:
            features[key] = load_feature_file(path, len(item_map), row_order=row_order)
            feature_files[key] = path

    return InteractionData(
        name=folder.name or "ml-100k",
        n_users=len(user_map),
        n_items=len(item_map),
        users=user_idx.astype(np.int64),
        items=item_idx.astype(np.int64),
        ratings=ratings.astype(np.float32),
        timestamps=timestamps,
        user_map=user_map,
        item_map=item_map,
        user_attributes=attributes,
        item_table=item_table,
        image_paths=_poster_paths(folder, item_map),
        source=folder,
        feature_files=feature_files,
        **features,
    )
