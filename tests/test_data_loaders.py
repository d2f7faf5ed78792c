"""Loaders: the real ML-100K-mm folder, the tiny MovieLens-style folder, the generic CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gfmfr_secure.data import (
    IdMap,
    describe,
    detect_format,
    kcore,
    leave_one_out,
    load_dataset,
    to_implicit,
)
from gfmfr_secure.errors import ConfigError, DataError

# --------------------------------------------------------------------------- ML-100K-mm (real)


@pytest.mark.dataset
def test_ml100k_sizes_features_images_attributes(ml100k):
    d = ml100k
    assert (d.n_users, d.n_items, d.n_interactions) == (943, 1682, 100000)
    assert d.text_features.shape == (1682, 384) and d.text_features.dtype == np.float32
    assert d.image_features.shape == (1682, 1280) and d.image_features.dtype == np.float32
    assert sum(p is not None for p in d.image_paths) == 1663
    missing = {
        330,
        387,
        563,
        767,
        868,
        907,
        1026,
        1331,
        1340,
        1346,
        1359,
        1420,
        1431,
        1498,
        1516,
        1536,
        1568,
        1586,
        1667,
    }
    assert {int(d.item_map.ids[k]) for k, p in enumerate(d.image_paths) if p is None} == missing
    # items without a poster have all-zero image features
    no_poster = d.item_map.index_of(np.array(sorted(missing)))
    assert not d.image_features[no_poster].any()
    assert d.user_attributes["gender"].value_counts().to_dict() == {"M": 670, "F": 273}
    assert list(d.user_attributes.columns) == ["gender", "age", "occupation", "zip"]
    assert d.user_attributes["age"].dtype == np.int64
    np.testing.assert_array_equal(d.user_map.ids, np.arange(1, 944))
    np.testing.assert_array_equal(d.item_map.ids, np.arange(1, 1683))
    assert d.item_table["title"].iloc[0] == "Toy Story (1995)"
    assert int(d.item_table["overview"].isna().sum()) == 18
    assert d.ratings.min() == 1 and d.ratings.max() == 5


@pytest.mark.dataset
def test_ml100k_first_row_is_kept_in_file_order(ml100k):
    # u.data row 1: 196 242 3 881250949
    d = ml100k
    assert d.user_map.ids[d.users[0]] == 196 and d.item_map.ids[d.items[0]] == 242
    assert d.ratings[0] == 3 and d.timestamps[0] == 881250949


@pytest.mark.dataset
def test_ml100k_leave_one_out_sizes_and_latest_is_test(ml100k):
    split = leave_one_out(ml100k)
    assert int((split.val_items >= 0).sum()) == 943
    assert int((split.test_items >= 0).sum()) == 943
    assert split.train_items.shape[0] == 98114
    # the test item carries the user's latest timestamp, the validation item the latest of the rest
    key = ml100k.users * ml100k.n_items + ml100k.items
    order = np.argsort(key)

    def ts_of(u, i):
        return ml100k.timestamps[order[np.searchsorted(key[order], u * ml100k.n_items + i)]]

    users = np.arange(943)
    latest = np.zeros(943, dtype=np.int64)
    np.maximum.at(latest, ml100k.users, ml100k.timestamps)
    np.testing.assert_array_equal(ts_of(users, split.test_items), latest)
    train_latest = np.zeros(943, dtype=np.int64)
    np.maximum.at(train_latest, split.train_users, ts_of(split.train_users, split.train_items))
    assert np.all(ts_of(users, split.val_items) >= train_latest)


@pytest.mark.dataset
def test_describe_on_ml100k(ml100k):
    summary = describe(ml100k, leave_one_out(ml100k))
    assert (
        summary["users"] == 943 and summary["items"] == 1682 and summary["interactions"] == 100000
    )
    assert summary["train_size"] == 98114 and summary["val_size"] == summary["test_size"] == 943
    assert summary["text_features"] == [1682, 384] and summary["image_features"] == [1682, 1280]
    assert summary["image_paths_present"] == 1663
    assert summary["density"] == pytest.approx(100000 / (943 * 1682))


# --------------------------------------------------------------------------- tiny MovieLens-style folder


def test_tiny_ml_folder_loads(ml_folder):
    assert detect_format(ml_folder) == "ml100k-mm"
    d = load_dataset(ml_folder)
    assert (d.n_users, d.n_items, d.n_interactions) == (4, 5, 13)
    assert d.source == ml_folder and d.name == "tiny-ml"
    np.testing.assert_array_equal(d.text_features, np.arange(15, dtype=np.float32).reshape(5, 3))
    assert [p.name if p else None for p in d.image_paths] == [
        "1.jpg",
        None,
        "3.jpg",
        "4.jpg",
        "5.jpg",
    ]
    assert d.user_attributes["zip"].tolist() == ["85711", "94043", "32067", "T8H1N"]
    assert d.item_table["title"].tolist()[1] == "Beta, The (1996)"
    assert d.item_table["overview"].isna().tolist() == [False, True, False, False, False]
    assert d.item_table["has_poster"].tolist() == [True, False, True, True, True]
    assert "movie_id" not in d.item_table.columns


def test_optional_files_absent_give_none(ml_folder):
    for name in ("u.user", "text_feat.npy", "image_feat.npy"):
        (ml_folder / name).unlink()
    for poster in (ml_folder / "posters").iterdir():
        poster.unlink()
    (ml_folder / "posters").rmdir()
    d = load_dataset(ml_folder)
    assert d.user_attributes is None and d.text_features is None and d.image_features is None
    assert d.image_paths is None
    assert d.n_users == 4 and d.n_items == 5


def test_u_item_is_used_without_items_csv(ml_folder):
    (ml_folder / "items.csv").unlink()
    flags = ["0"] * 19
    lines = []
    for item in range(1, 7):  # item 6 has no rating: still part of the universe
        f = flags.copy()
        f[item % 19] = "1"
        lines.append(
            f"{item}|Film {item} (1990)|01-Jan-1990||http://example.org/{item}|" + "|".join(f)
        )
    (ml_folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    for name in ("text_feat.npy", "image_feat.npy"):
        (ml_folder / name).unlink()
    d = load_dataset(ml_folder)
    assert d.n_items == 6
    assert d.item_table["genres"].tolist()[:2] == ["Action", "Adventure"]
    assert d.item_table["title"].iloc[5] == "Film 6 (1990)"


def test_explicit_feature_files_override(ml_folder, tmp_path):
    other = tmp_path / "other.npy"
    np.save(other, np.ones((5, 2)))
    d = load_dataset(ml_folder, text_features=other)
    assert d.text_features.shape == (5, 2) and d.text_features.dtype == np.float32
    assert d.image_features.shape == (5, 4)


def test_format_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="neither u.data nor interactions.csv"):
        load_dataset(tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset format 'parquet'"):
        load_dataset(tmp_path, fmt="parquet")


# --------------------------------------------------------------------------- generic CSV


def _write_csv(
    path: Path, rows: list[tuple], header: str = "userId,itemId,rating,timestamp"
) -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


def test_csv_string_ids_round_trip_with_items_file_and_features(tmp_path):
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [
        ("bob", "m10", 4.5, 30),
        ("alice", "m2", 3, 10),
        ("alice", "m10", 5, 20),
        ("carol", "m1", 1, 5),
        ("bob", "m2", 2, 40),
    ]
    _write_csv(folder / "interactions.csv", rows)
    listed = ["m2", "m7", "m1", "m10"]  # items.csv order; m7 has no interaction
    (folder / "items.csv").write_text(
        "itemId,title,price\n" + "".join(f"{i},T {i},{n}\n" for n, i in enumerate(listed))
    )
    feats = np.array([[2.0, 0], [7, 0], [1, 0], [10, 0]], dtype=np.float64)  # row = items.csv order
    np.save(folder / "text.npy", feats)

    assert detect_format(folder) == "csv"
    d = load_dataset(folder, text_features=folder / "text.npy")
    assert d.user_map.ids.tolist() == ["alice", "bob", "carol"]
    assert d.item_map.ids.tolist() == ["m1", "m10", "m2", "m7"]  # string order
    assert d.n_items == 4 and d.n_interactions == 5
    # features follow the item index, whatever the file order
    np.testing.assert_array_equal(d.text_features[:, 0], [1, 10, 2, 7])
    assert d.item_table["title"].tolist() == ["T m1", "T m10", "T m2", "T m7"]
    assert d.item_table["price"].tolist() == [2, 3, 0, 1]
    assert d.image_paths is None and d.image_features is None
    # round trip: original ids back through the maps, in file order
    back = list(
        zip(
            d.user_map.ids[d.users],
            d.item_map.ids[d.items],
            d.ratings.tolist(),
            d.timestamps.tolist(),
            strict=True,
        )
    )
    assert back == [(u, i, float(r), t) for u, i, r, t in rows]
    np.testing.assert_array_equal(d.item_map.index_of(["m7", "m1"]), [3, 0])
    # writing the loaded data out again and reloading gives the same data
    again = _write_csv(tmp_path / "again.csv", back)
    d2 = load_dataset(again)
    assert d2.user_map == d.user_map
    np.testing.assert_array_equal(d2.items, [1, 2, 1, 0, 2])  # m7 is unknown without items.csv


def test_csv_integer_ids_sort_numerically_and_accept_a_file_path(tmp_path):
    path = _write_csv(tmp_path / "log.csv", [(10, 300, 1, 1), (2, 40, 1, 2), (33, 5, 1, 3)])
    d = load_dataset(path)
    assert d.user_map.ids.dtype == np.int64 and d.user_map.ids.tolist() == [2, 10, 33]
    assert d.item_map.ids.tolist() == [5, 40, 300]
    assert d.name == "log" and d.source == path


def test_csv_mixed_ids_are_strings(tmp_path):
    d = load_dataset(
        _write_csv(tmp_path / "x.csv", [(1, "a", 1, 1), (2, "007", 1, 2), (3, "7", 1, 3)])
    )
    assert d.item_map.ids.tolist() == ["007", "7", "a"]
    assert d.user_map.ids.tolist() == [1, 2, 3]


def test_csv_user_attributes(tmp_path):
    path = _write_csv(tmp_path / "log.csv", [("u2", 1, 5, 1), ("u1", 2, 4, 2)])
    attrs = tmp_path / "users.csv"
    attrs.write_text("userId,age,city\nu1,30,Oslo\nu2,41,\n")
    d = load_dataset(path, user_attributes=attrs)
    assert d.user_attributes["age"].tolist() == [30, 41]
    assert d.user_attributes["city"].iloc[0] == "Oslo" and pd.isna(
        d.user_attributes["city"].iloc[1]
    )
    attrs.write_text("userId,age\nu1,30\n")
    with pytest.raises(
        DataError,
        match=r"users.csv: column 'userId': 1 user\(s\) of .*log.csv have no attribute row: 'u2'",
    ):
        load_dataset(path, user_attributes=attrs)
    attrs.write_text("userId,age\nu1,30\nu2,41\nu3,50\n")
    with pytest.raises(DataError, match=r"1 user\(s\) have no interactions in .*log.csv: 'u3'"):
        load_dataset(path, user_attributes=attrs)


def test_duplicates_policy(tmp_path):
    rows = [
        ("a", "x", 1, 10),
        ("a", "y", 2, 10),
        ("b", "x", 3, 10),
        ("a", "x", 4, 30),
        ("a", "x", 5, 20),
    ]
    path = _write_csv(tmp_path / "dup.csv", rows)
    with pytest.raises(
        DataError, match=r"dup.csv: rows 2 and 5 repeat the pair user 'a', item 'x'"
    ):
        load_dataset(path)
    d = load_dataset(path, duplicates="keep-latest")
    assert d.n_interactions == 3
    assert d.ratings.tolist() == [2, 3, 4]  # the latest (timestamp 30) of the three (a, x) rows
    with pytest.raises(ConfigError, match="duplicates must be one of"):
        load_dataset(path, duplicates="first")


def test_duplicates_tie_keeps_the_later_row(tmp_path):
    path = _write_csv(tmp_path / "dup.csv", [(1, 1, 1, 5), (1, 1, 2, 5), (1, 2, 3, 1)])
    d = load_dataset(path, duplicates="keep-latest")
    assert d.ratings.tolist() == [2, 3]


# --------------------------------------------------------------------------- IdMap, filters


def test_idmap_index_of_and_unknown_ids():
    m = IdMap(np.array([30, 10, 20]))
    np.testing.assert_array_equal(m.index_of([20, 30, 10, 20]), [2, 0, 1, 2])
    assert len(m) == 3
    with pytest.raises(DataError, match=r"2 unknown id\(s\): 5, 99"):
        m.index_of([10, 99, 5])
    with pytest.raises(DataError, match="must be unique; repeated: 10"):
        IdMap(np.array([10, 20, 10]))
    s = IdMap(np.array(["b", "a"]))
    np.testing.assert_array_equal(s.index_of(np.array(["a", "b"], dtype=object)), [1, 0])
    assert IdMap(np.array([1, 2])) == IdMap(np.array([1, 2])) and IdMap(np.array([1, 2])) != s


def test_to_implicit_keeps_threshold_and_drops_emptied_users(ml_folder):
    d = load_dataset(ml_folder)
    pos = to_implicit(d, threshold=4)
    assert np.all(pos.ratings == 1)
    # user 3 rated 3 and 4 -> keeps one; every user keeps at least one
    assert pos.n_interactions == int((d.ratings >= 4).sum())
    assert pos.n_items == d.n_items
    assert pos.n_users == 4
    none_left = to_implicit(d, threshold=5)
    assert none_left.user_map.ids.tolist() == [1, 2, 4]  # user 3 has no 5-star rating
    assert none_left.user_attributes["zip"].tolist() == ["85711", "94043", "T8H1N"]
    # triples are preserved through the maps
    orig = set(
        zip(
            d.user_map.ids[d.users][d.ratings >= 5],
            d.item_map.ids[d.items][d.ratings >= 5],
            strict=True,
        )
    )
    assert (
        set(
            zip(
                none_left.user_map.ids[none_left.users],
                none_left.item_map.ids[none_left.items],
                strict=True,
            )
        )
        == orig
    )


def test_kcore_iterates_and_keeps_side_data_aligned(ml_folder):
    d = load_dataset(ml_folder)
    assert kcore(d, 1) is d and kcore(d, 0) is d
    liked = to_implicit(d, threshold=3)
    # ratings >= 3: u1 {1,2,3}, u2 {1,3}, u3 {2,4}, u4 {5,1}. Pass 1 drops items 4, 5;
    # pass 2 drops users 3, 4; pass 3 drops item 2; then u1 {1,3}, u2 {1,3} is a 2-core.
    core = kcore(liked, 2)
    assert core.user_map.ids.tolist() == [1, 2] and core.item_map.ids.tolist() == [1, 3]
    assert core.n_interactions == 4
    np.testing.assert_array_equal(core.text_features, d.text_features[[0, 2]])
    np.testing.assert_array_equal(core.image_features, d.image_features[[0, 2]])
    assert core.item_table["title"].tolist() == ["Alpha (1995)", "Gamma (1997)"]
    assert core.user_attributes["gender"].tolist() == ["M", "F"]
    assert [p.name for p in core.image_paths] == ["1.jpg", "3.jpg"]
    orig = set(zip(d.user_map.ids[d.users], d.item_map.ids[d.items], strict=True))
    assert (
        set(zip(core.user_map.ids[core.users], core.item_map.ids[core.items], strict=True)) <= orig
    )
    # the full data has no 3-core: removing user 3 and items 4, 5 unravels everything
    empty = kcore(d, 3)
    assert (empty.n_users, empty.n_items, empty.n_interactions) == (0, 0, 0)


def test_item_table_matches_pandas_reading(ml_folder):
    d = load_dataset(ml_folder)
    ref = pd.read_csv(ml_folder / "items.csv")
    assert d.item_table["genres"].tolist() == ref["genres"].tolist()


def test_id_spelling_rules(tmp_path):
    # generic CSV: surrounding blanks are dropped; "007" and "7" are different ids
    d = load_dataset(_write_csv(tmp_path / "a.csv", [(" u1", "007", 1, 1), ("u1 ", "7", 1, 2)]))
    assert d.user_map.ids.tolist() == ["u1"] and d.item_map.ids.tolist() == ["007", "7"]
    # attribute codes with leading zeros stay text; plain numbers become numbers
    attrs = tmp_path / "users.csv"
    attrs.write_text("userId,zip,age\nu1,02134,30\n")
    table = load_dataset(tmp_path / "a.csv", user_attributes=attrs).user_attributes
    assert table["zip"].tolist() == ["02134"] and table["age"].tolist() == [30]


def test_u_data_integer_ids_may_be_zero_padded(ml_folder):
    lines = (ml_folder / "u.data").read_text().splitlines()
    lines[0] = "001\t 1\t5\t100"
    (ml_folder / "u.data").write_text("\n".join(lines) + "\n")
    d = load_dataset(ml_folder)
    assert d.user_map.ids[d.users[0]] == 1 and d.item_map.ids[d.items[0]] == 1
