"""Processes, devices and sharding for `vidiffuse train`.

The same config runs as one process on the CPU, or under torchrun as N processes on one or several
machines (`torchrun --nnodes ... --nproc_per_node N -m vidiffuse.cli train --config F`):

- `[run] device = "auto"`: each process takes the GPU of its LOCAL_RANK when there are GPUs (NCCL), else
  the CPU (gloo);
- `[run] strategy = "ddp"` (default): every process holds the whole model and gradients are averaged;
  `"fsdp"`: parameters, gradients and optimizer state are sharded across the processes (PyTorch FSDP2,
  `fully_shard`), each block separately, for models that do not fit one device.

The global batch (`batch_size`) is the same whatever the layout: each of N processes takes every N-th
example of it, in `grad_accum` micro-batches, so losses and weights match a single process's to float
tolerance (tests/test_train_scale.py). Checkpoints hold full (unsharded) weights, written by rank 0; on
several machines `out_dir` must be on a filesystem they share, as every process reads it on --resume.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Layout:
    rank: int
    world: int
    device: torch.device
    strategy: str  # "single", "ddp" or "fsdp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"


def check_run(run: dict, where: str) -> None:
    if run["strategy"] not in STRATEGIES:
        raise ConfigError(f"{where}: [run] strategy must be one of {', '.join(STRATEGIES)}, got {run['strategy']!r}")
    if run["device"] not in DEVICES:
        raise ConfigError(f"{where}: [run] device must be one of {', '.join(DEVICES)}, got {run['device']!r}")
    if int(run["grad_accum"]) < 1:
        raise ConfigError(f"{where}: [run] grad_accum must be at least 1, got {run['grad_accum']}")


def init(run: dict) -> Layout:
    """Join the torchrun process group (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = run["device"] in ("auto", "cuda") and torch.cuda.is_available()
    if run["device"] == "cuda" and not cuda:
        raise ConfigError("[run] device = \"cuda\" but PyTorch sees no CUDA GPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Layout(rank, world, device, run["strategy"] if world > 1 else "single")


def shard(model: torch.nn.Module) -> None:
    """FSDP2: each member of the model's block lists is its own unit (gathered only while it runs), then the rest."""
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def wrap(model: torch.nn.Module, ema: torch.nn.Module, layout: Layout) -> torch.nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded in place
    (the EMA copy is sharded alike, so its update stays local to each shard)."""
    if layout.strategy == "ddp":
        ids = [layout.device.index] if layout.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if layout.sharded:
        shard(model)
        shard(ema)
    return model


def sync_gradients(step_model: torch.nn.Module, model: torch.nn.Module, layout: Layout, sync: bool):
    """Context for one micro-batch's backward: gradients are averaged across processes only on the last one."""
    if layout.strategy == "ddp" and not sync:
        return step_model.no_sync()
    if layout.sharded:
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def mean_over_processes(value: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= layout.world
    return value


def as_float(value) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(module: torch.nn.Module, layout: Layout, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The module's whole state on the CPU (collective under FSDP: every process must call it; only rank 0
    receives the tensors). `names` keeps only those entries (a LoRA run saves its adapter only)."""
    if layout.sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(module, options=_full_options())
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return {k: v for k, v in state.items() if names is None or k in names}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], layout: Layout, partial: bool) -> None:
    """Load a full state (every process passes the whole of it); `partial`: only some entries (a LoRA's)."""
    if layout.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=not partial))
        return
    result = module.load_state_dict(state, strict=not partial)
    if partial and result.unexpected_keys:
        raise ConfigError(f"the checkpoint holds weights this model lacks: {result.unexpected_keys[:3]}")


def trained_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the optimizer steps, in its order (it is built from this same iteration)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout) -> dict:
    """The optimizer's whole state in `torch.optim` form (entries by parameter position), collective under FSDP."""
    if not layout.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not state:  # ranks other than 0
        return {}
    position = {name: i for i, name in enumerate(trained_names(model))}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, layout: Layout) -> None:
    if not layout.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    order = trained_names(model)
    named = {"state": {order[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def barrier(layout: Layout) -> None:
    if layout.world > 1:
        dist.barrier()
