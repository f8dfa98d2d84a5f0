"""A small frame decoder that stands in for a model's autoencoder decoder (compress/distill.py).

diffusers' `DecoderTiny` (the TAESD design: plain 3×3 convolutions, ReLU, nearest upsampling) wrapped as a
`ModelMixin`, so it saves and loads in diffusers' directory format. It reads the same unscaled latents as
the `AutoencoderKL` decoder it replaces (`decode(z).sample`, frames in [-1, 1]), so a pipeline can swap one
for the other. There is no encoder: encoding stays with the autoencoder.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DecoderTiny
from diffusers.models.modeling_utils import ModelMixin


class TinyDecoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, latent_channels: int = 4, out_channels: int = 3, width: int = 32,
                 num_blocks: tuple[int, ...] = (2, 1, 0), scaling_factor: float = 1.0):
        super().__init__()
        # DecoderTiny upsamples 2x between its stages: len(num_blocks) - 1 times, as the autoencoder downsampled
        self.decoder = DecoderTiny(latent_channels, out_channels, tuple(num_blocks), (width,) * len(num_blocks),
                                   upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest")

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
