"""Onboarding a new CSV dataset through the command line, and the CLI's rough edges.

A tiny synthetic CSV (60 users x 40 items, string ids) is written under
``tmp_path``; every case runs ``gfmfr_secure.cli.main`` in-process and checks
the exit status and the ``error:`` line, or the documented fallback.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

from gfmfr_secure import cli
from gfmfr_secure.config import DATA_ENV_VAR, ExperimentConfig, load_config
from gfmfr_secure.console import ProgressLogHandler
from gfmfr_secure.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
N_USERS, N_ITEMS, PER_USER = 60, 40, 10
TEXT_DIM, IMAGE_DIM = 8, 6
#: keeps the GFMFR preset small enough for a few seconds per round on two cores
SMALL_GFMFR = ["--set", "fusion.embedding_dim=16", "--set", "fusion.server_epochs=2"]


def _write_ratings(path: Path, seed: int = 0) -> Path:
    """``userId,itemId,rating,timestamp`` rows: each user rates PER_USER distinct items."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(N_USERS):
        for step, item in enumerate(rng.choice(N_ITEMS, size=PER_USER, replace=False)):
            rows.append(f"u{user},i{item},{rng.integers(1, 6)},{1000 + 10 * step}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("userId,itemId,rating,timestamp\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def _write_features(folder: Path, text_rows: int = N_ITEMS, image: bool = True) -> None:
    rng = np.random.default_rng(1)
    np.save(folder / "text_feat.npy", rng.normal(size=(text_rows, TEXT_DIM)).astype(np.float32))
    if image:
        np.save(folder / "image_feat.npy", rng.normal(size=(N_ITEMS, IMAGE_DIM)).astype(np.float32))


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A folder holding one CSV of interactions (not named interactions.csv) and both feature files."""
    folder = tmp_path / "shop"
    _write_ratings(folder / "ratings.csv")
    _write_features(folder)
    return folder


def _stats(capsys: pytest.CaptureFixture[str], data: Path) -> dict:
    assert cli.main(["data", "stats", "--data", str(data), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``, check exit status 2 and one ``error:`` line; return that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- the CSV and its folder


def test_folder_with_one_csv_and_the_csv_itself_load_with_the_features_beside(shop, capsys):
    by_folder = _stats(capsys, shop)
    by_file = _stats(capsys, shop / "ratings.csv")
    for stats in (by_folder, by_file):
        assert (stats["users"], stats["items"], stats["interactions"]) == (60, 40, 600)
        assert stats["text_features"] == [N_ITEMS, TEXT_DIM]
        assert stats["image_features"] == [N_ITEMS, IMAGE_DIM]
        assert stats["text_features_file"] == str(shop / "text_feat.npy")
        assert stats["image_features_file"] == str(shop / "image_feat.npy")
        assert stats["fusion_modalities"] == "text, image"


def test_data_stats_table_says_which_features_it_did_not_find(tmp_path, capsys):
    _write_ratings(tmp_path / "plain" / "ratings.csv")
    assert cli.main(["data", "stats", "--data", str(tmp_path / "plain")]) == 0
    rows = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert rows["text_features_file"] == f"none found (looked for {tmp_path / 'plain' / 'text_feat.npy'})"
    assert rows["fusion_modalities"].startswith("none: GFMFR fuses a learned item-id embedding")
    assert "--set 'fusion.modalities=[]'" in rows["fusion_modalities"]


def test_several_csvs_without_interactions_csv_are_listed(tmp_path, capsys):
    _write_ratings(tmp_path / "two" / "train.csv")
    _write_ratings(tmp_path / "two" / "extra.csv", seed=1)
    (tmp_path / "two" / "items.csv").write_text("itemId\n" + "".join(f"i{i}\n" for i in range(N_ITEMS)))
    line = _error(capsys, ["data", "stats", "--data", str(tmp_path / "two")])
    assert "2 CSV files and no interactions.csv: extra.csv, train.csv" in line
    assert f"--data {tmp_path / 'two' / 'extra.csv'}" in line and "rename it to interactions.csv" in line


def test_interactions_csv_wins_over_other_csvs(tmp_path, capsys):
    _write_ratings(tmp_path / "named" / "interactions.csv")
    (tmp_path / "named" / "notes.csv").write_text("a,b\n1,2\n")
    assert _stats(capsys, tmp_path / "named")["interactions"] == 600


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "folder holds neither u.data nor interactions.csv nor any other .csv file"),
        (
            lambda d: (d / "items.csv").write_text("itemId\ni1\n"),
            "(items.csv lists items, not interactions)",
        ),
        (lambda d: (d / "x.parquet").write_text("x"), "userId,itemId,rating,timestamp"),
    ],
)
def test_folder_without_an_interactions_csv(tmp_path, capsys, make, message):
    folder = tmp_path / "empty"
    folder.mkdir()
    make(folder)
    assert message in _error(capsys, ["data", "stats", "--data", str(folder)])


def test_data_path_that_is_not_a_folder_or_csv(tmp_path, capsys):
    other = tmp_path / "ratings.parquet"
    other.write_text("x")
    line = _error(capsys, ["data", "stats", "--data", str(other)])
    assert "is not an existing directory or .csv file" in line


def test_feature_file_with_the_wrong_row_count(tmp_path, capsys):
    folder = tmp_path / "short"
    _write_ratings(folder / "ratings.csv")
    _write_features(folder, text_rows=N_ITEMS - 3)
    line = _error(capsys, ["data", "stats", "--data", str(folder)])
    assert f"{folder / 'text_feat.npy'}: feature array has 37 rows but there are 40 items" in line
    assert "expected 40 rows, one per item: row k holds the k-th item in ascending itemId order" in line
    assert "(string) of ratings.csv: row 0 = 'i0', row 1 = 'i1', ..., row 39 = 'i9'" in line

    listed = [f"i{i}" for i in range(N_ITEMS)]
    (folder / "items.csv").write_text("itemId\n" + "\n".join(listed) + "\n")
    line = _error(capsys, ["data", "stats", "--data", str(folder)])
    assert f"the row order of {folder / 'items.csv'}: row 0 = 'i0', row 1 = 'i1', ..., row 39 = 'i39'" in line


# --------------------------------------------------------------------------- GFMFR on the CSV


def test_gfmfr_trains_on_a_csv_folder_with_features_beside_it(shop, tmp_path, capsys):
    argv = ["train", "--config", str(CONFIGS / "gfmfr.yaml"), "--data", str(shop), "--out", str(tmp_path / "runs")]
    assert cli.main([*argv, "--set", "train.rounds=2", *SMALL_GFMFR, "--name", "shop", "--quiet"]) == 0
    assert "test HR@10=" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs" / "shop" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["NDCG@10"] <= 1.0
    assert load_config(tmp_path / "runs" / "shop" / "config.yaml").fusion.modalities == ("text", "image")


def test_gfmfr_without_features_names_the_id_only_setting_which_then_runs(tmp_path, capsys):
    _write_ratings(tmp_path / "plain" / "ratings.csv")
    argv = [
        "train", "--config", str(CONFIGS / "gfmfr.yaml"), "--data", str(tmp_path / "plain"),
        "--out", str(tmp_path / "runs"), "--set", "train.rounds=1", *SMALL_GFMFR, "--quiet",
    ]  # fmt: skip
    line = _error(capsys, argv)
    assert "fusion.modalities includes 'text' but the dataset has no text features" in line
    assert "add --set 'fusion.modalities=[]' (ID-only" in line
    assert cli.main([*argv, "--set", "fusion.modalities=[]"]) == 0
    assert "test HR@10=" in capsys.readouterr().out


def test_gfmfr_with_text_only_names_the_text_setting(tmp_path, capsys):
    folder = tmp_path / "text-only"
    _write_ratings(folder / "ratings.csv")
    _write_features(folder, image=False)
    line = _error(
        capsys,
        ["train", "--config", str(CONFIGS / "gfmfr.yaml"), "--data", str(folder), "--out", str(tmp_path / "runs"), "--quiet"],
    )
    assert "has no image features" in line and "--set 'fusion.modalities=[text]'" in line


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bytes(range(128, 256)), "is not UTF-8 text (byte 0x80 at offset 0)"),
        (b"- gfmfr\n- fedrap\n", "holds a YAML list; expected a mapping of sections to settings"),
        (b"gfmfr\n", "holds a YAML str; expected a mapping"),
        (b"train: [1\n", "is not valid YAML"),
    ],
)
def test_unreadable_config_files_are_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    line = _error(capsys, ["train", "--config", str(path), "--data", str(tmp_path)])
    assert line.startswith(f"error: config file {str(path)!r}") and message in line


def test_empty_config_file_gives_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == ExperimentConfig()


# --------------------------------------------------------------------------- budget and delta


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sample-rate", "0", "--rounds", "5", "--delta", "1e-4", "--epsilon", "1"], "--sample-rate must be in (0, 1], got 0"),
        (["--sample-rate", "1", "--rounds", "0", "--delta", "1e-4", "--epsilon", "1"], "--rounds must be >= 1, got 0"),
        (["--sample-rate", "1", "--rounds", "5", "--delta", "1", "--epsilon", "1"], "--delta must be in (0, 1), got 1"),
        (["--sample-rate", "1", "--rounds", "5", "--delta", "1e-4", "--epsilon", "-2"], "--epsilon values must be > 0"),
        (["--sample-rate", "1", "--rounds", "5", "--delta", "1e-4", "--sigma", "nan"], "--sigma values must be finite"),
        (["--sample-rate", "1", "--rounds", "5", "--delta", "1e-4", "--users", "0", "--sigma", "1"], "--users must be >= 1"),
    ],
)
def test_budget_errors_name_the_flags(capsys, flags, message):
    line = _error(capsys, ["budget", *flags])
    assert message in line
    for internal in ("target_epsilon", "sample_rate", "noise_multiplier", "steps"):
        assert internal not in line


def test_budget_unreachable_epsilon_names_the_flags(capsys, monkeypatch):
    import gfmfr_secure.privacy.cli as budget_cli

    def too_low(target_epsilon, *args, **kwargs):  # Opacus's search for a tiny target takes minutes
        raise ConfigError(f"target_epsilon={target_epsilon!r} cannot be reached: The privacy budget is too low.")

    monkeypatch.setattr(budget_cli, "calibrate_noise", too_low)
    line = _error(capsys, ["budget", "--sample-rate", "0.5", "--rounds", "5", "--delta", "1e-4", "--epsilon", "1e-9"])
    assert "--epsilon 1e-09 cannot be reached with --delta 0.0001, --sample-rate 0.5, --rounds 5 (rdp)" in line
    assert "raise --epsilon or --delta, or lower --sample-rate or --rounds" in line
    assert "target_epsilon" not in line


def test_budget_warns_when_delta_is_not_below_one_over_n(capsys):
    base = ["budget", "--sample-rate", "1", "--rounds", "5", "--epsilon", "8", "--users", "60"]
    assert cli.main([*base, "--delta", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "warning: --delta=0.05 is not below 1/n = 0.0167 for n = 60 users" in err
    assert cli.main([*base, "--delta", "1e-4"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_train_warns_when_delta_is_not_below_one_over_n(tmp_path, capsys):
    _write_ratings(tmp_path / "plain" / "ratings.csv")
    argv = [
        "train", "--config", str(CONFIGS / "fedncf.yaml"), "--data", str(tmp_path / "plain"),
        "--out", str(tmp_path / "runs"), "--name", "delta", "--set", "train.rounds=1", "--set", "train.weighting=uniform",
        "--set", "privacy.mechanism=central", "--set", "privacy.epsilon=8", "--set", "privacy.delta=0.05",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    expected = "privacy.delta=0.05 is not below 1/n = 0.0167 for n = 60 users"
    err = capsys.readouterr().err
    assert err.count(expected) == 1, err
    logged = [line for line in (tmp_path / "runs" / "delta" / "log.txt").read_text().splitlines() if expected in line]
    assert len(logged) == 1 and " WARNING " in logged[0]
    assert "privacy.delta=1.7e-04" in logged[0]


# --------------------------------------------------------------------------- compare, configs, console


def test_compare_with_one_seed_prints_no_spread(tmp_path, capsys, monkeypatch):
    import evaluations.compare as compare

    def fake_train(cfg, out, *, name, **options):
        metrics = {
            "test": {k: 0.25 for k in compare.METRIC_COLUMNS},
            "val": {k: 0.5 for k in compare.METRIC_COLUMNS},
            "best_round": 1,
            "timing": {"client_s_per_round": 1.0},
        }
        return metrics, Path(out) / name

    monkeypatch.setattr(compare, "train_and_record", fake_train)
    base = ["compare", str(CONFIGS / "fedrap.yaml"), "--data", str(tmp_path), "--quiet"]
    assert cli.main([*base, "--seeds", "0", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "| fedrap | fedrap | 1 | 0.2500 | 0.2500 |" in out
    assert "±" not in out and "0.0000" not in out
    assert "A row of 1 seed shows its value without a spread" in out
    row = (tmp_path / "c" / "results.csv").read_text().splitlines()[1].split(",")
    header = (tmp_path / "c" / "results.csv").read_text().splitlines()[0].split(",")
    assert row[header.index("HR@10 std")] == ""

    assert cli.main([*base, "--seeds", "0", "1", "--out", str(tmp_path / "c2")]) == 0
    assert "0.2500 ± 0.0000" in capsys.readouterr().out


def test_configs_lists_presets_with_one_line_each(capsys):
    assert cli.main(["configs", "--dir", str(CONFIGS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    described = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    assert described[str(CONFIGS / "gfmfr.yaml")] == "GFMFR with its defaults on ML-100K."
    assert all(text.strip() for text in described.values())


def test_log_lines_never_share_a_line_with_a_progress_bar():
    stream = io.StringIO()  # not a terminal, like a pipe
    logger = logging.Logger("onboarding-console")
    logger.addHandler(ProgressLogHandler(stream))
    logger.info("before")
    with tqdm(range(3), desc="fedrap", file=stream, mininterval=0) as bar:
        for step in bar:
            logger.info("round %d", step)
    logger.info("after")
    lines = stream.getvalue().split("\n")
    assert lines[0] == "before"
    for text in ("round 0", "round 1", "round 2", "after"):
        assert text in lines  # a line of its own: no bar text before or after it


def test_items_csv_with_only_the_id_column_sets_the_item_order(tmp_path, capsys):
    """An items.csv listing itemId alone (no attribute columns) is a valid item list."""
    folder = tmp_path / "ids"
    _write_ratings(folder / "interactions.csv")
    listed = [f"i{k}" for k in reversed(range(N_ITEMS))]
    (folder / "items.csv").write_text("itemId\n" + "\n".join(listed) + "\n", encoding="utf-8")
    stats = _stats(capsys, folder)
    assert stats["items"] == N_ITEMS and stats["users"] == N_USERS
