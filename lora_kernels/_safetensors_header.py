"""Reading and checking a safetensors header before any tensor is read.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``; ``N`` bytes of UTF-8 JSON
``{name: {"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``;
then the data buffer, which the offsets (relative to its start) must cover exactly, without holes or overlaps.

:func:`read_header` checks all of that against the file's real size, so every tensor declared there fits in
the file and nothing sized from the header can allocate more than the file holds. It also refuses what the
safetensors library would accept silently: a JSON object with the same key twice (the last would win).
Errors are :class:`HeaderError` (a ValueError) whose ``field`` is the tensor name or ``"header"``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

__all__ = ["HeaderError", "TensorInfo", "read_header", "DTYPE_BITS", "MAX_HEADER_BYTES"]

#: The safetensors library's own limit on the header length.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}


class HeaderError(ValueError):
    """A malformed safetensors header; ``field`` names the tensor (or ``"header"``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it (offsets relative to the data buffer)."""

    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _pairs_no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(k, f"key {k!r:.200}: expected distinct keys, got it twice in one JSON object (which "
                                 "one counts is ambiguous)")
        out[k] = v
    return out


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (HeaderError) and turns nesting too deep for the parser into
    a ValueError (instead of RecursionError)."""
    try:
        return json.loads(text, object_pairs_hook=_pairs_no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(name: str, e: Any, data_len: int) -> TensorInfo:
    if not isinstance(e, dict):
        raise HeaderError(name, f"tensor {name!r:.200}: expected an object with dtype/shape/data_offsets, got "
                                f"{type(e).__name__}")
    dtype, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(name, f"tensor {name!r:.200}: dtype: expected one of {sorted(DTYPE_BITS)}, got "
                                f"{dtype!r:.60}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise HeaderError(name, f"tensor {name!r:.200}: shape: expected a list of integers >= 0, got {shape!r:.80}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1] <= data_len):
        raise HeaderError(name, f"tensor {name!r:.200}: data_offsets: expected [begin, end] with 0 <= begin <= end "
                                f"<= {data_len} (the data buffer's size), got {offs!r:.80}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offs[1] - offs[0]:
        raise HeaderError(name, f"tensor {name!r:.200}: expected {offs[1] - offs[0]} bytes between data_offsets "
                                f"to hold shape {shape!r:.80} of {dtype}, which needs {bits / 8:g} bytes")
    return TensorInfo(dtype, tuple(shape), offs[0], offs[1])


def read_header(path: "os.PathLike[str] | str") -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """``({tensor name: TensorInfo}, metadata)`` of a safetensors file, checked against its size.

    Raises:
        HeaderError: anything malformed (field = tensor name or ``"header"``).
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise HeaderError("header", f"header: expected at least 8 bytes (the header length), got a file of "
                                        f"{size} bytes")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise HeaderError("header", f"header: length: expected at most {min(MAX_HEADER_BYTES, size - 8)} bytes "
                                        f"(the file holds {size}; the format allows {MAX_HEADER_BYTES}), got {n}")
        raw = f.read(n)
    if len(raw) != n:
        raise HeaderError("header", f"header: expected {n} bytes, got {len(raw)} (the file changed while read)")
    try:
        obj = loads_strict(raw.decode("utf-8"))
    except HeaderError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError("header", f"header: expected a UTF-8 JSON object, got {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise HeaderError("header", f"header: expected a JSON object, got {type(obj).__name__}")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError("__metadata__", "__metadata__: expected an object of strings")
    data_len = size - 8 - n
    infos = {k: _check_entry(k, v, data_len) for k, v in obj.items()}
    pos = 0
    for k, t in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            what = "overlaps the previous tensor" if t.begin < pos else f"leaves a hole of {t.begin - pos} bytes"
            raise HeaderError(k, f"tensor {k!r:.200}: data_offsets {[t.begin, t.end]} {what} (the buffer must be "
                                 "covered exactly once)")
        pos = t.end
    if pos != data_len:
        raise HeaderError("header", f"header: expected the tensors to cover the {data_len}-byte data buffer, they "
                                    f"cover {pos} (trailing bytes or a truncated file)")
    return infos, meta
