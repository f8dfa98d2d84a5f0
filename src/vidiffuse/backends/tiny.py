"""Tiny random-weight diffusers video pipelines, built offline, for tests and demos of the backends.

Each is the real diffusers pipeline class with every component shrunk (in the manner of diffusers' own
tests' dummy components), except that nothing is downloaded: the T5 tokenizer is built here from a
small vocabulary and the T5 text encoder from a config with random weights. The videos they make are
noise, but they go through exactly the code a real Wan, LTX-Video or CogVideoX directory goes through:

    build_tiny("ltx", "/tmp/tiny-ltx")
    vidiffuse generate "a red circle" --model /tmp/tiny-ltx -o clip.mp4 && vidiffuse verify clip.mp4

Sizes are picked for the watermark, which wants frames of at least 64×64 and about 8 frames or more.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from ..files import atomic_directory

KINDS = ("wan", "wan-i2v", "ltx", "ltx-i2v", "cogvideox", "cogvideox-i2v")
TEXT_DIM = 32  # the tiny T5's width; every tiny transformer's text input takes it
# (frames, fps) per kind: frames are the model's "trained length", one segment of a longer video
FRAMES = {"wan": 9, "ltx": 9, "cogvideox": 9}
SIZE = 64


def tiny_t5_tokenizer():
    """A T5 (SentencePiece-unigram) tokenizer over letters, digits and a few common words; no download."""
    from transformers import T5Tokenizer

    words = ["a", "the", "on", "of", "and", "in", "moving", "red", "blue", "green", "circle", "square", "cat"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0) for w in words]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [(f"▁{c}", -5.5) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(vocab_size: int, umt5: bool = False):
    """A 2-layer T5 (or UMT5, Wan's) encoder, d_model = TEXT_DIM, random weights."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    torch.manual_seed(0)
    return model_cls(config).eval()


def _text(umt5: bool = False) -> dict:
    tokenizer = tiny_t5_tokenizer()
    return {"tokenizer": tokenizer, "text_encoder": tiny_t5_encoder(len(tokenizer), umt5=umt5)}


def _wan(i2v: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36 if i2v else 16,
        out_channels=16, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=4 if i2v else None)
    parts = {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
             **_text(umt5=True)}
    if not i2v:
        return WanPipeline(**parts)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1))
    return WanImageToVideoPipeline(**parts, image_encoder=image_encoder,
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32))


def _ltx(i2v: bool):
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline,
                           LTXPipeline, LTXVideoTransformer3DModel)

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=2, caption_channels=TEXT_DIM)
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    _calm(vae)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=1024,
                                                max_image_seq_len=4096, base_shift=0.95, max_shift=2.05)
    cls = LTXImageToVideoPipeline if i2v else LTXPipeline
    return cls(transformer=transformer, vae=vae, scheduler=scheduler, **_text())


def _cogvideox(i2v: bool):
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)

    torch.manual_seed(0)
    latent = SIZE // 8
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2 if i2v else 4, attention_head_dim=16 if i2v else 8, in_channels=8 if i2v else 4,
        out_channels=4, time_embed_dim=2, text_embed_dim=TEXT_DIM, num_layers=2, sample_width=latent,
        sample_height=latent, sample_frames=FRAMES["cogvideox"], patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=226, use_rotary_positional_embeddings=i2v, use_learned_positional_embeddings=i2v)
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    _calm(vae)
    scheduler = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True)
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    return cls(transformer=transformer, vae=vae, scheduler=scheduler, **_text())


def _calm(vae) -> None:
    """Scale the decoder's last layer down. Random LTX and CogVideoX decoders otherwise put out pure black and
    white noise, where no watermark survives; real videos have mid-tones, and so then do these."""
    with torch.no_grad():
        for p in vae.decoder.conv_out.parameters():
            p.mul_(0.1)


BUILDERS = {"wan": _wan, "ltx": _ltx, "cogvideox": _cogvideox}


def build_tiny_pipeline(kind: str):
    """The diffusers pipeline object for `kind` (one of KINDS), random tiny weights."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; choose one of {', '.join(KINDS)}")
    family, _, task = kind.partition("-")
    return BUILDERS[family](task == "i2v")


def build_tiny(kind: str, out: str | os.PathLike, steps: int = 2) -> Path:
    """Save the tiny `kind` pipeline as a diffusers directory at `out`, with a vidiffuse.json giving the
    size, frames and sampling defaults that suit it (a real model directory needs none)."""
    family = kind.partition("-")[0]
    pipe = build_tiny_pipeline(kind)
    out = Path(out)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp)
        settings = {"name": f"tiny-{kind}", "frames": FRAMES[family], "height": SIZE, "width": SIZE, "fps": 8,
                    "defaults": {"steps": steps}}
        (tmp / "vidiffuse.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out
