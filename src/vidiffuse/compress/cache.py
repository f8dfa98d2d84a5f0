"""Step caching: First Block Cache on VideoDiT, through diffusers' own hooks.

At each sampling step the first DiT block runs; when its residual (output − input) changed by less than
`threshold` (relative L1: mean|r − r_cached| / mean|r_cached|) since the last fully computed step, the
other blocks are skipped and the residual they added at that step (last block's output − first block's
output) is added again. Otherwise every block runs and the cache is refreshed.

    with step_cache(pipe.transformer, threshold=0.1) as stats:
        pipe(prompts, seed=seeds)
    stats.cached_steps, stats.skipped_block_steps

The hooks are `diffusers.hooks.apply_first_block_cache`; this module only
- registers `DiTBlock` in diffusers' block registry (its input is named `x`, and diffusers' first-block
  hooks look the input up by the name `hidden_states`, so the index is given explicitly);
- adds one hook on the denoiser that empties the cache at the start of every sampling run (a new
  `pipe(...)` call or the next batch of one: the timestep goes back up or the batch shape changes) and
  counts full and cached steps;
- removes everything on exit, so the model behaves exactly as before.

The skip decision is one per denoiser call, over the whole batch (uncond and cond rows of classifier-free
guidance together, every video of the batch); each row reuses its own cached residual. A video made
with caching therefore depends on its batch-mates, unlike an uncached one; `batch_size=1` gives
per-video decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, apply_first_block_cache
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from ..errors import ConfigError
from ..models.transformer import DiTBlock

_RUN_HOOK = "vidiffuse_step_cache_run"
_CONTEXT = CacheContext("denoise")  # one state for the whole CFG batch: uncond and cond run as one tensor


@dataclass
class CacheStats:
    """What the cache did, summed over every sampling run inside one `step_cache` block."""

    threshold: float
    depth: int  # blocks in the denoiser
    runs: int = 0  # sampling runs (one per batch of videos)
    full_steps: int = 0  # denoiser calls that ran every block
    cached_steps: int = 0  # denoiser calls that ran only the first block

    @property
    def calls(self) -> int:
        return self.full_steps + self.cached_steps

    @property
    def skipped_block_steps(self) -> int:
        return self.cached_steps * (self.depth - 1)

    @property
    def skipped_share(self) -> float:
        """Share of block evaluations skipped (0 when nothing ran)."""
        return self.skipped_block_steps / (self.calls * self.depth) if self.calls else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "calls": self.calls, "skipped_block_steps": self.skipped_block_steps,
                "skipped_share": self.skipped_share}


def check_threshold(threshold: float) -> float:
    """The threshold as a float; a ConfigError unless it is a finite number ≥ 0 (0: never skip)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ConfigError(f"cache threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"cache threshold must be a finite number ≥ 0, got {threshold!r}")
    return value


def register_dit_block() -> None:
    """Tell diffusers' hooks where DiTBlock's hidden states are: its first argument, and its whole output."""
    TransformerBlockRegistry.register(
        DiTBlock,
        TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None,
                                 hidden_states_argument_name="x",
                                 _cached_parameter_indices={"hidden_states": 0, "x": 0}),
    )


class _RunBoundaryHook(ModelHook):
    """On the denoiser: starts each sampling run with an empty cache, and counts full and cached steps.

    A sampler's timesteps strictly decrease within a run, so a timestep that does not, or a new batch
    shape, means a new run (a new `pipe(...)` call, or the next batch of the same call).
    """

    def __init__(self, state: StateManager, stats: CacheStats):
        super().__init__()
        self.state, self.stats = state, stats
        self._last_batch: tuple | None = None
        self._last_timestep: float | None = None

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        batch = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if batch != self._last_batch or self._last_timestep is None or t >= self._last_timestep:
            self.state.reset()
            self.state.set_context(_CONTEXT)
            self.stats.runs += 1
        self._last_batch, self._last_timestep = batch, t
        return args, kwargs

    def post_forward(self, module, output):
        if self.state.get_state().should_compute:
            self.stats.full_steps += 1
        else:
            self.stats.cached_steps += 1
        return output


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) < 2:
        raise ConfigError(f"step caching needs a transformer with at least 2 blocks in `.blocks`; "
                          f"{type(model).__name__} has none")
    return blocks


def _hook_names(module: nn.Module) -> set[str]:
    registry = getattr(module, "_diffusers_hook", None)
    return set(registry.hooks) if registry is not None else set()


@contextmanager
def step_cache(transformer: nn.Module, threshold: float) -> Iterator[CacheStats]:
    """First Block Cache on `transformer` inside the block; yields live `CacheStats`.

    A step is cached when the relative change is ≤ `threshold` (diffusers' rule). At 0 that takes a
    first block whose residual is exactly zero (an untrained adaLN-zero block), so a real model never
    skips and its output is bit-identical to no cache; larger values skip more steps.
    """
    threshold = check_threshold(threshold)
    model = unwrap_module(transformer)  # a torch.compile wrapper holds the real blocks
    blocks = _blocks(model)
    hooked = [model, *blocks]
    if any(_hook_names(m) & {_RUN_HOOK, _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK} for m in hooked):
        raise ConfigError("step caching is already on for this transformer")
    untouched = [m for m in hooked if "forward" not in vars(m) and not hasattr(m, "_diffusers_hook")]
    register_dit_block()
    stats = CacheStats(threshold=threshold, depth=len(blocks))
    registry = HookRegistry.check_if_exists_or_initialize(model)
    try:
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        state = blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK).state_manager
        registry.register_hook(_RunBoundaryHook(state, stats), _RUN_HOOK)
        yield stats
    finally:
        registry.remove_hook(_RUN_HOOK, recurse=False)
        registry.remove_hook(_FBC_LEADER_BLOCK_HOOK, recurse=True)
        registry.remove_hook(_FBC_BLOCK_HOOK, recurse=True)
        # removing a hook leaves the original bound `forward` and an empty registry on the instance;
        # dropping them makes the model exactly what it was (deepcopy, compile and pickling see no trace)
        for m in untouched:
            vars(m).pop("forward", None)
            del m._diffusers_hook


def maybe_step_cache(transformer: nn.Module, threshold: float | None):
    """`step_cache` when a threshold is given, else a block that changes nothing (and yields None)."""
    return nullcontext() if threshold is None else step_cache(transformer, threshold)
