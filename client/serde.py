"""Conversions between the Device protobuf messages and keystay's own types.

One place for every ``x_to_proto`` / ``x_from_proto`` pair, so the servicer
and the ClientApp stay thin and a round-trip test covers the wire format.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keystay.v1 import device_pb2


def ndarray_to_proto(array: np.ndarray) -> device_pb2.Tensor:
    """Encode a numpy array as a ``Tensor`` (C order, explicit byte order)."""
    contiguous = np.require(array, requirements="C")  # keeps 0-d arrays 0-d
    return device_pb2.Tensor(
        shape=list(contiguous.shape),
        dtype=contiguous.dtype.str,
        data=contiguous.tobytes(),
    )


def ndarray_from_proto(tensor: device_pb2.Tensor) -> np.ndarray:
    """Decode a ``Tensor``; the size must match its shape exactly."""
    dtype = np.dtype(tensor.dtype)
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor of shape {list(tensor.shape)} and dtype {tensor.dtype} needs "
            f"{expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape)).copy()


def weights_to_proto(weights: Sequence[np.ndarray]) -> list[device_pb2.Tensor]:
    return [ndarray_to_proto(w) for w in weights]


def weights_from_proto(tensors: Sequence[device_pb2.Tensor]) -> list[np.ndarray]:
    return [ndarray_from_proto(t) for t in tensors]
