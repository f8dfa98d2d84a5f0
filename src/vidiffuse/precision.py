"""Which float type the CPU computes in.

bf16 autocast is ~4x faster than fp32 on CPUs with native bf16 (AVX-512 BF16, AMX), and several hundred
times slower on those without it, where oneDNN falls back to emulation (measured on an AVX2-only AMD EPYC:
0.3 GFLOP/s bf16 against 130 GFLOP/s fp32 for a 2048² matmul). Most laptops are in the second group, so
the choice is made per machine; VIDIFFUSE_PRECISION=bf16|fp32 overrides it.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


@functools.cache
def native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str = "auto") -> bool:
    """Resolve a precision setting ('auto', 'bf16', 'fp32') for this machine."""
    if precision == "auto":
        precision = os.environ.get("VIDIFFUSE_PRECISION", "auto") or "auto"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return native_bf16() if precision == "auto" else precision == "bf16"


def autocast(precision: str = "auto") -> torch.autocast:
    return torch.autocast("cpu", torch.bfloat16, enabled=use_bf16(precision))
