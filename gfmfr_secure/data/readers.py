"""File reading that turns parser failures into :class:`DataError` naming the file.

Every table is read as text (``dtype=str``, no NA guessing, blank lines kept) so
that row positions match file rows and each value can be checked and reported
by :mod:`gfmfr_secure.data.validate`.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from gfmfr_secure.data.validate import check_feature_array
from gfmfr_secure.errors import DataError

__all__ = [
    "FEATURE_FILES",
    "default_feature_paths",
    "describe_rows",
    "load_feature_file",
    "read_table",
]

#: Item-feature files a loader picks up beside its data: field of
#: :class:`~gfmfr_secure.data.dataset.InteractionData` -> file name.
FEATURE_FILES = {"text_features": "text_feat.npy", "image_features": "image_feat.npy"}


def read_table(
    path: Path,
    *,
    sep: str = ",",
    header: bool = True,
    n_columns: int | None = None,
    encoding: str = "utf-8",
    quoted: bool = True,
) -> tuple[pd.DataFrame, int]:
    """Read a delimited text file as strings.

    Parameters
    ----------
    path : Path
        File to read.
    sep : str
        Field separator.
    header : bool
        Whether the first row holds column names. Headerless tables get the
        integer column labels ``0..n_columns-1``.
    n_columns : int, optional
        Required number of fields per row for headerless tables.
    encoding : str
        Text encoding (``"latin-1"`` for the MovieLens ``u.*`` files).
    quoted : bool
        Whether ``"`` quotes fields (True for CSV, False for ``u.*`` files).

    Returns
    -------
    frame : pd.DataFrame
        ``[n_rows, n_cols]`` string cells, ``""`` for empty ones. Trailing blank
        lines are dropped; blank lines inside the file are kept as empty rows.
    first_row : int
        File row number of ``frame.iloc[0]`` (2 with a header, else 1).

    Raises
    ------
    DataError
        Missing or empty file, no data rows, undecodable bytes, ragged rows or
        a wrong field count.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            frame = pd.read_csv(
                path,
                sep=sep,
                header=0 if header else None,
                dtype=str,
                keep_default_na=False,
                skip_blank_lines=False,
                index_col=False,
                encoding=encoding,
                quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
            )
        except pd.errors.EmptyDataError as err:
            raise DataError(f"{path}: file is empty (no header or data)") from err
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: cannot parse: {str(err).strip()}") from err
        except pd.errors.ParserWarning as err:
            raise DataError(f"{path}: some rows have more fields than the header ({err})") from err
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}: not valid {encoding} text at byte {err.start}: {err.reason}"
            ) from err
    n_keep = len(frame)
    while n_keep and all(v == "" for v in frame.iloc[n_keep - 1]):
        n_keep -= 1
    frame = frame.iloc[:n_keep]
    if n_keep == 0:
        raise DataError(f"{path}: file has no data rows")
    if not header and n_columns is not None and frame.shape[1] != n_columns:
        raise DataError(
            f"{path}: expected {n_columns} {sep!r}-separated fields per row, "
            f"found {frame.shape[1]} in row 1"
        )
    if header:
        frame.columns = [str(c).strip() for c in frame.columns]
    return frame, 2 if header else 1


def default_feature_paths(source: Path) -> dict[str, Path]:
    """Where the loaders look for item features when none are given explicitly.

    ``text_feat.npy`` and ``image_feat.npy`` in ``source`` when it is a folder,
    else beside the file ``source``; keys are the names of :data:`FEATURE_FILES`.
    """
    folder = source if source.is_dir() else source.parent
    return {key: folder / name for key, name in FEATURE_FILES.items()}


def describe_rows(ids: np.ndarray, order: str) -> str:
    """How feature rows map to item ids, for messages.

    Parameters
    ----------
    ids : np.ndarray
        ``[I]`` original item id of each feature row, in row order.
    order : str
        What that order is, e.g. ``"ascending itemId of ratings.csv"``.

    Returns
    -------
    str
        ``"row k holds the k-th item in <order>: row 0 = 'a', row 1 = 'b', ..., row 9 = 'z'"``.
    """
    shown = [f"row {k} = {ids[k].item()!r}" for k in range(min(2, len(ids)))]
    if len(ids) > 3:
        shown.append("...")
    if len(ids) > 2:
        shown.append(f"row {len(ids) - 1} = {ids[-1].item()!r}")
    return f"row k holds the k-th item in {order}: " + ", ".join(shown)


def load_feature_file(
    path: Path, n_rows: int, row_index: np.ndarray | None = None, row_order: str = ""
) -> np.ndarray:
    """Load a ``.npy`` item-feature matrix and put its rows in item-index order.

    Parameters
    ----------
    path : Path
        ``.npy`` file holding a numeric ``[n_rows, D]`` array (no pickles).
    n_rows : int
        Number of items ``I``.
    row_index : np.ndarray, optional
        ``int64 [I]``: item index of each file row. ``None`` when file rows are
        already in item-index order.
    row_order : str
        How item ids map to file rows (see :func:`describe_rows`); named in the
        error raised for a wrong row count.

    Returns
    -------
    np.ndarray
        ``float32 [I, D]``, row ``k`` the features of item index ``k``.
    """
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from err
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected a single .npy array, found {type(array).__name__}")
    array = check_feature_array(array, path, n_rows, row_order)
    if row_index is None:
        return np.ascontiguousarray(array)
    out = np.empty_like(array)
    out[row_index] = array
    return out
