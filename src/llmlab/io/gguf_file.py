"""A fast reader of a GGUF file's header: metadata, tensor table and memory-mapped tensor bytes.

gguf's GGUFReader builds a numpy view for every part of every metadata value; SmolLM2's vocabulary and merges
(~100k strings) make that about 10 s, more than the whole dequantization. This reader walks the same layout
with struct (well under a second) and leaves dequantization to gguf.quants. Layout (GGUF v2/v3, little-endian,
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv × (string key | u32 value type | value)          string = u64 length + UTF-8 bytes
    n_tensors × (string name | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset)
    padding to general.alignment (32) | tensor data, each at its offset from here
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

# value type -> (struct format, numpy dtype) of the fixed-size scalars
_SCALARS = {
    GGUFValueType.UINT8: ("<B", np.uint8), GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16), GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32), GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32), GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64), GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes per row], a view of the memory map (what gguf.quants.dequantize takes)


class GGUFFile:
    """`fields`: metadata key -> Python value (str, int, float, bool, or a list of them); `version`;
    `tensors`: the tensor table in file order. Raises ValueError/struct.error on a damaged file."""

    def __init__(self, path: str | Path):
        self.buf = buf = np.memmap(path, dtype=np.uint8, mode="r")
        raw = memoryview(buf)
        if bytes(raw[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(raw[:4])!r} (expected b'GGUF')")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} is not supported (2 or 3)")
        self._raw, self._off = raw, 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._u32())
        table = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._u32()
            dims = struct.unpack_from(f"<{n_dims}Q", raw, self._off)
            self._off += 8 * n_dims
            ttype = GGMLQuantizationType(self._u32())
            (offset,) = struct.unpack_from("<Q", raw, self._off)
            self._off += 8
            table.append((name, tuple(int(d) for d in dims), ttype, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._off // align) * align
        self.tensors = []
        for name, dims, ttype, offset in table:
            block, type_size = GGML_QUANT_SIZES[ttype]
            row_bytes = dims[0] // block * type_size
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            begin = start + offset
            if begin + rows * row_bytes > len(buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.asarray(buf[begin:begin + rows * row_bytes]).reshape(rows, row_bytes)
            self.tensors.append(GGUFTensor(name, dims, ttype, data))
        del self._raw

    def _u32(self) -> int:
        (v,) = struct.unpack_from("<I", self._raw, self._off)
        self._off += 4
        return v

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self._raw, self._off)
        start = self._off + 8
        self._off = start + n
        if self._off > len(self._raw):
            raise ValueError("a string runs past the end of the file")
        return bytes(self._raw[start:self._off]).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            item = GGUFValueType(self._u32())
            (count,) = struct.unpack_from("<Q", self._raw, self._off)
            self._off += 8
            if item in _SCALARS:  # one numpy read for the whole array
                dtype = np.dtype(_SCALARS[item][1]).newbyteorder("<")
                values = np.frombuffer(self._raw, dtype=dtype, count=count, offset=self._off)
                self._off += count * dtype.itemsize
                return values.tolist()
            return [self._value(item) for _ in range(count)]
        fmt, _ = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._raw, self._off)
        self._off += struct.calcsize(fmt)
        return v
