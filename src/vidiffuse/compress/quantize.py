"""Smaller, faster denoisers: int8 and bf16 versions of the VideoDiT, in memory and on disk.

Modes (the denoiser's weights change; the autoencoder is saved as it was):

- ``int8-dynamic``: int8 weights (symmetric, one scale per output channel); each call quantizes its input
  to 8 bits (one scale per tensor) and multiplies in integers on fbgemm/oneDNN (``quantized::linear_dynamic``).
  About 2x faster per linear layer than fp32 on an AVX2 CPU; weights 4x smaller than fp32, 2x than bf16.
  The GELU after each MLP's first layer moves into that layer (`fuse_gelu`), and on oneDNN it is computed
  inside the int8 matmul (``onednn::qlinear_pointwise`` with a GELU post-op), as int8 inference engines do:
  torch's eager tanh-GELU alone takes as long as an int8 MLP layer here. On oneDNN the frame decoder's
  wide convolutions go int8 too (`quantize_decoder`, made from the saved float decoder at load): decoding
  is the one part of a video the denoiser's int8 layers leave in fp32.
- ``int8-weight-only``: the same int8 weights, widened to the activations' float type at each call. As
  small on disk and in memory, fp32 speed: no CPU kernel here multiplies int8 weights by float
  activations faster than fp32 does.
- ``bf16``: weights rounded to bfloat16, half the size on disk. Where the CPU computes bf16 natively
  (AVX-512 BF16, AMX; see `vidiffuse.precision`) they stay bf16 and the pipeline's autocast computes in
  bf16; elsewhere (AVX2) they are widened to fp32 at load, because emulated bf16 runs some hundred times
  slower than fp32.

Why torch.ao's kernels and not torchao: measured on this 2-core AVX2 EPYC with torch 2.13 for the DiT's
linear shapes (4096 tokens = CFG 2 x 16 videos x 128 tokens, hidden 256, MLP 1024), torch.ao's dynamic int8
linear ran in 17 ms against fp32's 38 ms, while torchao 0.18's eager ``Int8DynamicActivationInt8WeightConfig``
took 820 ms (its int8 matmul, ``torch._int_mm``, has no fast CPU kernel: 770 ms for the same product) and
``Int8WeightOnlyConfig`` 64 ms. torch marks its quantized-tensor API deprecated; it is used at one point
only (`_pack`, which builds the engine's packed weight from the plain int8 buffers), and the modules and files
hold plain int8 tensors and float scales, so a later kernel can use them unchanged.

A quantized model directory is a copy of its source with ``transformer/quantized.safetensors`` in place of
the diffusers weights file (a plain ``VideoDiT.from_pretrained`` then fails loudly instead of loading random
weights) and ``"quantization": "<mode>"`` in ``model_index.json``; `VideoPipeline.from_pretrained` loads it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..precision import native_bf16, use_bf16

logger = logging.getLogger(__name__)

MODES = ("int8-dynamic", "int8-weight-only", "bf16")
WEIGHTS_FILE = "quantized.safetensors"
FILE_FORMAT = "vidiffuse-quantized-v1"
# The last projection writes the predicted velocity itself: int8 there doubled the output error on the
# bundled model (2.5% -> 1.2% relative when it stays float) for under 1% of the FLOPs and weights.
KEEP_FLOAT = ("proj_out",)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


@contextmanager
def _quiet_deprecation():
    """torch warns on every quantized-tensor creation that the API is deprecated; it is still the only fast
    int8 matmul on AVX2 CPUs (see the module docstring), and a warning per layer helps no user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        yield


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q, scale) with weight ≈ q * scale[:, None], q in [-127, 127].

    -128 is left out so the grid is symmetric about zero, as fbgemm's symmetric per-channel scheme expects.
    """
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))  # an all-zero row keeps q = 0 with any scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def int8_engine() -> str:
    """oneDNN on CPUs that multiply int8 into 32-bit accumulators (AVX-512 VNNI, AMX: every CPU with native
    bf16 has them), fbgemm's x86 path elsewhere. Measured on a 2-core AMX Xeon for 4096 x 256 -> 1024: oneDNN
    2.4 ms, fbgemm 4.2 ms, fp32 9.1 ms. Whole videos gain less, since the denoiser's attention and norms and
    part of decoding stay float: 1.51x to 1.61x over fp32 in four `vidiffuse bench` runs (all golden prompts)."""
    return "onednn" if native_bf16() and "onednn" in torch.backends.quantized.supported_engines else "x86"


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = int8_engine()  # the packed weight keeps the engine it was packed for
    try:
        with _quiet_deprecation():
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
    finally:
        torch.backends.quantized.engine = engine


_packed_cache: dict[tuple[int, str], tuple] = {}


def _packed_for(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str = "linear_dynamic",
                conv: tuple | None = None):
    """The packed form of a layer's int8 buffers for `kernel` (``linear_dynamic``: the engine's
    ``quantized::linear_dynamic``; ``onednn``: oneDNN's ``qlinear_pointwise``; ``onednn-conv``: its
    ``qconv2d_pointwise``, with `conv` = (stride, padding, dilation, groups)), made once and kept while the
    weight tensor lives.

    Keyed by the tensor's identity and the buffers' version counters, so an in-place load repacks.
    """
    versions = (q._version, scale._version, None if bias is None else bias._version)
    key = (id(q), kernel)
    hit = _packed_cache.get(key)
    if hit is not None and hit[0]() is q and hit[1] == versions:
        return hit[2]
    if kernel == "onednn":
        packed = (torch.ops.onednn.qlinear_prepack(q, None), torch.zeros(len(scale), dtype=torch.long))
    elif kernel == "onednn-conv":
        # the input's scale is only known per call; the packed weight does not depend on the one given here
        packed = (torch.ops.onednn.qconv_prepack(q, scale, 1.0, 0, *conv, None), torch.zeros(len(scale), dtype=torch.long))
    else:
        packed = _pack(q, scale, bias)
    _packed_cache[key] = (weakref.ref(q, lambda _, k=key: _packed_cache.pop(k, None)), versions, packed)
    return packed


def _uint8_activations(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x as oneDNN's int8 kernels take it: 8-bit values (one scale and zero point for the tensor), the scale,
    the zero point."""
    with _quiet_deprecation():
        qx = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    return qx.int_repr(), qx.q_scale(), qx.q_zero_point()


def _linear_gelu_onednn(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, gelu: str) -> torch.Tensor:
    """gelu(x @ W.T + b) in one oneDNN call, which applies the GELU while it writes the product: for the DiT's
    MLP (2048 x 256 -> 1024) 2.3 ms against 4.3 ms for ``linear_dynamic`` and then the GELU."""
    values, scale, zero_point = _uint8_activations(x)
    packed, zero_points = _packed_for(weight_int8, weight_scale, bias, "onednn")
    y = torch.ops.onednn.qlinear_pointwise(values.view(-1, x.shape[-1]), scale, zero_point, packed, weight_scale,
                                           zero_points, bias, 1.0, 0, torch.float32, "gelu", [], gelu)
    return y.view(*x.shape[:-1], -1)


def _linear_int8_dynamic(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None, gelu: str) -> torch.Tensor:
    x = x.float().contiguous()
    if gelu and int8_engine() == "onednn":
        return _linear_gelu_onednn(x, weight_int8, weight_scale, bias, gelu)
    # reduce_range: 7-bit activations, so AVX2's pairwise u8 x s8 products cannot saturate 16 bits; VNNI and
    # AMX accumulate in 32 bits, and 8-bit activations halve the error there (0.8% against 1.4% relative)
    y = torch.ops.quantized.linear_dynamic(x, _packed_for(weight_int8, weight_scale, bias), int8_engine() != "onednn")
    return F.gelu(y, approximate=gelu) if gelu else y


@torch.library.custom_op("vidiffuse::linear_int8_dynamic", mutates_args=())
def linear_int8_dynamic(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, gelu: str) -> torch.Tensor:
    """y = x @ (weight_int8 * weight_scale[:, None]).T + bias, with x quantized to 8 bits (7 on AVX2) per
    call, then GELU (tanh-approximated with gelu="tanh", exact with "none") unless gelu is "".

    An opaque op with plain tensor arguments, so torch.compile traces a whole quantized denoiser in one
    graph (a torchbind argument would break the graph at every layer).
    """
    return _linear_int8_dynamic(x, weight_int8, weight_scale, bias, gelu)


@linear_int8_dynamic.register_fake
def _(x, weight_int8, weight_scale, bias, gelu):
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0], dtype=torch.float32)


class _Int8Linear(nn.Module):
    """An int8 weight with per-output-channel scales and a float bias, held (and saved) as plain tensors
    ``weight_int8``, ``weight_scale``, ``bias`` that safetensors can store."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.detach().to(torch.int8).clone())
        self.register_buffer("weight_scale", scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8DynamicLinear(_Int8Linear):
    """int8 weight x int8 activation (quantized per call, one scale per tensor), int32 accumulation; and the
    GELU that followed the layer, where `fuse_gelu` moved it in (`gelu`: its ``approximate``)."""

    gelu: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the custom op only where torch.compile traces: in eager its dispatch costs ~0.1 ms a call, 77 calls a forward
        op = linear_int8_dynamic if torch.compiler.is_compiling() else _linear_int8_dynamic
        return op(x, self.weight_int8, self.weight_scale, self.bias, self.gelu or "").to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", gelu={self.gelu!r}" if self.gelu else "")


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Move each GELU that directly follows an int8-dynamic layer in an ``nn.Sequential`` (the DiT's MLPs)
    into that layer, leaving an ``nn.Identity`` in its place: the same function, computed in one pass on
    oneDNN. The state dict is unchanged (a GELU holds no weights), so saved models load either way."""
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                if isinstance(seq[i], Int8DynamicLinear) and not seq[i].gelu and type(seq[i + 1]) is nn.GELU:
                    seq[i].gelu = seq[i + 1].approximate
                    seq[i + 1] = nn.Identity()
    return model


class Int8DynamicConv2d(nn.Module):
    """A 2-D convolution with int8 weights (one scale per output channel) and int8 activations (quantized per
    call, one scale per tensor) on oneDNN's ``qconv2d_pointwise``; float bias, float output."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        q, scale = int8_weight(conv.weight.flatten(1))
        self.register_buffer("weight_int8", q.view_as(conv.weight).clone())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.conv = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale, zero_point = _uint8_activations(x.float().contiguous(memory_format=torch.channels_last))
        packed, zero_points = _packed_for(self.weight_int8, self.weight_scale, self.bias, "onednn-conv", self.conv)
        y = torch.ops.onednn.qconv2d_pointwise(values, scale, zero_point, packed, self.weight_scale, zero_points,
                                               self.bias, *self.conv, 1.0, 0, torch.float32, "none", [], "")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"


# Narrower convolutions gained little or lost (16 frames at 64x64, 2-core AMX Xeon: 64 -> 64 channels 19 ms
# fp32 against 11 ms int8; 64 -> 32 11.7 against 11.5 ms; 32 -> 32 5.5 against 5.0 ms; 32 -> 3 3.0 against 4.0 ms)
INT8_CONV_MIN_CHANNELS = 64


def quantize_decoder(decoder: nn.Module) -> int:
    """Make the frame decoder's wide convolutions int8-dynamic, in place; returns how many.

    Only on oneDNN (CPUs with VNNI or AMX): fbgemm has no dynamic int8 convolution. Decoding is the part of a
    video the denoiser's int8 layers do not touch: about a seventh of an fp32 video's time and a quarter of an
    int8 one's (profiled at batch 8 on the bundled model)."""
    if int8_engine() != "onednn":
        return 0
    convs = [(n, m) for n, m in decoder.named_modules() if type(m) is nn.Conv2d and m.groups == 1
             and min(m.in_channels, m.out_channels) >= INT8_CONV_MIN_CHANNELS]
    with torch.no_grad():
        for name, conv in convs:
            _replace(decoder, name, Int8DynamicConv2d(conv))
    return len(convs)


def decoding_module(pipe) -> nn.Module:
    """What `pipe.decode` runs: its tiny decoder, else its autoencoder's decoder."""
    return pipe.decoder if getattr(pipe, "decoder", None) is not None else pipe.vae.decoder


class Int8WeightOnlyLinear(_Int8Linear):
    """int8 weight widened to the input's float type at each call; float matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


INT8_LINEARS = {"int8-dynamic": Int8DynamicLinear, "int8-weight-only": Int8WeightOnlyLinear}


def _quantizable(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and name.split(".")[-1] not in KEEP_FLOAT


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _store_bf16(model: nn.Module) -> nn.Module:
    """bf16 weights kept bf16 where the CPU computes bf16 natively, else widened back to fp32 (same values)."""
    if use_bf16():
        return model.to(torch.bfloat16)
    logger.warning("this CPU has no native bf16: the bf16 model keeps its bf16-rounded weights but computes in fp32 "
                   "(emulated bf16 would be some hundred times slower)")
    return model.float()


def quantization_mode(model: nn.Module) -> str | None:
    """The mode a denoiser was quantized with by `quantize`, or None."""
    return getattr(model, "quantization", None)


def quantize(pipe_or_transformer, mode: str = "int8-dynamic"):
    """Quantize the denoiser in place (a pipeline's `transformer`, or a VideoDiT itself); returns its argument.

    Only `nn.Linear` layers become int8 (all but `KEEP_FLOAT`): they hold nearly all of the DiT's weights
    and FLOPs; attention's softmax, the norms and the patch-embedding convolution stay float. Given a pipeline,
    ``int8-dynamic`` also makes its frame decoder's wide convolutions int8 (`quantize_decoder`).
    """
    check_mode(mode)
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(transformer, nn.Module):
        raise ConfigError(f"expected a pipeline or a torch module, got {type(pipe_or_transformer).__name__}")
    if quantization_mode(transformer):
        raise ConfigError(f"the denoiser is already quantized ({quantization_mode(transformer)}); start from the float model")
    with torch.no_grad():
        if mode == "bf16":
            for p in transformer.parameters():
                p.data = p.data.to(torch.bfloat16)  # the rounding is the model: fp32 storage below keeps these values
            _store_bf16(transformer)
        else:
            transformer.float()
            linears = [(n, m) for n, m in transformer.named_modules() if _quantizable(n, m)]
            for name, linear in linears:
                q, scale = int8_weight(linear.weight)
                _replace(transformer, name, INT8_LINEARS[mode](q, scale, linear.bias))
            fuse_gelu(transformer)
    transformer.quantization = mode
    transformer.eval()
    if mode == "int8-dynamic" and transformer is not pipe_or_transformer:
        quantize_decoder(decoding_module(pipe_or_transformer))
    return pipe_or_transformer


def quantized_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """What `save_quantized` writes: int8 weights and fp32 scales for the int8 layers, float tensors otherwise
    (bf16 for the bf16 mode), all contiguous and unshared as safetensors requires."""
    mode = quantization_mode(transformer)
    if mode is None:
        raise ConfigError("the denoiser is not quantized; call quantize(pipe, mode) first")
    state = transformer.state_dict()
    if mode == "bf16":
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def weights_bytes(transformer: nn.Module) -> int:
    """Size of the denoiser's weights as stored: int8 layers at one byte per weight plus their scales."""
    state = quantized_state_dict(transformer) if quantization_mode(transformer) else transformer.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values())


def save_quantized(pipe, out: str | os.PathLike) -> Path:
    """Write a complete model directory: `pipe`'s source directory with the quantized denoiser in it."""
    from ..files import atomic_directory
    from ..pipeline import model_version

    mode = quantization_mode(pipe.transformer)
    if mode is None:
        raise ConfigError("the pipeline's denoiser is not quantized; call quantize(pipe, mode) first")
    if pipe.path is None:
        raise ConfigError("this pipeline was not loaded from a model directory; save it with save_bundle first, "
                          "then quantize the saved directory")
    source, out = Path(pipe.path), Path(out)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out must differ from the source model directory {source}")
    index = dict(pipe.index)
    index["quantized_from"] = {"name": index.get("name", source.name), "version": model_version(source, pipe.index)}
    index.update(quantization=mode, version=f"{index['quantized_from']['version']}-{mode}")
    with atomic_directory(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("transformer"))
        pipe.transformer.save_config(tmp / "transformer")
        save_file(quantized_state_dict(pipe.transformer), tmp / "transformer" / WEIGHTS_FILE,
                  metadata={"format": FILE_FORMAT, "quantization": mode})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _empty_transformer(directory: Path, mode: str, names: list[str]):
    """A VideoDiT of the saved config whose layers `names` are int8 modules of the right shape (values unset)."""
    from ..models.transformer import VideoDiT

    model = VideoDiT.from_config(VideoDiT.load_config(directory))
    if mode == "bf16":
        return model
    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise ModelLoadError(f"{directory / WEIGHTS_FILE} quantizes {name!r}, which is not a linear layer of this model")
        q = torch.zeros(linear.out_features, linear.in_features, dtype=torch.int8)
        _replace(model, name, INT8_LINEARS[mode](q, torch.ones(linear.out_features), linear.bias))
    return fuse_gelu(model)


def load_quantized_transformer(directory: str | os.PathLike, mode: str):
    """The quantized denoiser saved by `save_quantized` in `<model>/transformer`."""
    directory = Path(directory)
    if mode not in MODES:
        raise ModelLoadError(f"{directory.parent / 'model_index.json'} names an unknown quantization {mode!r} "
                             f"(known: {', '.join(MODES)})")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"quantized model without its weights: {weights} is missing")
    try:
        with safe_open(weights, framework="pt") as f:
            saved_mode = (f.metadata() or {}).get("quantization")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read {weights}: {e}") from None
    if saved_mode != mode:
        raise ModelLoadError(f"{weights} holds a {saved_mode!r} model but model_index.json says {mode!r}")
    names = sorted(k.removesuffix(".weight_int8") for k in state if k.endswith(".weight_int8"))
    try:
        model = _empty_transformer(directory, mode, names)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except (RuntimeError, ValueError, OSError) as e:  # load_state_dict's key/shape mismatches, a bad config.json
        raise ModelLoadError(f"cannot load the quantized denoiser from {directory}: {str(e).splitlines()[0]}") from None
    if mode == "bf16":
        _store_bf16(model)
    model.quantization = mode
    return model.eval()


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def quantize_model(model: str | os.PathLike | None, out: str | os.PathLike, mode: str = "int8-dynamic") -> dict:
    """Load a model directory (or bundled name), quantize its denoiser and save a new model directory.

    Returns the sizes on disk of the denoiser and of the whole directory, before and after.
    """
    from ..pipeline import VideoPipeline, resolve_model_path

    check_mode(mode)
    source = resolve_model_path(model)
    pipe = quantize(VideoPipeline.from_pretrained(source), mode)
    out = save_quantized(pipe, out)
    return {"mode": mode, "source": str(source), "out": str(out),
            "denoiser_bytes": {"before": directory_bytes(source / "transformer"), "after": directory_bytes(out / "transformer")},
            "model_bytes": {"before": directory_bytes(source), "after": directory_bytes(out)}}


def format_report(report: dict) -> str:
    """One line per size for the CLI."""
    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB"

    lines = [f"quantized {report['source']} ({report['mode']}) -> {report['out']}"]
    for label, key in (("denoiser", "denoiser_bytes"), ("model directory", "model_bytes")):
        before, after = report[key]["before"], report[key]["after"]
        lines.append(f"{label}: {mb(before)} -> {mb(after)} ({before / max(after, 1):.1f}x smaller)")
    return "\n".join(lines)
