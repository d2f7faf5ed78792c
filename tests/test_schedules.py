import itertools
import math

import pytest

from gfmfr_secure import schedules


def test_golden_values() -> None:
    assert schedules.network_lr(0, 0.002, 0.8) == 0.002
    assert schedules.network_lr(3, 0.002, 0.8) == pytest.approx(0.002 * 0.512)
    assert schedules.item_lr(0, 0.002, 0.0, 1682, 0.9) == pytest.approx(3.364)
    assert schedules.item_lr(2, 0.01, 5.0, 1682, 0.5) == pytest.approx(0.0125)
    assert schedules.fedrap_weight(0, 0.1) == 0.0
    assert schedules.fedrap_weight(10, 0.1) == pytest.approx(0.1 * math.tanh(1.0))
    assert schedules.distill_weight(0, 100) == 1.0
    assert schedules.distill_weight(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert schedules.distill_weight(50, 100) == pytest.approx(math.cos(math.pi / 4))
    assert schedules.distill_weight(7, 100, "constant") == 1.0


def test_fedrap_weight_increases_and_is_pure() -> None:
    values = [schedules.fedrap_weight(t, 0.1) for t in range(30)]
    assert all(b > a for a, b in itertools.pairwise(values))
    assert values == [schedules.fedrap_weight(t, 0.1) for t in range(30)]  # no state
    assert values[-1] < 0.1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="round index"):
        schedules.network_lr(-1, 0.1, 0.9)
    with pytest.raises(ValueError, match="unknown distillation schedule"):
        schedules.distill_weight(1, 10, "linear")
