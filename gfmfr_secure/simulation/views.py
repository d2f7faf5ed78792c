"""Recording adversary views to disk, and reading them back.

A view file ``views/round{t}-{observer}.pt`` holds exactly what
:class:`~gfmfr_secure.types.AdversaryView` carried for that round and observer,
as plain tensors and arrays (``torch.save`` of a dict; loaded with
``weights_only=False`` because it holds numpy arrays: read only files you wrote).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gfmfr_secure.types import AdversaryView, CohortUpdate

__all__ = ["ViewRecorder", "load_view", "view_path"]


def view_path(folder: str | Path, round_idx: int, observer: str) -> Path:
    """``folder/round{t}-{observer}.pt``."""
    return Path(folder) / f"round{int(round_idx)}-{observer}.pt"


def _plain(value: Any) -> Any:
    if isinstance(value, CohortUpdate):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if hasattr(value, "item_table") and hasattr(value, "head_flat"):  # SharedParams
        return {"item_table": value.item_table.clone(), "head": value.head_flat().clone(), "latent_dim": value.latent_dim}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ViewRecorder:
    """Round callback writing the views of the chosen rounds to ``folder``."""

    def __init__(self, folder: str | Path, rounds: Iterable[int]) -> None:
        self.folder = Path(folder)
        self.rounds = {int(r) for r in rounds}
        self.written: list[Path] = []

    def __call__(self, view: AdversaryView) -> None:
        if view.round not in self.rounds:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = view_path(self.folder, view.round, view.observer)
        record = {
            "round": view.round,
            "backend": view.backend,
            "exposure": view.exposure,
            "observer": view.observer,
            "received": _plain(view.received),
            "released": _plain(view.released),
            "meta": _plain(view.meta),
            "truth": _plain(view.truth),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(record, tmp)
        tmp.replace(path)
        self.written.append(path)


def load_view(folder: str | Path, round_idx: int, observer: str) -> dict[str, Any]:
    """Read one recorded view; a missing file raises naming the rounds that were recorded."""
    path = view_path(folder, round_idx, observer)
    if not path.is_file():
        have = sorted(p.name for p in Path(folder).glob("round*-*.pt")) if Path(folder).is_dir() else []
        raise FileNotFoundError(f"no recorded view {path.name} in {folder}; recorded: {', '.join(have) or 'none'} (set record.views_rounds)")
    out: dict[str, Any] = torch.load(path, weights_only=False)
    return out


