"""Sampling: diffusers' schedulers driving the denoiser, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..errors import ConfigError

SAMPLERS = ("euler", "unipc", "dpm++")


def make_scheduler(name: str, shift: float = 1.0):
    """A flow-matching scheduler by name; `shift` > 1 spends more steps at high noise."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if name == "unipc":
        return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                           flow_shift=shift, algorithm_type="dpmsolver++")
    raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def set_steps(scheduler, steps: int) -> None:
    """Give `scheduler` its `steps` noise levels. Flow-match Euler gets an even grid from 1 down to 1/steps, as
    diffusers' FluxPipeline gives it: its own grid ends at 1/1000, so with 2 steps the second would barely
    move, and a few-step (distilled) model needs every step to count."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    else:
        scheduler.set_timesteps(steps)


@torch.no_grad()
def sample(
    model,
    noise: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor] | None,
    scheduler,
    steps: int,
    guidance: float = 1.0,
    callback: Callable[[int, int], None] | None = None,
    first_frame: torch.Tensor | None = None,
    first_given: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise (t=1) to data (t=0). `cond`/`uncond` hold the denoiser's inputs.

    Image-to-video: where `first_given` (B,) is True, frame 0 is held at the clean latent `first_frame`
    (B, c, h, w) through every step, as the model saw it in training (`hold_first_frame`)."""
    set_steps(scheduler, steps)
    x = hold_first_frame(noise, first_frame, first_given)
    use_cfg = uncond is not None and guidance != 1.0
    if use_cfg:
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    for i, t in enumerate(scheduler.timesteps):
        if use_cfg:
            v_uncond, v_cond = model(torch.cat([x, x]), t.expand(2 * x.shape[0]).to(x.device, x.dtype), **both).sample.float().chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        else:
            v = model(x, t.expand(x.shape[0]).to(x.device, x.dtype), **cond).sample.float()
        x = hold_first_frame(scheduler.step(v, t, x).prev_sample, first_frame, first_given)
        if callback is not None:
            callback(i + 1, steps)
    return x


def hold_first_frame(x: torch.Tensor, first_frame: torch.Tensor | None, given: torch.Tensor | None) -> torch.Tensor:
    """`x` (B, c, T, h, w) with frame 0 replaced by the clean latent `first_frame` where `given`."""
    if first_frame is None:
        return x
    x = x.clone()
    x[given, :, 0] = first_frame[given].to(x.dtype)
    return x
