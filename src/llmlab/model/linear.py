"""nn.Linear that picks, by measurement, the fastest of three equal products for a few rows on a CPU.

y = x Wᵀ + b, computed one of three ways:
  linear      F.linear: x·Wᵀ in MKL (one row is a matrix-vector product)
  transposed  (W·xᵀ)ᵀ, for two rows or more: on some CPUs MKL's sgemm on x·Wᵀ packs the whole of W on every
              call, reading and writing the weight where one read would do; W·xᵀ packs the small operand instead
  twice       a single row as both columns of W·[x x]ᵀ: some matrix-vector kernels stream a weight with short rows at
              half the speed of a two-column product

Which is fastest depends on the machine, the shape and the row count, and not by a little. On 2 AVX2 cores of an
AMD EPYC, "twice" read SmolLM2's 49152×576 head in 8.9 ms against 13.2 for "linear", and "transposed" made the
products of a 2-row decode step of the 15.7M shape 3× faster. On 2 AVX-512 cores of an Intel Xeon both tricks
lose: the head takes 8.4 ms by "linear" and 16.5 by "twice", and at 2 rows "transposed" is 1.3-2× slower (at 8-32
rows it is 2-3× faster again). So in inference each (shape, dtype, bias, rows rounded up to a power of two, output
layout) is timed once on first use: each way on the call's own weight and input, with the CPU caches flushed
first for weights above CACHE_RESIDENT_BYTES (a decode step reads every weight from memory), best of three. The
choice is kept in PRODUCT_CHOICE for the rest of the process; set an entry there to pin one. With autograd on,
or above FEW_ROWS rows, or off the CPU, the product is F.linear; so it is inside torch.compile, whose row count may
be symbolic (a batch of several rows) and whose products inductor chooses.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 96  # above this many rows F.linear wins on every machine measured
WAYS = ("linear", "transposed", "twice")
CACHE_RESIDENT_BYTES = 1 << 20  # smaller weights stay in cache between a model's steps: timed warm
# (dtype, out_features, in_features, has bias, row bucket, row-major output) -> way; filled by measurement
PRODUCT_CHOICE: dict[tuple, str] = {}


def _row_bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()  # 1, 2, 4, 8, ..., 128


class Linear(nn.Linear):
    """A drop-in nn.Linear (same parameters and state dict) that computes few-row products the fastest way
    measured on this machine (module docstring).

    row_major_output=False lets the caller take a "transposed" or "twice" result as the product leaves it,
    transposed in memory, and skip the copy back (elementwise ops and a following Linear take that layout)."""

    row_major_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        # in a torch.compile trace the row count may be symbolic, and inductor chooses its own products
        if (x.device.type != "cpu" or not 1 <= rows <= FEW_ROWS or self.out_features == 1
                or torch.compiler.is_compiling()):
            return F.linear(x, self.weight, self.bias)
        key = (x.dtype, self.out_features, self.in_features, self.bias is not None, _row_bucket(rows),
               self.row_major_output)
        way = PRODUCT_CHOICE.get(key)
        if way is None:
            if torch.is_grad_enabled():
                return F.linear(x, self.weight, self.bias)
            way = PRODUCT_CHOICE[key] = self._fastest_way(x, rows)
        return self._product(way, x, rows)

    def _product(self, way: str, x: torch.Tensor, rows: int) -> torch.Tensor:
        if way == "linear" or (way == "twice") != (rows == 1):  # "twice" is for one row, "transposed" for more
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(rows, self.in_features)
        xt = (x2.expand(2, self.in_features).contiguous() if way == "twice" else x2).t()
        y = torch.mm(self.weight, xt) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, xt)
        y = (y[:, :1] if way == "twice" else y).t().view(*x.shape[:-1], self.out_features)
        return y.contiguous() if self.row_major_output else y

    def _fastest_way(self, x: torch.Tensor, rows: int) -> str:
        ways = ("linear", "twice") if rows == 1 else ("linear", "transposed")
        cold = self.weight.numel() * self.weight.element_size() > CACHE_RESIDENT_BYTES
        flush = torch.empty(16 << 20) if cold else None  # 64 MiB: more than the last-level caches measured
        best = dict.fromkeys(ways, float("inf"))
        for _ in range(3):  # the ways take turns, so a slow spell of a shared machine hits all of them
            for way in ways:
                if flush is not None:
                    flush.fill_(0.0)
                start = time.perf_counter()
                self._product(way, x, rows)
                best[way] = min(best[way], time.perf_counter() - start)
        return min(ways, key=best.__getitem__)
