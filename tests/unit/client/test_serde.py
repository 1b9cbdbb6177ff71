"""Round trips of the Device wire format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keystay.client.serde import (
    ndarray_from_proto,
    ndarray_to_proto,
    weights_from_proto,
    weights_to_proto,
)
from keystay.v1 import device_pb2


@given(hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int64]),
                  shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))
def test_ndarray_round_trip(array: np.ndarray) -> None:
    back = ndarray_from_proto(ndarray_to_proto(array))
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_weights_round_trip_keeps_order() -> None:
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, dtype=np.float32)]
    back = weights_from_proto(weights_to_proto(weights))
    assert [w.shape for w in back] == [(2, 3), (4,)]
    np.testing.assert_array_equal(back[0], weights[0])


def test_truncated_tensor_is_rejected() -> None:
    tensor = ndarray_to_proto(np.zeros((2, 2), dtype=np.float32))
    bad = device_pb2.Tensor(shape=tensor.shape, dtype=tensor.dtype, data=tensor.data[:-1])
    with pytest.raises(ValueError, match="needs 16 bytes"):
        ndarray_from_proto(bad)
