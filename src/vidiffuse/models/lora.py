"""LoRA adapters on disk and at generation time: diffusers' file format, stacking, exact unloading.

A LoRA directory holds one `pytorch_lora_weights.safetensors`, laid out as diffusers' pipelines write it
(`save_lora_weights`) and read it (`load_lora_weights`): peft's key names under one prefix per component,

    transformer.blocks.0.attn.q.lora_A.weight, transformer.blocks.0.attn.q.lora_B.weight, ...
    vae.decoder.conv_out.lora_A.weight, ...            (only when the adapter also changes the autoencoder)

and in the safetensors header diffusers' `lora_adapter_metadata` (each component's peft `LoraConfig`,
keys prefixed the same way) plus `vidiffuse`: the base model's name and version, the training data
manifest's hash and the training settings. A diffusers Wan LoRA made here loads with
`WanPipeline.load_lora_weights(dir)`; one made elsewhere loads here (without a recorded base: a warning).

Loading never merges weights into the base: each adapter sits beside the layers it changes (peft), so
several stack with their own scales and `unload_loras` gives back the exact base weights.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from ..files import atomic_directory, sha256_file

logger = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
VIDIFFUSE_METADATA_KEY = "vidiffuse"
COMPONENTS = ("transformer", "vae")  # the pipeline parts an adapter may change, by key prefix

# The layers (module-name suffixes, peft's `target_modules`) an adapter attaches to, per model class:
# attention and MLP projections, the adaLN modulation and the pooled-prompt path (which carries colour and
# background, see models/transformer.py) for the DiT; every convolution of the per-frame autoencoder;
# attention and feed-forward projections for Wan.
DEFAULT_TARGETS = {
    "VideoDiT": ["q", "kv", "out", "mlp.0", "mlp.2", "ada", "pooled_embed.0", "pooled_embed.2"],
    "AutoencoderKL": ["conv_in", "conv1", "conv2", "conv", "conv_shortcut", "conv_out", "quant_conv",
                      "post_quant_conv"],
    "WanTransformer3DModel": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
}


def lora_config(model: torch.nn.Module, rank: int = 16, alpha: float | None = None,
                targets: list[str] | None = None, dropout: float = 0.0):
    """peft's `LoraConfig` for `model`: rank, scale alpha/rank (alpha defaults to the rank), target layers."""
    from peft import LoraConfig

    name = type(model).__name__
    targets = targets or DEFAULT_TARGETS.get(name)
    if not targets:
        raise ConfigError(f"no default LoRA target layers for {name}; list them in [lora] targets")
    if int(rank) < 1:
        raise ConfigError(f"LoRA rank must be at least 1, got {rank}")
    found = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    matched = [t for t in targets if t in found or any(n.endswith("." + t) for n in found)]
    if not matched:
        raise ConfigError(f"none of the LoRA targets {targets} names a layer of {name}")
    # "gaussian" leaves lora_B at zero: the adapted model starts exactly at the base model
    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), target_modules=list(targets),
                      lora_dropout=float(dropout), init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Attach a fresh adapter for training; freezes the base weights and returns the adapter's parameters."""
    _check_peft_model(model)
    model.requires_grad_(False)
    model.add_adapter(config, adapter_name=adapter_name)
    params = [p for n, p in model.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _check_peft_model(model) -> None:
    if not hasattr(model, "load_lora_adapter"):
        raise ModelLoadError(f"{type(model).__name__} takes no LoRA adapters (it is not a diffusers PeftAdapterMixin model)")


# ---------------------------------------------------------------- the file


@dataclass
class LoraFile:
    """A LoRA read from disk: tensors by full key, each component's peft config, vidiffuse's record."""

    path: Path
    tensors: dict[str, torch.Tensor]
    configs: dict[str, dict] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted({k.split(".", 1)[0] for k in self.tensors})

    def part(self, component: str) -> tuple[dict[str, torch.Tensor], dict | None]:
        """One component's tensors and packed diffusers metadata, both with their `component.` prefix."""
        tensors = {k: v for k, v in self.tensors.items() if k.startswith(component + ".")}
        config = self.configs.get(component)
        packed = {f"{component}.{k}": v for k, v in config.items()} if config else None
        return tensors, packed

    @property
    def digest(self) -> str:
        """SHA-256 of the weights file: names this adapter in model versions and manifests."""
        return sha256_file(self.path)

    @property
    def name(self) -> str:
        return self.path.parent.name if self.path.name == WEIGHT_NAME else self.path.stem


def component_state(model: torch.nn.Module, component: str, adapter_name: str = "default") -> tuple[dict, dict]:
    """(tensors, peft config) of one trained adapter, keys prefixed by `component`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    config = model.peft_config[adapter_name].to_dict()
    return ({f"{component}.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()},
            {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()})


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def write_lora(out: str | os.PathLike, tensors: Mapping[str, torch.Tensor], configs: Mapping[str, dict], info: dict,
               files: Mapping[str, str] | None = None) -> Path:
    """Write a LoRA directory atomically: the weights file, plus `files` (name → text, e.g. a README)."""
    from safetensors.torch import save_file

    unknown = sorted({k.split(".", 1)[0] for k in tensors} - set(COMPONENTS))
    if unknown:
        raise ConfigError(f"LoRA components {unknown} unknown; vidiffuse writes {', '.join(COMPONENTS)}")
    packed = {f"{c}.{k}": v for c, config in configs.items() for k, v in _jsonable(config).items()}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
                VIDIFFUSE_METADATA_KEY: json.dumps(_jsonable(info), sort_keys=True)}
    out = Path(out)
    with atomic_directory(out) as tmp:
        save_file(dict(tensors), tmp / WEIGHT_NAME, metadata=metadata)
        for name, text in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return out


def read_lora(path: str | os.PathLike) -> LoraFile:
    """A LoRA directory (or its .safetensors file); ModelLoadError when it is missing or not a LoRA."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise ModelLoadError(f"no LoRA at {path} ({WEIGHT_NAME} missing)")
    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read LoRA {file}: {e}") from None
    if not tensors or not any(".lora_A." in k or ".lora_B." in k for k in tensors):
        raise ModelLoadError(f"{file} holds no LoRA weights (no lora_A/lora_B tensors)")
    try:
        packed = json.loads(header.get(DIFFUSERS_METADATA_KEY) or "{}")
        info = json.loads(header.get(VIDIFFUSE_METADATA_KEY) or "{}")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: unreadable LoRA metadata ({e})") from None
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return LoraFile(file, tensors, configs, info)


# ---------------------------------------------------------------- loading into models


def check_base(lora: LoraFile, base_version: str | None, base_name: str | None = None) -> None:
    """Refuse a LoRA trained on another base model; warn when the LoRA does not say which it was made for.

    Refused rather than warned: a LoRA is a low-rank *difference* from particular weights; on other weights
    (another training run of the same architecture) it adds a change nobody trained or evaluated, and the
    videos would still be signed as that model's.
    """
    base = lora.info.get("base_model") or {}
    made_for = base.get("version")
    if made_for is None:
        logger.warning("LoRA %s records no base model version; assuming it fits %s", lora.path, base_name or "this model")
        return
    if base_version is not None and made_for != base_version:
        raise ModelLoadError(f"LoRA {lora.path.parent if lora.path.name == WEIGHT_NAME else lora.path} was trained on "
                             f"{base.get('name', '?')}@{made_for}, not on this model ({base_name or '?'}@{base_version})")


def load_into(module: torch.nn.Module, lora: LoraFile, component: str, adapter_name: str) -> None:
    """Attach `component`'s part of `lora` to `module` as adapter `adapter_name` (active at scale 1)."""
    _check_peft_model(module)
    tensors, packed = lora.part(component)
    if not tensors:
        raise ModelLoadError(f"LoRA {lora.path} has no '{component}' weights")
    if adapter_name in getattr(module, "peft_config", {}):
        raise ConfigError(f"an adapter named {adapter_name!r} is already loaded")
    try:
        with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            module.load_lora_adapter(tensors, prefix=component, adapter_name=adapter_name, metadata=packed)
    except (ValueError, RuntimeError, KeyError) as e:  # shape mismatches, unknown layers
        raise ModelLoadError(f"LoRA {lora.path} does not fit this model's {component}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None
    # diffusers only warns about weights it could not place; a half-applied adapter is worse than none
    names = {n for n, _ in module.named_parameters()}
    missing = [k for k in tensors if _adapter_param(k.removeprefix(component + "."), adapter_name) not in names]
    if missing:
        module.delete_adapters(adapter_name)
        raise ModelLoadError(f"LoRA {lora.path}: {len(missing)} weights name no layer of this model's {component} "
                             f"(e.g. {missing[0]})")


def _adapter_param(key: str, adapter_name: str) -> str:
    """'blocks.0.attn.q.lora_A.weight' → the parameter peft makes of it: 'blocks.0.attn.q.lora_A.<name>.weight'."""
    layer, _, rest = key.partition(".lora_")
    which, _, leaf = rest.partition(".")
    return f"{layer}.lora_{which}.{adapter_name}.{leaf}"


def set_scales(module: torch.nn.Module, scales: Mapping[str, float]) -> None:
    """Activate exactly these adapters of `module`, each at its scale (0 turns one off)."""
    if not scales:
        return
    module.set_adapters(list(scales), [float(s) for s in scales.values()])


def unload(module: torch.nn.Module) -> None:
    """Remove every adapter: the module computes with its exact base weights again."""
    if getattr(module, "peft_config", None):
        module.unload_lora()


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'DIR' or 'DIR:SCALE' (as given to --lora) → (DIR, SCALE)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):  # leave "C:\..." alone
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0
