"""Arrow arrays built from their buffers: the same arrays `pa.array` builds, without its first call
importing pandas (pyarrow asks whether every input is a pandas object, importing pandas to ask, which
costs a first-k run more than all its work)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def int32_array(values: np.ndarray) -> pa.Array:
    """A non-null int32 array of `values` (as `pa.array(values.astype(np.int32))`)."""
    data = np.ascontiguousarray(values, dtype=np.int32)
    return pa.Array.from_buffers(pa.int32(), len(data), [None, pa.py_buffer(data)])


def string_array(values: list[str]) -> pa.Array:
    """A non-null string array of `values` (as `pa.array(values, type=pa.string())`)."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond int32 offsets: what pa.array would do
        return pa.array(values, type=pa.string())
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))])
