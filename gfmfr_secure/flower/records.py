"""Role messages as Flower records, and the partition of users over SuperNodes.

A message of :mod:`gfmfr_secure.roles.messages` gives ``(arrays, config)`` with
``to_arrays()``; here ``arrays`` becomes one ``ArrayRecord`` (one ``Array`` per numpy
array, serialised by Flower with ``np.save``, so dtype, shape and bytes come back
unchanged) and ``config`` one ``ConfigRecord``, under ``<name>.arrays`` and
``<name>.config`` of a ``RecordDict``. Several messages can share one ``RecordDict``
under different names (the transport sends one-way messages along with the next request).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from gfmfr_secure.errors import ConfigError
from gfmfr_secure.roles.messages import MessageError

__all__ = ["partition_users", "put_message", "get_message", "message_names", "plain_scalar"]

M = TypeVar("M")


def partition_users(n_users: int, partition_id: int, num_partitions: int) -> np.ndarray:
    """The users SuperNode ``partition_id`` of ``num_partitions`` hosts: ``u % num_partitions == partition_id``.

    ``u`` is the 0-based user index of the loaded dataset (the order every node and the
    server derive from the same data folder). Returns int64 [k], ascending.

    Raises
    ------
    ConfigError
        If ``num_partitions < 1`` or ``partition_id`` is not in ``[0, num_partitions)``.
    """
    if num_partitions < 1:
        raise ConfigError(f"num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    return np.arange(partition_id, n_users, num_partitions, dtype=np.int64)


def plain_scalar(value: Any) -> int | float | str | bool:
    """A config value as a Python scalar a ``ConfigRecord`` takes (numpy scalars converted)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    raise MessageError(f"config value {value!r} of type {type(value).__name__} is not a scalar")


def put_message(records: RecordDict, name: str, message: Any) -> RecordDict:
    """Store ``message`` (a role message) in ``records`` as ``name.arrays`` and ``name.config``."""
    arrays, config = message.to_arrays()
    records[f"{name}.arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    records[f"{name}.config"] = ConfigRecord({k: plain_scalar(v) for k, v in config.items()})
    return records


def get_message(records: RecordDict, name: str, cls: type[M]) -> M:
    """Read the message ``cls`` stored under ``name`` (see :func:`put_message`).

    Raises
    ------
    MessageError
        If ``records`` has no such message or it does not decode as ``cls``.
    """
    if f"{name}.config" not in records.config_records:
        raise MessageError(f"the Flower message holds no {name!r} record")
    arrays = records.array_records.get(f"{name}.arrays", ArrayRecord())
    config = dict(records.config_records[f"{name}.config"])
    return cls.from_arrays({k: a.numpy() for k, a in arrays.items()}, config)  # type: ignore[attr-defined,no-any-return]


def message_names(records: RecordDict, prefix: str) -> list[str]:
    """Names of the messages in ``records`` starting with ``prefix``, in the order their index gives (``prefix.0``, ``prefix.1``, ...)."""
    found = []
    for key in records.config_records:
        if key.startswith(prefix + ".") and key.endswith(".config"):
            name = key[: -len(".config")]
            found.append((int(name[len(prefix) + 1 :]), name))
    return [name for _, name in sorted(found)]
