"""Checks on parsed input, each raising :class:`DataError` with file, row/column and problem.

Row numbers in messages are those of the file as a text editor shows them: for a
file with a header the header is row 1 and the first record row 2; for a
headerless file (``u.data``, ``u.user``) the first record is row 1. The loaders
pass ``first_row`` accordingly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr_secure.data._util import preview, sorted_unique
from gfmfr_secure.data.dataset import IdMap
from gfmfr_secure.errors import ConfigError, DataError

__all__ = [
    "DUPLICATE_POLICIES",
    "IdColumn",
    "check_feature_array",
    "check_known_ids",
    "check_unique_ids",
    "check_users_have_interactions",
    "duplicate_policy_keep",
    "ids_to_array",
    "parse_float",
    "parse_ids",
    "parse_int",
    "require_columns",
]

# Canonical decimal integers that fit in int64 (no sign '+', no leading zeros).
_INT_RE = r"-?(?:0|[1-9][0-9]{0,17})"

DUPLICATE_POLICIES = ("error", "keep-latest")


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...], path: Path) -> None:
    """Raise if any of ``columns`` is absent from ``frame`` (read from ``path``)."""
    for name in columns:
        if name not in frame.columns:
            found = ", ".join(repr(str(c)) for c in frame.columns)
            raise DataError(f"{path}: missing column {name!r} (columns found: {found})")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


@dataclass(frozen=True)
class IdColumn:
    """One id column of a file, factorised: ``values[codes]`` are its ids row by row.

    Attributes
    ----------
    path, name, first_row
        File, column name and file row number of the first record (for messages).
    codes : np.ndarray
        ``int64 [n]`` index into ``values`` of each row.
    values : np.ndarray
        ``[k]`` distinct ids, stripped of surrounding blanks: strings, or ``int64``
        after :func:`ids_to_array`.
    """

    path: Path
    name: str
    first_row: int
    codes: np.ndarray
    values: np.ndarray

    def ids(self) -> np.ndarray:
        """``[n]`` the id of every row."""
        return self.values[self.codes]

    def first_row_of(self, value_index: int) -> int:
        """File row number of the first row holding ``values[value_index]``."""
        return _first_bad(self.codes == value_index) + self.first_row


def _with_values(col: IdColumn, values: np.ndarray) -> IdColumn:
    """``col`` with its distinct values replaced by ``values`` (``[k]``), merging any that now coincide."""
    merged_codes, merged = pd.factorize(values)
    return dataclasses.replace(col, codes=merged_codes[col.codes].astype(np.int64), values=merged)


def parse_ids(
    column: pd.Series, path: Path, name: str, first_row: int, *, integer_only: bool = False
) -> IdColumn:
    """Factorise an id column; empty ids are an error.

    Work is done on the distinct values, so a column of millions of rows with
    thousands of distinct ids costs one hash pass. Values keep the order of
    their first appearance, so the first bad value is also the first in the file.

    Parameters
    ----------
    column : pd.Series
        ``[n]`` raw strings as read from the file.
    path, name, first_row
        File, column name and file row number of ``column.iloc[0]`` for messages.
    integer_only : bool
        Also require every id to be a decimal integer (``u.data``, ``u.user``);
        the values are then ``int64`` (``"007"`` and ``"7"`` are one id).
    """
    codes, uniques = pd.factorize(column)
    raw = IdColumn(path, name, first_row, codes.astype(np.int64), np.asarray(uniques, dtype=str))
    col = _with_values(raw, np.strings.strip(raw.values))  # " a" and "a" are one id
    empty = np.flatnonzero(col.values == "")
    if empty.size:
        row = col.first_row_of(int(empty[0]))
        raise DataError(f"{path}: row {row}, column {name!r}: missing id (empty value)")
    if integer_only:
        ok = pd.Series(col.values, dtype=str).str.fullmatch(r"[+-]?[0-9]{1,18}").to_numpy(bool)
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise DataError(
                f"{path}: row {col.first_row_of(k)}, column {name!r}: "
                f"id {str(col.values[k])!r} is not an integer"
            )
        return _with_values(col, col.values.astype(np.int64))
    return col


def ids_to_array(*columns: IdColumn) -> list[IdColumn]:
    """Give the id values of several columns one common type.

    All become ``int64`` when every id of every column is a canonical decimal
    integer (no sign ``+``, no leading zero), otherwise all stay strings, so that
    ids from two files (interactions and items, say) are equal exactly when
    their text is.
    """
    as_text = [c.values.astype(str) for c in columns]
    if all(pd.Series(v, dtype=str).str.fullmatch(_INT_RE).all() for v in as_text):
        # canonical text <-> integer is one-to-one: values stay distinct
        return [
            dataclasses.replace(c, values=v.astype(np.int64))
            for c, v in zip(columns, as_text, strict=True)
        ]
    return [dataclasses.replace(c, values=v) for c, v in zip(columns, as_text, strict=True)]


def _describe_bad_number(raw: str) -> str:
    if raw.strip() == "":
        return "missing value (empty)"
    if raw.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return f"value {raw.strip()!r} is not a finite number"
    return f"non-numeric value {raw.strip()!r}"


def parse_float(column: pd.Series, path: Path, name: str, first_row: int) -> np.ndarray:
    """Finite floats of ``column`` (``float64 [n]``); names the first non-numeric or NaN/inf."""
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if bad.any():
        row = _first_bad(bad)
        what = _describe_bad_number(str(column.iloc[row]))
        raise DataError(f"{path}: row {row + first_row}, column {name!r}: {what}")
    return numbers


def parse_int(column: pd.Series, path: Path, name: str, first_row: int) -> np.ndarray:
    """Integers of ``column`` (``int64 [n]``); names the first value that is not a decimal integer."""
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.dtype == np.int64:
        return numbers.to_numpy(dtype=np.int64)
    # some value is not a plain integer literal: find the first one
    values = column.astype(str).str.strip()
    ok = values.str.fullmatch(r"[+-]?[0-9]{1,18}").to_numpy(dtype=bool)
    row = _first_bad(~ok) if not ok.all() else 0
    raw = values.iloc[row]
    what = "missing value (empty)" if raw == "" else f"value {raw!r} is not an integer"
    raise DataError(f"{path}: row {row + first_row}, column {name!r}: {what}")


def check_unique_ids(col: IdColumn) -> None:
    """Raise naming the first repeated id of ``col`` and the two rows holding it."""
    codes = col.codes
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    same = sorted_codes[1:] == sorted_codes[:-1]
    if same.any():
        # the earliest second occurrence in file order
        second = order[1:][same]
        k = int(np.flatnonzero(same)[int(np.argmin(second))])
        r1, r2 = sorted(int(r) for r in (order[k], order[k + 1]))
        raise DataError(
            f"{col.path}: column {col.name!r}: id {col.values[sorted_codes[k]].item()!r} appears "
            f"more than once (rows {r1 + col.first_row} and {r2 + col.first_row})"
        )


def check_known_ids(col: IdColumn, known: IdMap, reference: str) -> np.ndarray:
    """``int64 [n]`` indices in ``known`` of the ids of ``col``; raise naming ids absent from ``reference``."""
    unknown_mask = ~np.isin(col.values, known.ids)
    if unknown_mask.any():
        unknown = sorted_unique(col.values[unknown_mask])
        raise DataError(
            f"{col.path}: column {col.name!r}: {unknown.size} id(s) not listed in {reference}: "
            f"{preview(unknown)}"
        )
    return known.index_of(col.values)[col.codes]


def check_feature_array(
    array: np.ndarray, path: Path | str, n_rows: int, row_order: str = ""
) -> np.ndarray:
    """Validate an item-feature matrix and return it as ``float32 [n_rows, D]``.

    Raises if it is not 2-D, not numeric, has a row count other than ``n_rows``
    (both counts named, followed by ``row_order``: how item ids map to rows) or
    holds NaN/inf (first bad row and column named).
    """
    if array.ndim != 2:
        raise DataError(f"{path}: feature array must be 2-D [items, dim], got shape {array.shape}")
    if array.dtype.kind not in "fiub":
        raise DataError(f"{path}: feature array must be numeric, got dtype {array.dtype}")
    if array.shape[0] != n_rows:
        raise DataError(
            f"{path}: feature array has {array.shape[0]} rows but there are {n_rows} items; "
            f"expected {n_rows} rows, one per item" + (f": {row_order}" if row_order else "")
        )
    out = array.astype(np.float32, copy=False)
    finite = np.isfinite(out)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise DataError(f"{path}: feature array holds {out[row, col]} at row {row}, column {col}")
    return out


def check_users_have_interactions(
    users: np.ndarray, user_map: IdMap, path: Path, reference: str
) -> None:
    """Raise naming the users of ``user_map`` (listed in ``reference``) with no row in ``path``."""
    counts = np.bincount(users, minlength=len(user_map))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise DataError(
            f"{path}: {empty.size} user(s) listed in {reference} have no interactions: "
            f"{preview(user_map.ids[empty])}"
        )


def duplicate_policy_keep(
    users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    n_items: int,
    policy: str,
    path: Path,
    first_row: int,
    user_ids: IdMap,
    item_ids: IdMap,
) -> np.ndarray | None:
    """Apply the duplicates policy to rows ``(users, items, timestamps)`` (each ``int64 [N]``).

    Returns
    -------
    np.ndarray or None
        ``None`` when there is no repeated ``(user, item)`` pair, else the
        ``int64`` row indices to keep, ascending (file order preserved).

    Raises
    ------
    DataError
        Policy ``"error"`` and a pair repeats: the first two rows holding the
        earliest repeated pair are named.
    ConfigError
        Unknown policy.
    """
    if policy not in DUPLICATE_POLICIES:
        raise ConfigError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {policy!r}")
    keys = users * np.int64(n_items) + items
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeat = np.empty(keys.shape[0], dtype=bool)
    repeat[:1] = False
    repeat[1:] = sorted_keys[1:] == sorted_keys[:-1]
    if not repeat.any():
        return None
    if policy == "error":
        group_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(keys.shape[0])))
        repeated_pos = np.flatnonzero(repeat)
        second = repeated_pos[np.argmin(order[repeated_pos])]
        r1, r2 = int(order[group_start[second]]), int(order[second])
        raise DataError(
            f"{path}: rows {r1 + first_row} and {r2 + first_row} repeat the pair "
            f"user {user_ids.ids[users[r2]].item()!r}, item {item_ids.ids[items[r2]].item()!r} "
            f"({int(repeat.sum())} repeated row(s) in all); pass duplicates='keep-latest' to keep "
            "the row with the latest timestamp"
        )
    rows = np.arange(keys.shape[0])
    order = np.lexsort((rows, timestamps, keys))
    sorted_keys = keys[order]
    last = np.ones(keys.shape[0], dtype=bool)
    last[:-1] = sorted_keys[:-1] != sorted_keys[1:]
    return np.sort(order[last]).astype(np.int64)
