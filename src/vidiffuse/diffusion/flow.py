"""Flow matching (rectified flow), the training side.

x_t = (1 - t) * x_0 + t * noise, and the network predicts the velocity v = noise - x_0, the
convention of SD3 and of diffusers' FlowMatchEulerDiscreteScheduler (timestep = 1000 * t).
"""

from __future__ import annotations

import torch


def sample_t(batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal noise levels (SD3), optionally shifted toward high noise."""
    t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def flow_matching_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
    """Mean squared error between predicted and true velocity, per sample (B,)."""
    xt = interpolate(x0, noise, t)
    pred = model(xt, t * 1000, **cond).sample
    return (pred.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
