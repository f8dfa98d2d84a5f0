"""torch.compile for the denoiser: an opt-in speed-up that costs a compile on the first call of each shape.

Inductor on CPU fuses the DiT's memory-bound glue (layer norms, adaLN modulation, GELU, the attention
reshapes) into generated C++ loops; matmuls stay on oneDNN/MKL. Shapes are static (``dynamic=False``):
a sampling run calls the denoiser with one batch shape, and static shapes give the fastest kernels.
A new batch size (for example the last, smaller chunk of a long prompt list) compiles again.
"""

from __future__ import annotations

import shutil

from torch import nn

from ..errors import ConfigError


def compile_transformer(pipe_or_transformer, mode: str | None = None):
    """Compile the denoiser in place (`nn.Module.compile`, so `pipe.transformer` stays the same object with
    its config and weights); returns its argument. `mode` is torch.compile's ("max-autotune", ...)."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(transformer, nn.Module):
        raise ConfigError(f"expected a pipeline or a torch module, got {type(pipe_or_transformer).__name__}")
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        raise ConfigError("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH")
    transformer.compile(dynamic=False, mode=mode)
    return pipe_or_transformer


def is_compiled(pipe_or_transformer) -> bool:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return getattr(transformer, "_compiled_call_impl", None) is not None
