"""Malformed input: one test per kind of defect, asserting the text of the error.

Each message names the file, the row (as a text editor counts it: with a header
the header is row 1) or column, and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfmfr_secure.data import load_dataset
from gfmfr_secure.errors import DataError

HEADER = "userId,itemId,rating,timestamp"
GOOD_ROWS = ["u1,i1,4,100", "u1,i2,3,200", "u2,i1,5,150", "u2,i3,1,160", "u3,i2,2,170"]
settings.register_profile(
    "malformed",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
MALFORMED = settings.get_profile("malformed")


def write_csv(
    folder: Path, rows: list[str], header: str = HEADER, name: str = "interactions.csv"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- generic CSV


@pytest.mark.parametrize("missing", ["userId", "itemId", "rating", "timestamp"])
def test_missing_column_names_column_and_file(tmp_path, missing):
    columns = HEADER.split(",")
    keep = [k for k, c in enumerate(columns) if c != missing]
    rows = [",".join(r.split(",")[k] for k in keep) for r in GOOD_ROWS]
    path = write_csv(tmp_path, rows, header=",".join(columns[k] for k in keep))
    with pytest.raises(
        DataError, match=rf"interactions.csv: missing column '{missing}' \(columns found: "
    ):
        load_dataset(path)


bad_numbers = st.sampled_from(["abc", "4 stars", "--3", "x1", "1,5", "five", "0x10", "#"])


@MALFORMED
@given(row=st.integers(0, len(GOOD_ROWS) - 1), token=bad_numbers)
def test_non_numeric_rating_names_file_row_column_and_value(tmp_path, row, token):
    rows = list(GOOD_ROWS)
    u, i, _, t = rows[row].split(",")
    rows[row] = f'{u},{i},"{token}",{t}'
    path = write_csv(tmp_path / f"r{row}", rows)
    with pytest.raises(
        DataError,
        match=rf"interactions.csv: row {row + 2}, column 'rating': non-numeric value '{token}'",
    ):
        load_dataset(path)


@MALFORMED
@given(
    row=st.integers(0, len(GOOD_ROWS) - 1),
    token=st.sampled_from(["soon", "1.5", "2024-01-01", "1e3", "NaN"]),
)
def test_non_integer_timestamp_names_row_and_value(tmp_path, row, token):
    rows = list(GOOD_ROWS)
    u, i, r, _ = rows[row].split(",")
    rows[row] = f"{u},{i},{r},{token}"
    path = write_csv(tmp_path / f"t{row}", rows)
    with pytest.raises(
        DataError,
        match=rf"interactions.csv: row {row + 2}, column 'timestamp': value '{token}' is not an integer",
    ):
        load_dataset(path)


@MALFORMED
@given(
    row=st.integers(0, len(GOOD_ROWS) - 1),
    token=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity"]),
)
def test_nan_or_inf_rating(tmp_path, row, token):
    rows = list(GOOD_ROWS)
    u, i, _, t = rows[row].split(",")
    rows[row] = f"{u},{i},{token},{t}"
    path = write_csv(tmp_path / f"n{row}", rows)
    with pytest.raises(
        DataError, match=rf"row {row + 2}, column 'rating': value '{token}' is not a finite number"
    ):
        load_dataset(path)


@pytest.mark.parametrize("column,cell", [("userId", 0), ("itemId", 1)])
def test_empty_id_in_generic_csv(tmp_path, column, cell):
    rows = list(GOOD_ROWS)
    parts = rows[3].split(",")
    parts[cell] = "  "
    rows[3] = ",".join(parts)
    path = write_csv(tmp_path, rows)
    with pytest.raises(
        DataError, match=rf"interactions.csv: row 5, column '{column}': missing id \(empty value\)"
    ):
        load_dataset(path)


def test_blank_line_inside_the_file_is_an_empty_row(tmp_path):
    path = write_csv(tmp_path, GOOD_ROWS[:2] + [""] + GOOD_ROWS[2:])
    with pytest.raises(DataError, match=r"row 4, column 'userId': missing id"):
        load_dataset(path)
    # trailing blank lines are harmless
    path.write_text(HEADER + "\n" + "\n".join(GOOD_ROWS) + "\n\n\n")
    assert load_dataset(path).n_interactions == 5


def test_empty_file_and_header_only(tmp_path):
    path = tmp_path / "interactions.csv"
    path.write_text("")
    with pytest.raises(DataError, match=r"interactions.csv: file is empty"):
        load_dataset(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"interactions.csv: file is empty \(no header or data\)"):
        load_dataset(path)
    path.write_text(HEADER + "\n")
    with pytest.raises(DataError, match=r"interactions.csv: file has no data rows"):
        load_dataset(path)


def test_ragged_rows(tmp_path):
    path = write_csv(tmp_path, GOOD_ROWS[:2] + ["u9,i9,3,100,extra"] + GOOD_ROWS[2:])
    with pytest.raises(
        DataError, match=r"interactions.csv: cannot parse: .*Expected 4 fields in line 4, saw 5"
    ):
        load_dataset(path)
    # every row one field longer than the header
    path = write_csv(tmp_path, [r + ",x" for r in GOOD_ROWS])
    with pytest.raises(
        DataError, match=r"interactions.csv: some rows have more fields than the header"
    ):
        load_dataset(path)


def test_undecodable_bytes(tmp_path):
    path = write_csv(tmp_path, GOOD_ROWS)
    path.write_bytes(path.read_bytes().replace(b"u3", b"\xe9\xff"))
    with pytest.raises(DataError, match=r"interactions.csv: not valid utf-8 text at byte"):
        load_dataset(path)


def test_repeated_pair_names_the_first_two_rows(tmp_path):
    # reading top-down, the first repeat is row 7 (of row 5); row 8 repeats row 2 later
    path = write_csv(tmp_path, GOOD_ROWS + ["u2,i3,4,500", "u1,i1,2,50"])
    with pytest.raises(
        DataError,
        match=r"interactions.csv: rows 5 and 7 repeat the pair user 'u2', item 'i3' \(2 repeated row\(s\) in all\); "
        r"pass duplicates='keep-latest'",
    ):
        load_dataset(path)


def test_items_file_must_list_every_item_and_each_once(tmp_path):
    path = write_csv(tmp_path, GOOD_ROWS)
    items = tmp_path / "items.csv"
    items.write_text("itemId\ni1\ni2\n")
    with pytest.raises(
        DataError,
        match=r"interactions.csv: column 'itemId': 1 id\(s\) not listed in .*items.csv: 'i3'",
    ):
        load_dataset(path)
    items.write_text("itemId\ni1\ni2\ni3\ni2\n")
    with pytest.raises(
        DataError,
        match=r"items.csv: column 'itemId': id 'i2' appears more than once \(rows 3 and 5\)",
    ):
        load_dataset(path)
    items.write_text("id\ni1\n")
    with pytest.raises(DataError, match=r"items.csv: missing column 'itemId'"):
        load_dataset(path)


# --------------------------------------------------------------------------- feature arrays


@MALFORMED
@given(
    row=st.integers(0, 2), col=st.integers(0, 3), value=st.sampled_from([np.nan, np.inf, -np.inf])
)
def test_nan_or_inf_in_features_names_file_row_and_column(tmp_path, row, col, value):
    folder = tmp_path / f"f{row}{col}"
    path = write_csv(folder, GOOD_ROWS)
    feats = np.ones((3, 4), dtype=np.float32)
    feats[row, col] = value
    feats[2, 3] = np.nan  # a later bad cell is not the one reported (unless it is the first)
    np.save(folder / "text.npy", feats)
    first = min((row, col), (2, 3))
    with pytest.raises(
        DataError, match=rf"text.npy: feature array holds .* at row {first[0]}, column {first[1]}"
    ):
        load_dataset(path, text_features=folder / "text.npy")


@pytest.mark.parametrize("shape", [(3,), (3, 2, 2), ()])
def test_features_not_2d(tmp_path, shape):
    path = write_csv(tmp_path, GOOD_ROWS)
    np.save(tmp_path / "img.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(
        DataError,
        match=rf"img.npy: feature array must be 2-D \[items, dim\], got shape \({', '.join(map(str, shape))}",
    ):
        load_dataset(path, image_features=tmp_path / "img.npy")


@MALFORMED
@given(n_rows=st.integers(0, 9).filter(lambda n: n != 3))
def test_feature_row_count_must_match_items(tmp_path, n_rows):
    folder = tmp_path / f"c{n_rows}"
    path = write_csv(folder, GOOD_ROWS)
    np.save(folder / "text.npy", np.zeros((n_rows, 5), dtype=np.float32))
    with pytest.raises(
        DataError, match=rf"text.npy: feature array has {n_rows} rows but there are 3 items"
    ):
        load_dataset(path, text_features=folder / "text.npy")


def test_features_not_numeric_or_not_npy(tmp_path):
    path = write_csv(tmp_path, GOOD_ROWS)
    np.save(tmp_path / "s.npy", np.array([["a"], ["b"], ["c"]]))
    with pytest.raises(DataError, match=r"s.npy: feature array must be numeric, got dtype <U1"):
        load_dataset(path, text_features=tmp_path / "s.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match=r"junk.npy: not a readable .npy array"):
        load_dataset(path, text_features=tmp_path / "junk.npy")
    with pytest.raises(DataError, match=r"absent.npy: feature file not found"):
        load_dataset(path, text_features=tmp_path / "absent.npy")


# --------------------------------------------------------------------------- MovieLens-style folder


def test_non_numeric_id_in_u_data(ml_folder):
    lines = (ml_folder / "u.data").read_text().splitlines()
    lines[6] = "2\tabc\t5\t150"
    (ml_folder / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=r"u.data: row 7, column 'item_id': id 'abc' is not an integer"
    ):
        load_dataset(ml_folder)


@MALFORMED
@given(row=st.integers(0, 12), token=bad_numbers)
def test_non_numeric_rating_in_u_data(ml_folder_writer, tmp_path_factory, row, token):
    folder = ml_folder_writer(tmp_path_factory.mktemp("ml"), features=False, posters=False)
    lines = (folder / "u.data").read_text().splitlines()
    u, i, _, t = lines[row].split("\t")
    lines[row] = f"{u}\t{i}\t{token}\t{t}"
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError, match=rf"u.data: row {row + 1}, column 'rating': non-numeric value '{token}'"
    ):
        load_dataset(folder)


def test_wrong_field_count_in_u_data(ml_folder):
    (ml_folder / "u.data").write_text("1\t1\t5\n1\t2\t3\n")
    with pytest.raises(
        DataError, match=r"u.data: expected 4 '\\t'-separated fields per row, found 3"
    ):
        load_dataset(ml_folder)


def test_ids_unknown_to_u_user_and_items_csv(ml_folder):
    with (ml_folder / "u.data").open("a") as f:
        f.write("9\t1\t3\t999\n7\t2\t3\t999\n")
    with pytest.raises(
        DataError, match=r"u.data: column 'user_id': 2 id\(s\) not listed in .*u.user: 7, 9"
    ):
        load_dataset(ml_folder)
    (ml_folder / "u.user").unlink()
    with (ml_folder / "u.data").open("a") as f:
        f.write("1\t42\t3\t999\n")
    with pytest.raises(
        DataError, match=r"u.data: column 'item_id': 1 id\(s\) not listed in .*items.csv: 42"
    ):
        load_dataset(ml_folder)


def test_user_without_interactions(ml_folder):
    with (ml_folder / "u.user").open("a", encoding="latin-1") as f:
        f.write("5|40|F|doctor|55555\n")
    with pytest.raises(
        DataError, match=r"u.data: 1 user\(s\) listed in .*u.user have no interactions: 5"
    ):
        load_dataset(ml_folder)


def test_bad_u_user_fields(ml_folder):
    lines = (ml_folder / "u.user").read_text(encoding="latin-1").splitlines()
    lines[2] = "3|23|X|writer|32067"
    (ml_folder / "u.user").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(
        DataError, match=r"u.user: row 3, column 'gender': expected 'M' or 'F', got 'X'"
    ):
        load_dataset(ml_folder)
    lines[2] = "3|old|M|writer|32067"
    (ml_folder / "u.user").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(
        DataError, match=r"u.user: row 3, column 'age': value 'old' is not an integer"
    ):
        load_dataset(ml_folder)
    lines[2] = "1|23|M|writer|32067"
    (ml_folder / "u.user").write_text("\n".join(lines) + "\n", encoding="latin-1")
    with pytest.raises(
        DataError, match=r"u.user: column 'user_id': id 1 appears more than once \(rows 1 and 3\)"
    ):
        load_dataset(ml_folder)


def test_malformed_items_csv(ml_folder):
    text = (ml_folder / "items.csv").read_text()
    (ml_folder / "items.csv").write_text(text.replace("movie_id,", "id,", 1))
    with pytest.raises(DataError, match=r"items.csv: missing column 'movie_id'"):
        load_dataset(ml_folder)
    (ml_folder / "items.csv").write_text(
        text.replace(",True,http://example.org/3", ",maybe,http://example.org/3")
    )
    with pytest.raises(
        DataError,
        match=r"items.csv: row 4, column 'has_poster': expected True or False, got 'maybe'",
    ):
        load_dataset(ml_folder)


def test_present_but_malformed_feature_file_in_folder(ml_folder):
    np.save(ml_folder / "image_feat.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(
        DataError, match=r"image_feat.npy: feature array has 4 rows but there are 5 items"
    ):
        load_dataset(ml_folder)


def test_empty_u_data(ml_folder):
    (ml_folder / "u.data").write_text("")
    with pytest.raises(DataError, match=r"u.data: file is empty"):
        load_dataset(ml_folder)
