"""The update digest that binds a signed report to its update."""

from __future__ import annotations

import doctest

import numpy as np

import keystay.common.digest as digest_module
from keystay.common.digest import weights_sha256


def test_docstring_example_holds() -> None:
    assert doctest.testmod(digest_module).failed == 0


def test_digest_changes_with_values_order_dtype_and_shape() -> None:
    a = np.arange(6, dtype=np.float32)
    b = np.ones(3, dtype=np.float32)
    base = weights_sha256([a, b])
    assert weights_sha256([a.copy(), b.copy()]) == base
    assert weights_sha256([b, a]) != base
    changed = a.copy()
    changed[0] = np.nextafter(changed[0], np.float32(1))
    assert weights_sha256([changed, b]) != base
    assert weights_sha256([a.astype(np.float64), b]) != base
    assert weights_sha256([a.reshape(2, 3), b]) != base


def test_digest_survives_a_flower_array_record_round_trip() -> None:
    from flwr.app import ArrayRecord

    weights = [np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32),
               np.zeros(7, dtype=np.float32)]
    back = ArrayRecord(weights).to_numpy_ndarrays()
    assert weights_sha256(back) == weights_sha256(weights)
