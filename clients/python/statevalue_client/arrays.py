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


# Hista's representations travel in one of these (bfloat16 as the top 16 bits of float32).
VECTOR_DTYPES = ("float32", "float16", "bfloat16")
_VECTOR_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def pack_vectors(vectors: np.ndarray, dtype: str) -> bytes:
    """Row-major (count, dimension) vectors as little-endian ``dtype`` bytes.

    bfloat16 rounds float32 to nearest, ties to even (as torch does).
    """
    array = np.ascontiguousarray(vectors, dtype=FLOAT32)
    if dtype == "float32":
        return array.tobytes()
    if dtype == "float16":
        return array.astype("<f2").tobytes()
    if dtype == "bfloat16":
        bits = array.view("<u4").astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    raise ValueError(f"dtype must be one of {', '.join(VECTOR_DTYPES)}, not {dtype!r}")


def unpack_vectors(
    data: bytes, dtype: str, count: int, dimension: int, field: str = "vectors"
) -> np.ndarray:
    """Bytes of ``pack_vectors`` back to float32 (count, dimension).

    Raises:
        ValueError: an unknown dtype, or a byte length other than count × dimension values.
    """
    if dtype not in _VECTOR_ITEMSIZE:
        raise ValueError(f"{field}: dtype must be one of {', '.join(VECTOR_DTYPES)}, not {dtype!r}")
    expected = count * dimension * _VECTOR_ITEMSIZE[dtype]
    if len(data) != expected:
        raise ValueError(
            f"{field}: has {len(data)} bytes, but {count} vectors of {dimension} {dtype} "
            f"values take {expected}"
        )
    if dtype == "float32":
        flat = np.frombuffer(data, dtype=FLOAT32)
    elif dtype == "float16":
        flat = np.frombuffer(data, dtype="<f2").astype(FLOAT32)
    else:
        flat = (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view(FLOAT32)
    return flat.reshape(count, dimension)
