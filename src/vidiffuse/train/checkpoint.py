"""Atomic, pickle-free training checkpoints (safetensors + JSON).

A checkpoint directory holds model.safetensors, ema.safetensors, optimizer.safetensors and
state.json, written with `atomic_directory`: a run killed mid-write leaves the previous checkpoint intact.
Weights are always whole (an FSDP run gathers its shards first); a LoRA run keeps only its adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..files import atomic_directory


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    scalars = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_checkpoint(path: Path, model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                     optimizer_state: dict, state: dict) -> None:
    """Write full state dicts (a LoRA run passes only its adapter's weights)."""
    with atomic_directory(path) as tmp:
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ema_state.items()}, tmp / "ema.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(model state, EMA state, optimizer state in torch.optim form, the rest of state.json)."""
    path = Path(path)
    if not (path / "state.json").exists():
        old = path.with_name(path.name + ".old")  # killed between the two renames
        path = old if (old / "state.json").exists() else path
    state = json.loads((path / "state.json").read_text())
    optimizer = _optimizer_dict(load_file(path / "optimizer.safetensors"), state.pop("optimizer"))
    return load_file(path / "model.safetensors"), load_file(path / "ema.safetensors"), optimizer, state


def save_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> None:
    write_checkpoint(path, model.state_dict(), ema.state_dict(), optimizer.state_dict(), state)


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model_state, ema_state, optimizer_state, state = read_checkpoint(path)
    model.load_state_dict(model_state)
    ema.load_state_dict(ema_state)
    optimizer.load_state_dict(optimizer_state)
    return state


def has_checkpoint(path: Path) -> bool:
    path = Path(path)
    return (path / "state.json").exists() or (path.with_name(path.name + ".old") / "state.json").exists()


def resume_step(path: Path, model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                resume: bool, what: str, where) -> int:
    """The step to start from: 0 without a checkpoint at `path`; with one, its step after loading it into
    `model`, `ema` and `optimizer`, or, unless `resume`, a ConfigError naming the `what` checkpoint in `where`."""
    if not has_checkpoint(path):
        return 0
    if not resume:
        raise ConfigError(f"{where} already holds a {what} checkpoint; pass --resume to continue it "
                          "or choose another work folder")
    return int(load_checkpoint(path, model, ema, optimizer)["step"])
