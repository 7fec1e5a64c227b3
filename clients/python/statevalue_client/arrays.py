"""Packed little-endian arrays: the wire format of per-token data."""

from __future__ import annotations

import numpy as np

INT32 = np.dtype("<i4")
FLOAT32 = np.dtype("<f4")


_INT32_RANGE = np.iinfo(INT32)


def pack_int32(values: np.ndarray | list[int]) -> bytes:
    """Token ids or boundaries as int32 little-endian bytes.

    Raises:
        TypeError: the values are not integers.
        ValueError: a value does not fit in int32 (it would wrap to another id).
    """
    array = np.asarray(values)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"expected integer ids, got dtype {array.dtype}")
    if array.size and (array.min() < _INT32_RANGE.min or array.max() > _INT32_RANGE.max):
        bad = next(int(v) for v in array.flat if not _INT32_RANGE.min <= v <= _INT32_RANGE.max)
        raise ValueError(f"id {bad} does not fit in int32")
    return np.ascontiguousarray(array, dtype=INT32).tobytes()


def pack_float32(values: np.ndarray | list[float]) -> bytes:
    """Values, advantages or rewards as float32 little-endian bytes."""
    return np.ascontiguousarray(values, dtype=FLOAT32).tobytes()


def unpack(
    data: bytes, dtype: np.dtype, count: int | None = None, field: str = "array"
) -> np.ndarray:
    """Bytes back to a 1-D array, checking the byte length against the element count.

    Raises:
        ValueError: the buffer is not a whole number of elements, or not ``count`` of them.
    """
    if len(data) % dtype.itemsize:
        raise ValueError(
            f"{field}: {len(data)} bytes is not a whole number of {dtype.itemsize}-byte "
            f"{dtype.name} values"
        )
    array = np.frombuffer(data, dtype=dtype)
    if count is not None and array.size != count:
        raise ValueError(f"{field}: has {array.size} values but its count says {count}")
    return array
