"""Whether a file is a whole, consistent safetensors file, judged from its header alone.

weights.py trusts, and caches, a download only once this passes, so a truncated or lying
file is refused when it is fetched instead of failing every request that loads it later.
Cheap: only the header is read, never the tensors.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MAX_SAFETENSORS_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Bits per element of each safetensors dtype.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class _NotSafetensors(str):
    pass


NOT_A_SAFETENSORS_FILE = _NotSafetensors("not a safetensors file")


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a whole, consistent safetensors file; NOT_A_SAFETENSORS_FILE when it does not even start
    like one (it may be an archive); else what is wrong with it. Cheap: only the header is read.

    A safetensors file is an 8-byte little-endian header length, a JSON object of that length, and the data:
    every tensor's data_offsets [begin, end) (relative to the data) must hold exactly its shape times its
    dtype's size, and the tensors must tile the data, in order, with no gap, overlap or trailing byte."""
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(9)
        if len(prefix) < 9 or prefix[8:] != b"{":
            return NOT_A_SAFETENSORS_FILE
        length = struct.unpack("<Q", prefix[:8])[0]
        if not 2 <= length <= MAX_SAFETENSORS_HEADER_BYTES:
            return NOT_A_SAFETENSORS_FILE
        if 8 + length > size:
            return f"it ends inside its header (truncated: {size:,} bytes, the header alone is {8 + length:,})"
        file.seek(8)
        try:
            header = json.loads(file.read(length))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    data_bytes = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return "its __metadata__ is not a map of strings"
            continue
        shown = repr(name[:60] + ("..." if len(name) > 60 else ""))
        if not isinstance(entry, dict):
            return f"the header's entry for tensor {shown} is not an object"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            return f"tensor {shown} has an unknown dtype {str(dtype)[:20]!r}"
        if not isinstance(shape, list) or not all(_natural(n) for n in shape):
            return f"tensor {shown} has no valid shape"
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets):
            return f"tensor {shown} has no valid data_offsets"
        begin, end = offsets
        if end < begin:
            return f"tensor {shown} has data_offsets that end before they begin ({begin:,} > {end:,})"
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            return (
                f"tensor {shown} ({dtype}, shape {shape}) needs {bits / 8:,g} bytes "
                f"but its data_offsets hold {end - begin:,}"
            )
        spans.append((begin, end, shown))
    cursor = 0
    for begin, end, shown in sorted(spans):
        if end > data_bytes:
            return (
                f"it is truncated: tensor {shown} ends at byte {end:,} of the data, "
                f"which holds only {data_bytes:,} bytes"
            )
        if begin != cursor:
            kind = "overlaps the one before it" if begin < cursor else "leaves a gap before it"
            return f"the header lies about its tensors: tensor {shown} {kind} (data_offsets {begin:,} vs {cursor:,})"
        cursor = end
    if cursor != data_bytes:
        return f"the header lies about its tensors: they cover {cursor:,} of its {data_bytes:,} bytes of data"
    return None


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
