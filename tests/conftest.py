"""Shared fixtures: the ML-100K-mm folder (skipped when absent) and small synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gfmfr_secure.config import DATA_ENV_VAR
from gfmfr_secure.data import InteractionData, load_dataset, make_synthetic

_DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "ml-100k-mm"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The ML-100K-mm folder: ``$GFMFR_DATA``, else ``<repo>/../shared/datasets/ml-100k-mm``."""
    env = os.environ.get("GFMFR_DATA")
    path = Path(env) if env else _DEFAULT_DATA
    if not (path / "u.data").is_file():
        origin = "GFMFR_DATA" if env else "the default location"
        pytest.skip(
            f"ML-100K-mm data not found at {path} (from {origin}); set GFMFR_DATA to the folder"
        )
    return path


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: Path) -> InteractionData:
    """ML-100K-mm loaded once per test session."""
    return load_dataset(ml100k_dir)


@pytest.fixture(scope="session")
def tiny_synthetic() -> InteractionData:
    """60 users x 80 items, 3 planted groups, ~12 interactions per user."""
    return make_synthetic(60, 80, n_groups=3, mean_interactions=12, text_dim=8, image_dim=6, seed=7)


# A hand-made MovieLens-style folder: 4 users, 5 items, 13 ratings.
TINY_U_DATA = [
    # user item rating timestamp
    (1, 1, 5, 100),
    (1, 2, 3, 200),
    (1, 3, 4, 300),
    (1, 4, 1, 400),
    (2, 1, 4, 100),
    (2, 5, 2, 150),
    (2, 3, 5, 150),
    (3, 2, 3, 500),
    (3, 4, 4, 600),
    (4, 5, 5, 50),
    (4, 1, 4, 60),
    (4, 2, 1, 70),
    (4, 3, 2, 80),
]
TINY_U_USER = [
    "1|24|M|technician|85711",
    "2|53|F|other|94043",
    "3|23|M|writer|32067",
    "4|33|F|artist|T8H1N",
]
TINY_ITEMS_CSV = [
    "movie_id,title,release_date,genres,overview,has_poster,imdb_url",
    "1,Alpha (1995),01-Jan-1995,Comedy,First film.,True,http://example.org/1",
    '2,"Beta, The (1996)",01-Jan-1996,Drama|War,,False,http://example.org/2',
    "3,Gamma (1997),01-Jan-1997,Action,Third film.,True,http://example.org/3",
    "4,Delta (1998),01-Jan-1998,Horror,Fourth film.,True,http://example.org/4",
    "5,Epsilon (1999),,Comedy|Romance,Fifth film.,True,",
]


def write_ml_folder(folder: Path, *, features: bool = True, posters: bool = True) -> Path:
    """Write the tiny MovieLens-style folder (u.data, u.user, items.csv, npy, posters) into ``folder``."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in TINY_U_DATA))
    (folder / "u.user").write_text("\n".join(TINY_U_USER) + "\n", encoding="latin-1")
    (folder / "items.csv").write_text("\n".join(TINY_ITEMS_CSV) + "\n")
    if features:
        np.save(folder / "text_feat.npy", np.arange(5 * 3, dtype=np.float32).reshape(5, 3))
        np.save(folder / "image_feat.npy", np.arange(5 * 4, dtype=np.float32).reshape(5, 4) * 10)
    if posters:
        (folder / "posters").mkdir(exist_ok=True)
        for item in (1, 3, 4, 5):
            (folder / "posters" / f"{item}.jpg").write_bytes(b"\xff\xd8\xff")
    return folder


@pytest.fixture
def ml_folder(tmp_path: Path) -> Path:
    """A fresh copy of the tiny MovieLens-style folder."""
    return write_ml_folder(tmp_path / "tiny-ml")


@pytest.fixture(scope="session")
def ml_folder_writer():
    """The function :func:`write_ml_folder`, for tests that build several folders."""
    return write_ml_folder


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data folder, with the data-folder environment variable unset."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    folder = tmp_path / "dataset"
    folder.mkdir()
    return folder
