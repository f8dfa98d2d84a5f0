"""VideoDiT: a diffusion transformer over (latent) video, in diffusers' model format.

Input `(B, C, T, H, W)` is cut into 3-D patches; every token attends to every other token
(joint spatio-temporal attention), then to the prompt's tokens (cross-attention). The timestep and the
pooled prompt embedding modulate every block through adaLN-zero, as in DiT / SD3: the pooled
embedding carries the global attributes (colour, background) from the first step of training, while
cross-attention reads the finer ones from the individual words.

With `image_conditioning`, the model also takes a first frame (image-to-video). The sampler holds frame 0
of the noisy input at the frame's clean latent (as LTX-Video conditions on frames), and the same latent, at
frame 0 of an otherwise zero video, plus a mask channel that is 1 on the given frames, are concatenated to
the input's channels (as Wan 2.1 I2V and CogVideoX I2V do), so the model knows which frame is clean. An
all-zero condition means "no image", so one model does both text-to-video and image-to-video.
`with_image_conditioning` turns a trained text-to-video model into one whose new input channels start at
zero: it computes exactly what it did before until fine-tuning teaches it to read them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def sincos_position_embedding(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3-D sin-cos embedding, (T*H*W, dim): a third of the channels for each axis.

    Fixed rather than learned: position is then known from step one, which matters when the
    training budget is a few thousand steps.
    """
    per_axis = (dim // 6) * 2
    freqs = 1.0 / (10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2)))
    axes = [torch.arange(n, dtype=torch.float64) for n in grid]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    parts = []
    for axis in range(3):
        angles = mesh[:, axis : axis + 1] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1])).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # one fused pass (x * (1 + scale) + shift took three): in eager mode on CPU the DiT's elementwise
    # passes over its activations cost as much as its int8 matmuls
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + gate * update in one pass."""
    return torch.addcmul(x, gate[:, None], update)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dim, with the norm reduced without materializing x². Faster than torch's CPU
    rms_norm for the DiT's heads (16x128x4x64: 0.2-0.3 ms against 0.4-1.9 ms over several runs), and it reads
    a strided tensor (the key half of the key/value projection) without copying it first."""
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square() / x.shape[-1]
    return x * (mean_square + eps).rsqrt().to(x.dtype) * weight.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm without learned scale and shift (adaLN supplies them). It hands the kernel a unit scale
    and a zero shift all the same: torch's CPU layer_norm took twice as long without them (0.26 ms against
    0.12 ms for 2048 x 256). The two are not saved, so the state dict is nn.LayerNorm(elementwise_affine=False)'s."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("unit", torch.ones(dim), persistent=False)
        self.register_buffer("zero", torch.zeros(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.unit.shape, self.unit.to(x.dtype), self.zero.to(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        # head_dim fixed apart from `heads`, so a head-pruned model (fewer heads, same head size) is this class too
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(context_dim or dim, 2 * inner)
        self.out = nn.Linear(inner, dim)
        # QK-norm keeps attention logits bounded; bf16 training is stable without tuning
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        b, n, d = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, n, self.heads, -1)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).unbind(2)
        # normalized before the heads move to dim 1, where the last dim is contiguous
        q = rms_norm(q, self.q_norm.weight, self.q_norm.eps).transpose(1, 2)
        k = rms_norm(k, self.k_norm.weight, self.k_norm.eps).transpose(1, 2)
        v = v.transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: float, head_dim: int | None = None,
                 mlp_hidden_size: int | None = None):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads, context_dim, head_dim=head_dim)
        self.norm3 = LayerNorm(dim)
        hidden = mlp_hidden_size or int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, context, context_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = gated_residual(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1)))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        x = gated_residual(x, gate2, self.mlp(modulate(self.norm3(x), shift2, scale2)))
        return x


class VideoDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned video diffusion transformer predicting the flow-matching velocity.

    PeftAdapterMixin gives it diffusers' LoRA methods (`add_adapter`, `load_lora_adapter`, `set_adapters`,
    `unload_lora`), which `models/lora.py` and `train/lora.py` build on.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: tuple[int, int, int] = (2, 2, 2),
        hidden_size: int = 256,
        depth: int = 8,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        text_dim: int = 384,
        sample_frames: int = 16,
        sample_size: int = 8,
        attention_head_dim: int | None = None,  # None: hidden_size // num_heads; set by pruning (compress/prune.py)
        mlp_hidden_size: int | None = None,  # None: hidden_size * mlp_ratio; set by pruning
        image_conditioning: bool = False,  # also reads a first frame: in_channels + 1 more input channels
    ):
        super().__init__()
        self.out_channels = out_channels or in_channels
        self.patch_embed = nn.Conv3d(self.input_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.pooled_embed = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.context_norm = nn.LayerNorm(text_dim)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, text_dim, mlp_ratio, attention_head_dim, mlp_hidden_size)
                                    for _ in range(depth))
        self.norm_out = LayerNorm(hidden_size)
        self.ada_out = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, math.prod(patch_size) * self.out_channels)
        self.gradient_checkpointing = False
        self._init_weights()

    @property
    def input_channels(self) -> int:
        """Channels the patch embedding reads: the noisy latents, then (image-to-video) the condition."""
        n = self.config.in_channels
        return 2 * n + 1 if self.config.image_conditioning else n

    @classmethod
    def with_image_conditioning(cls, model: "VideoDiT") -> "VideoDiT":
        """A copy of text-to-video `model` that also takes a first frame; its new input weights are zero."""
        if model.config.image_conditioning:
            raise ValueError("the model already takes a first frame")
        config = {k: v for k, v in model.config.items() if not k.startswith("_")}  # _use_default_values would undo it
        new = cls.from_config({**config, "image_conditioning": True})
        state = model.state_dict()
        weight = state["patch_embed.weight"]
        state["patch_embed.weight"] = torch.cat(
            [weight, weight.new_zeros(weight.shape[0], new.input_channels - weight.shape[1], *weight.shape[2:])], dim=1)
        new.load_state_dict(state)
        return new

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-zero: every block starts as the identity, and the output starts at zero
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
            nn.init.zeros_(block.cross_attn.out.weight)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.proj_out.weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """`condition` (B, in_channels + 1, T, H, W), for a model with `image_conditioning`: see
        `first_frame_condition`; None is the all-zero condition (text only)."""
        b, _, t, h, w = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        if self.config.image_conditioning:
            if condition is None:
                condition = hidden_states.new_zeros(b, self.input_channels - hidden_states.shape[1], t, h, w)
            hidden_states = torch.cat([hidden_states, condition.to(hidden_states.dtype)], dim=1)
        elif condition is not None:
            raise ValueError("this model takes no first frame (image_conditioning is off)")
        x = self.patch_embed(hidden_states)
        grid = x.shape[2:]
        # contiguous once here: elementwise ops keep their input's strides, so a transposed view would carry
        # through the residual stream and every norm and linear layer would copy it first
        x = x.flatten(2).transpose(1, 2).contiguous()
        x = x + sincos_position_embedding(x.shape[-1], tuple(grid)).to(x)
        timestep = timestep.expand(b) if timestep.ndim == 0 or timestep.shape[0] == 1 else timestep
        c = self.time_embed(self.time_proj(timestep).to(x.dtype)) + self.pooled_embed(pooled_projections.to(x.dtype))
        context = self.context_norm(encoder_hidden_states.to(x.dtype))
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, context, mask, use_reentrant=False)
            else:
                x = block(x, c, context, mask)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))
        gt, gh, gw = grid
        x = x.view(b, gt, gh, gw, pt, ph, pw, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, gt * pt, gh * ph, gw * pw)
        if not return_dict:
            return (x,)
        return Transformer2DModelOutput(sample=x)


def first_frame_condition(first: torch.Tensor, frames: int, given: torch.Tensor | None = None) -> torch.Tensor:
    """The image-to-video condition for latent videos of `frames` frames: the first frame's latent `first`
    (B, c, h, w) at frame 0 and zeros after it, plus a mask channel that is 1 on frame 0. Rows where `given`
    is False get the all-zero condition (no image: text to video)."""
    b, c, h, w = first.shape
    condition = first.new_zeros(b, c + 1, frames, h, w)
    condition[:, :c, 0] = first
    condition[:, c, 0] = 1.0
    if given is not None:
        condition[~given.to(condition.device)] = 0.0
    return condition
