"""Process settings applied at import: the allocator thresholds."""

from __future__ import annotations

import ctypes.util

import pytest

from gfmfr_secure._runtime import ALLOCATOR_ENV, keep_freed_memory


@pytest.mark.parametrize("name", ALLOCATOR_ENV)
def test_a_user_setting_leaves_the_allocator_alone(name: str) -> None:
    assert keep_freed_memory({name: "1"}) is False


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to tune")
def test_thresholds_are_set_on_glibc() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")
    assert keep_freed_memory({}) is True
