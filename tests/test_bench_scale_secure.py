"""``bench_scale.py --secure``: per-client cost of masking and CKKS over the dense group-indexed layout.

The benchmark measures the library's protocols on a few clients and extrapolates; these
tests pin, at a tiny size, that what it measures is the real round (the sums come out
right, the bytes are the protocol's), that its plain baselines follow the layout, that
the trade-off it states holds (a dense plain upload shows the touched rows, a masked one
does not), and that bad options are refused with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gfmfr_secure.secagg.masking import MaskedUpload, secure_sum

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scale.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> argparse.Namespace:
    base = {"one_secure": "100x200", "method": "gfmfr", "overrides": ["model.latent_dim=8"], "secure": ["masking", "ckks"],
            "secure_clients": 2, "secure_cohort": 50, "secure_neighbours": 4, "seed": 0}  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_secure_costs_are_the_protocols(bench) -> None:
    r = bench.run_secure(_args())
    d, head, groups, rows = 8, 2 * 8 * 8 + 2 * 8 + 1, 5, 22 * 5
    assert (r["latent_dim"], r["head"], r["groups"], r["touched_rows"]) == (d, head, groups, rows)
    assert r["dim"] == groups * (200 * d + head + 1)
    by = {s["scheme"]: s for s in r["schemes"]}
    assert by["plain-sparse"]["bytes_up"] == rows * (8 + 4 * d) + 4 * head + 8
    assert by["plain-dense"]["bytes_up"] == 4 * r["dim"]
    masking, ckks = by["masking"], by["ckks"]
    assert masking["clients_played"] == 5  # one closed SecAgg+ neighbourhood of k = 4
    # upload 4 D + 112, keys 140, shares 96 k, reveal 84 + 36 (k + 1)  (the protocol's own accounting)
    assert masking["bytes_up"] == 4 * r["dim"] + 112 + 140 + 96 * 4 + 84 + 36 * 5
    assert masking["max_abs_error"] < 1e-3
    assert ckks["clients_played"] == 2 and ckks["ciphertexts"] == -(-r["dim"] // 8192)
    assert ckks["max_abs_error"] <= ckks["tolerance"]
    assert ckks["bytes_up"] > 4 * r["dim"]  # one value per coefficient: ~23 bytes per value, not 4
    assert all(s["client_s"] > 0 and s["server_s_per_client"] > 0 for s in (masking, ckks))


def test_dense_plain_upload_shows_the_rows_a_masked_one_hides(bench) -> None:
    """The server's attack: guess the client's items as the rows its upload leaves nonzero."""
    layout, _, rows = bench.secure_layout_for("fedrap", 300, ["model.latent_dim=4"])
    vectors = bench.synthetic_uploads(layout, 3, rows, seed=1)
    n_items, d = layout.n_items, layout.latent_dim
    truth = np.flatnonzero(vectors[0, : n_items * d].reshape(n_items, d).any(axis=1))
    assert truth.size == rows  # the plain dense upload gives the item set away exactly
    seen: dict[int, bytes] = {}
    secure_sum(vectors, value_bound=8.0, threshold=2, neighbours=None, seed=0, on_upload=seen.__setitem__)
    words = np.frombuffer(MaskedUpload.from_bytes(seen[0], vectors.shape[1]).payload, dtype="<u4")
    guess = np.flatnonzero(words[: n_items * d].reshape(n_items, d).any(axis=1))
    assert guess.size == n_items  # every row looks touched: the guess is the whole catalogue


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--secure", "masking", "--secure-neighbours", "3"], "--secure-neighbours must be even"),
        (["--secure-only"], "--secure-only needs --secure"),
        (["--secure", "paillier"], "unknown secure scheme"),
        (["--secure", "ckks", "--secure-clients", "0"], "--secure-clients must be >= 1"),
    ],
)
def test_bad_options_exit_2(extra: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(_BENCH), "--sizes", "100x200", *extra], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and message in proc.stderr
