"""Summary statistics of a dataset and its split (``gfmfr-secure data stats``)."""

from __future__ import annotations

import numpy as np

from gfmfr_secure.config import MODALITIES
from gfmfr_secure.data.dataset import InteractionData
from gfmfr_secure.data.readers import FEATURE_FILES, default_feature_paths
from gfmfr_secure.data.split import Split

__all__ = ["describe", "feature_report"]


def feature_report(data: InteractionData) -> dict[str, str]:
    """Which item features ``data`` has, where they came from, and what GFMFR can fuse.

    Returns
    -------
    dict
        ``text_features_file`` and ``image_features_file``: the ``.npy`` file read,
        or where the loader looked (``text_feat.npy`` / ``image_feat.npy`` in the
        data folder or beside the CSV) when none was found; ``fusion_modalities``:
        the modalities a GFMFR config can list in ``fusion.modalities`` on this
        data, with the ``--set`` that runs a preset when some are missing.
    """
    out: dict[str, str] = {}
    looked = default_feature_paths(data.source) if data.source is not None else {}
    for key, name in FEATURE_FILES.items():
        present = getattr(data, key) is not None
        if key in data.feature_files:
            out[f"{key}_file"] = str(data.feature_files[key])
        elif present:
            out[f"{key}_file"] = "given in memory (not read from a file)"
        elif key in looked:
            out[f"{key}_file"] = f"none found (looked for {looked[key]})"
        else:
            out[f"{key}_file"] = f"none (no {name})"
    have = [m for m in MODALITIES if getattr(data, f"{m}_features") is not None]
    if len(have) == len(MODALITIES):
        out["fusion_modalities"] = ", ".join(have)
    else:
        shown = (
            ", ".join(have) if have else "none: GFMFR fuses a learned item-id embedding (ID-only)"
        )
        out["fusion_modalities"] = (
            f"{shown}; GFMFR presets list {', '.join(MODALITIES)}: add "
            f"--set 'fusion.modalities=[{','.join(have)}]'"
        )
    return out


def describe(data: InteractionData, split: Split | None = None) -> dict:
    """Plain-Python summary of ``data`` (and of ``split`` when given).

    Returns
    -------
    dict
        ``name``, ``users``, ``items``, ``interactions``, ``density``,
        ``rating_min``, ``rating_max``, ``interactions_per_user`` (min / median /
        max), ``items_without_interactions``, ``text_features`` and
        ``image_features`` shapes (``None`` when absent), the entries of
        :func:`feature_report` (feature files and fusable modalities), ``image_paths_present``,
        ``user_attribute_columns``; with a split also ``train_size``,
        ``val_size``, ``test_size``, ``users_with_val``, ``users_with_test``.
        Every value is an int, float, str, list or None (JSON-ready).
    """
    n = data.n_interactions
    per_user = np.bincount(data.users, minlength=data.n_users)
    per_item = np.bincount(data.items, minlength=data.n_items)
    out: dict = {
        "name": data.name,
        "users": data.n_users,
        "items": data.n_items,
        "interactions": n,
        "density": n / (data.n_users * data.n_items) if data.n_users and data.n_items else 0.0,
        "rating_min": float(data.ratings.min()) if n else None,
        "rating_max": float(data.ratings.max()) if n else None,
        "interactions_per_user": {
            "min": int(per_user.min()) if per_user.size else 0,
            "median": float(np.median(per_user)) if per_user.size else 0.0,
            "max": int(per_user.max()) if per_user.size else 0,
        },
        "items_without_interactions": int((per_item == 0).sum()),
        "text_features": None if data.text_features is None else list(data.text_features.shape),
        "image_features": None if data.image_features is None else list(data.image_features.shape),
        **feature_report(data),
        "image_paths_present": None
        if data.image_paths is None
        else sum(p is not None for p in data.image_paths),
        "user_attribute_columns": None
        if data.user_attributes is None
        else [str(c) for c in data.user_attributes.columns],
    }
    if split is not None:
        out.update(
            {
                "train_size": int(split.train_items.shape[0]),
                "val_size": int((split.val_items >= 0).sum()),
                "test_size": int((split.test_items >= 0).sum()),
                "users_with_val": int((split.val_items >= 0).sum()),
                "users_with_test": int((split.test_items >= 0).sum()),
            }
        )
    return out
