import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def vidiffuse_home(tmp_path_factory, monkeypatch):
    """Certificates, jobs and registry state go to a per-session folder, never the user's ~/.vidiffuse."""
    home = tmp_path_factory.getbasetemp() / "vidiffuse-home"
    monkeypatch.setenv("VIDIFFUSE_HOME", str(home))
    return home


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8],
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, mid_block_add_attention=False)


def tiny_transformer():
    from vidiffuse.models.transformer import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(hidden_size=32, depth=2, num_heads=2)
    # adaLN-zero starts at an all-zero output; random weights make the test see real computation
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def text_encoder():
    from vidiffuse.text.encoders import load_text_encoder

    return load_text_encoder(max_length=24)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, text_encoder):
    """A complete model directory with random tiny weights, built by the test itself."""
    from vidiffuse.pipeline import save_bundle

    out = tmp_path_factory.mktemp("models") / "tiny"
    save_bundle(out, tiny_transformer(), tiny_vae(), text_encoder, frames=16, size=64,
                defaults={"steps": 3, "guidance": 3.0, "sampler": "euler"})
    return out


@pytest.fixture(scope="session")
def tiny_bundle_with_reader(tmp_path_factory, tiny_bundle):
    """The tiny bundle plus a prompt reader with random weights (it rewrites prompts, however badly)."""
    import shutil

    from vidiffuse.pipeline import READER_DIR
    from vidiffuse.text.reader import PromptReader, shapes_vocabulary

    out = tmp_path_factory.mktemp("models") / "tiny-with-reader"
    shutil.copytree(tiny_bundle, out)
    torch.manual_seed(0)
    PromptReader(shapes_vocabulary(), max_length=32).save_pretrained(out / READER_DIR)
    return out


def disguised_copy(src, dst, crf=28, brightness=0):
    """A copy of a video that is not the same file: decoded, brightness-shifted, encoded again at another quality."""
    import numpy as np

    from vidiffuse.video import frames_to_uint8, read_video, write_video

    frames = frames_to_uint8(read_video(src)[0]).astype(np.int16) + brightness
    write_video(dst, np.clip(frames, 0, 255).astype(np.uint8), crf=crf)


def run_cli(*args, timeout=300, cwd=None):
    """Run the real `vidiffuse` entry point in a fresh process."""
    return subprocess.run([sys.executable, "-m", "vidiffuse.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
