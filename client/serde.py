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


#: Array element types a ``Tensor`` may carry: plain numbers only. Anything
#: else (objects, structured or unknown dtype strings) is refused with a
#: sentence rather than surfacing as a numpy exception.
_NUMERIC_KINDS = frozenset("biuf")
#: Most dimensions a tensor may declare (the model's have at most 3).
MAX_DIMS = 8


def ndarray_from_proto(tensor: device_pb2.Tensor) -> np.ndarray:
    """Decode a ``Tensor``; the size must match its shape exactly.

    Raises
    ------
    ValueError
        For an unknown or non-numeric dtype, a negative or oversized shape,
        or data whose length does not match (a sentence naming which).
    """
    try:
        dtype = np.dtype(tensor.dtype)
    except Exception:  # numpy raises TypeError, ValueError or SyntaxError by the string
        raise ValueError(f"tensor dtype {tensor.dtype[:32]!r} is not a numpy dtype") from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise ValueError(f"tensor dtype {tensor.dtype[:32]!r} is not a plain number type")
    if len(tensor.shape) > MAX_DIMS or any(d < 0 for d in tensor.shape):
        raise ValueError(
            f"tensor shape {list(tensor.shape)[:MAX_DIMS + 1]} is not a shape of at most "
            f"{MAX_DIMS} non-negative sizes"
        )
    count = 1
    for d in tensor.shape:
        count *= int(d)  # Python ints: no silent int64 overflow
    expected = count * dtype.itemsize
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
