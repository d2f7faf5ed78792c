"""Loader for the generic interactions CSV.

Layout: a CSV file with header ``userId,itemId,rating,timestamp`` (extra columns
are ignored), given as the file itself or as its folder: a folder is read
through its ``interactions.csv``, or through its only ``.csv`` file other than
``items.csv`` (see :func:`find_interactions_csv`). Ids may be integers or
arbitrary strings; they are mapped to contiguous indices by ascending original
id (numeric order when every id is a canonical decimal integer, else string
order) and the maps are kept.

Optional, beside the interactions file:

``items.csv``
    Column ``itemId`` (plus any metadata columns). When present it defines the
    item universe (items without interactions are kept) and the row order of
    the item-feature ``.npy`` files; without it the universe is the set of
    interacted items and feature rows follow ascending item id.
``text_feat.npy``, ``image_feat.npy``
    ``[I, D]`` item features, rows in the order just described. Used unless
    other files are given explicitly.

Optional, given explicitly: ``.npy`` item features (instead of the files beside
the CSV) and a user-attributes CSV with a ``userId`` column plus any attribute
columns (one row per user of the interactions; numeric-looking columns become
numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr_secure.data._util import preview
from gfmfr_secure.data.dataset import IdMap, InteractionData
from gfmfr_secure.data.readers import (
    default_feature_paths,
    describe_rows,
    load_feature_file,
    read_table,
)
from gfmfr_secure.data.validate import (
    check_known_ids,
    check_unique_ids,
    duplicate_policy_keep,
    ids_to_array,
    parse_float,
    parse_ids,
    parse_int,
    require_columns,
)
from gfmfr_secure.errors import DataError

__all__ = ["INTERACTION_COLUMNS", "SIDE_TABLES", "find_interactions_csv", "load_interactions_csv"]

INTERACTION_COLUMNS = ("userId", "itemId", "rating", "timestamp")

#: CSV files beside the interactions that hold side information, not interactions
SIDE_TABLES = ("items.csv",)


def _side_table(frame: pd.DataFrame, id_column: str, order: np.ndarray) -> pd.DataFrame:
    """Non-id columns of ``frame``, rows taken in ``order``.

    A column whose every value is a number becomes numeric, unless some value
    has a leading zero (``"02134"``: a code, kept as text).
    """
    columns: dict[str, object] = {}
    for name in frame.columns:
        if name == id_column:
            continue
        text = frame[name].str.strip()
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.notna().all() and not text.str.match(r"[+-]?0[0-9]").any():
            columns[name] = numbers.to_numpy()[order]
        else:
            arr = text.to_numpy(dtype=object)
            arr[arr == ""] = None
            columns[name] = arr[order]
    return pd.DataFrame(columns, index=pd.RangeIndex(order.shape[0]))


def find_interactions_csv(folder: Path) -> Path:
    """The interactions CSV of ``folder``.

    ``interactions.csv`` when the folder holds one, else the folder's only
    ``.csv`` file that is not a side table (:data:`SIDE_TABLES`).

    Raises
    ------
    DataError
        The folder holds no such CSV, or several and no ``interactions.csv``
        (they are listed, with how to pick one).
    """
    named = folder / "interactions.csv"
    if named.is_file():
        return named
    candidates = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() == ".csv" and p.is_file() and p.name not in SIDE_TABLES
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        side = [name for name in SIDE_TABLES if (folder / name).is_file()]
        note = f" ({', '.join(side)} lists items, not interactions)" if side else ""
        raise DataError(
            f"{folder}: folder holds neither u.data nor interactions.csv nor any other .csv file "
            f"of interactions{note}; expected a CSV with header {','.join(INTERACTION_COLUMNS)}"
        )
    names = ", ".join(p.name for p in candidates)
    raise DataError(
        f"{folder}: folder holds {len(candidates)} CSV files and no interactions.csv: {names}; "
        f"pick the interactions file by giving its path (--data {candidates[0]}) or rename it "
        "to interactions.csv"
    )


def _resolve(path: Path) -> Path:
    return find_interactions_csv(path) if path.is_dir() else path


def load_interactions_csv(
    path: str | Path,
    *,
    text_features: str | Path | None = None,
    image_features: str | Path | None = None,
    user_attributes: str | Path | None = None,
    duplicates: str = "error",
) -> InteractionData:
    """Load a generic interactions CSV (layout in the module docstring).

    Parameters
    ----------
    path : str or Path
        The interactions ``.csv`` file, or a folder holding it (see
        :func:`find_interactions_csv`).
    text_features, image_features : str or Path, optional
        ``.npy`` arrays ``[I, D]``, rows in the order of ``items.csv`` when it
        exists, else in ascending item id order. Default: ``text_feat.npy`` /
        ``image_feat.npy`` beside the interactions file when present.
    user_attributes : str or Path, optional
        CSV with a ``userId`` column and one row per user of the interactions
        (no more, no fewer).
    duplicates : {"error", "keep-latest"}
        ``"error"`` (default): a repeated ``(userId, itemId)`` pair raises,
        naming the first two rows holding it. ``"keep-latest"``: keep only the
        row with the latest timestamp (the later row on a timestamp tie).

    Returns
    -------
    InteractionData
        ``image_paths`` is ``None``; ``item_table`` holds the extra columns of
        ``items.csv`` (``None`` without one).

    Raises
    ------
    DataError
        Malformed files, empty ids, non-numeric ratings or timestamps, items
        missing from ``items.csv``, feature row counts that do not match.
    """
    source = Path(path)
    csv_path = _resolve(source)
    frame, first = read_table(csv_path)
    require_columns(frame, INTERACTION_COLUMNS, csv_path)
    user_col = parse_ids(frame["userId"], csv_path, "userId", first)
    item_col = parse_ids(frame["itemId"], csv_path, "itemId", first)
    ratings = parse_float(frame["rating"], csv_path, "rating", first)
    timestamps = parse_int(frame["timestamp"], csv_path, "timestamp", first)

    items_path = csv_path.parent / "items.csv"
    item_table: pd.DataFrame | None = None
    file_item_index: np.ndarray | None = None
    if items_path.is_file() and items_path.resolve() != csv_path.resolve():
        item_frame, item_first = read_table(items_path)
        require_columns(item_frame, ("itemId",), items_path)
        listed_col = parse_ids(item_frame["itemId"], items_path, "itemId", item_first)
        item_col, listed_col = ids_to_array(item_col, listed_col)
        check_unique_ids(listed_col)
        listed = listed_col.ids()
        item_map = IdMap.from_sorted_unique(listed)
        item_idx = check_known_ids(item_col, item_map, str(items_path))
        file_item_index = item_map.index_of(listed)
        order = np.empty_like(file_item_index)
        order[file_item_index] = np.arange(file_item_index.shape[0])
        item_table = _side_table(item_frame, "itemId", order)
        row_order = describe_rows(listed, f"the row order of {items_path}")
    else:
        (item_col,) = ids_to_array(item_col)
        item_map = IdMap.from_sorted_unique(item_col.values)
        item_idx = item_map.index_of(item_col.values)[item_col.codes]
        kind = "numeric" if item_map.ids.dtype.kind == "i" else "string"
        row_order = describe_rows(
            item_map.ids, f"ascending itemId order ({kind}) of {csv_path.name}"
        ) + f" (an {items_path.name} beside it, listing every itemId, sets another order)"

    attributes: pd.DataFrame | None = None
    if user_attributes is not None:
        attr_path = Path(user_attributes)
        attr_frame, attr_first = read_table(attr_path)
        require_columns(attr_frame, ("userId",), attr_path)
        attr_col = parse_ids(attr_frame["userId"], attr_path, "userId", attr_first)
        user_col, attr_col = ids_to_array(user_col, attr_col)
        check_unique_ids(attr_col)
        attr_ids = attr_col.ids()
        user_map = IdMap.from_sorted_unique(user_col.values)
        extra = ~np.isin(attr_ids, user_map.ids)
        if extra.any():
            raise DataError(
                f"{attr_path}: column 'userId': {int(extra.sum())} user(s) have no interactions in "
                f"{csv_path}: {preview(attr_ids[extra])}"
            )
        missing = ~np.isin(user_map.ids, attr_ids)
        if missing.any():
            raise DataError(
                f"{attr_path}: column 'userId': {int(missing.sum())} user(s) of {csv_path} have no "
                f"attribute row: {preview(user_map.ids[missing])}"
            )
        order = np.empty(len(user_map), dtype=np.int64)
        order[user_map.index_of(attr_ids)] = np.arange(len(attr_ids))
        attributes = _side_table(attr_frame, "userId", order)
    else:
        (user_col,) = ids_to_array(user_col)
        user_map = IdMap.from_sorted_unique(user_col.values)
    user_idx = user_map.index_of(user_col.values)[user_col.codes]

    keep = duplicate_policy_keep(
        user_idx,
        item_idx,
        timestamps,
        len(item_map),
        duplicates,
        csv_path,
        first,
        user_map,
        item_map,
    )
    if keep is not None:
        user_idx, item_idx = user_idx[keep], item_idx[keep]
        ratings, timestamps = ratings[keep], timestamps[keep]

    features: dict[str, np.ndarray | None] = {}
    feature_files: dict[str, Path] = {}
    beside = default_feature_paths(csv_path)
    for key, given in (("text_features", text_features), ("image_features", image_features)):
        if given is not None:
            feature_path: Path | None = Path(given)
        else:
            feature_path = beside[key] if beside[key].is_file() else None
        features[key] = None
        if feature_path is not None:
            features[key] = load_feature_file(
                feature_path, len(item_map), file_item_index, row_order
            )
            feature_files[key] = feature_path
    return InteractionData(
        name=csv_path.stem if source.is_file() else source.name,
        n_users=len(user_map),
        n_items=len(item_map),
        users=user_idx,
        items=item_idx,
        ratings=ratings.astype(np.float32),
        timestamps=timestamps,
        user_map=user_map,
        item_map=item_map,
        user_attributes=attributes,
        item_table=item_table,
        image_paths=None,
        source=source,
        feature_files=feature_files,
        **features,
    )
