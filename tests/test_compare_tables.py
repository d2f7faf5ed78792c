"""compare's tables: privacy columns appear with DP rows, and a withheld epsilon stays withheld."""

from __future__ import annotations

from evaluations.compare import METRIC_COLUMNS, CompareRow, summarise, write_tables


def _row(label: str, privacy: list[dict]) -> CompareRow:
    test = {k: [0.1, 0.2] for k in METRIC_COLUMNS}
    return CompareRow(label, "gfmfr", (0, 1), test, test, [1, 2], [1.0, 1.0], ["a", "b"], privacy)


def test_privacy_columns(tmp_path) -> None:
    dp = {"mechanism": "central", "epsilon": 0.99, "noise_multiplier": 7.9, "clip": 1.0, "sample_rate": 1.0, "rounds": 5, "delta": 1e-4, "accountant": "rdp"}
    rows = [
        _row("none", [{"mechanism": "none"}] * 2),
        _row("dp", [dp, {**dp, "epsilon": 0.98}]),
        _row("withheld", [dp, {**dp, "epsilon": None}]),
    ]
    summary = {r["config"]: r for r in summarise(rows)}
    assert summary["none"]["epsilon"] == "inf"
    assert summary["dp"]["epsilon"] == 0.99 and summary["dp"]["sigma"] == 7.9 and summary["dp"]["rounds"] == 5
    assert summary["withheld"]["epsilon"] == "withheld"
    md, _ = write_tables(rows, tmp_path)
    text = md.read_text()
    assert "| epsilon | sigma | C | q | rounds | delta | accountant | mechanism |" in text
    assert "withheld" in text


def test_no_privacy_columns_without_dp(tmp_path) -> None:
    md, _ = write_tables([_row("none", [{"mechanism": "none"}] * 2)], tmp_path)
    assert "sigma" not in md.read_text()
