import contextlib
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, tiny_transformer
from vidiffuse.compress.compile import compile_transformer, is_compiled
from vidiffuse.compress import quantize as quantize_module
from vidiffuse.compress.quantize import (MODES, WEIGHTS_FILE, Int8DynamicConv2d, Int8DynamicLinear, Int8WeightOnlyLinear,
                                         directory_bytes, int8_engine, int8_weight, quantize, quantize_decoder,
                                         quantized_state_dict, save_quantized, weights_bytes)
from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.pipeline import VideoPipeline
from vidiffuse.precision import autocast

PROMPTS = ["a large red circle moving left on a black background", "small blue square sliding up over white"]
SEEDS = [3, 4]


def denoiser_inputs(model, batch=4):
    """Real text embeddings (random ones are out of distribution and exaggerate activation-quantization error)."""
    from vidiffuse.text.encoders import load_text_encoder

    emb = load_text_encoder(max_length=24).encode((PROMPTS * batch)[:batch])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.config.in_channels, 16, 8, 8, generator=g)
    return x, torch.linspace(0.1, 0.9, batch) * 1000, emb.tokens, emb.pooled, emb.mask


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def generate(pipe) -> torch.Tensor:
    return pipe(PROMPTS, seed=SEEDS, steps=2, progress=False, watermark=False).videos


@pytest.fixture(scope="module")
def fp32_model():
    return tiny_transformer().eval()


def test_int8_weight_is_symmetric_per_channel_and_reconstructs():
    w = torch.randn(48, 32) * torch.logspace(-3, 1, 48)[:, None]  # rows spanning four decades need their own scales
    w[5] = 0
    q, scale = int8_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (48,)
    assert torch.equal(q[5], torch.zeros(32, dtype=torch.int8))
    # round to nearest: each weight is off by at most half a step of its own row
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1)[torch.arange(48) != 5] == 127).all()


# Relative output error, bounded at ~3x what this tiny model shows (0.9%, 0.15%, 0.23%). Where it comes from:
# a weight rounded to a 255-level per-channel grid or to bf16's 8-bit mantissa is off by ~0.2% (weight-only,
# bf16); 7-bit dynamic activations with one scale per tensor add most of int8-dynamic's error (1.2% at the
# output of the bundled 8-block model, which then changes 0-2 of 40 attribute readings on 8 golden prompts).
@pytest.mark.parametrize("mode, bound", [("int8-dynamic", 0.03), ("int8-weight-only", 0.005), ("bf16", 0.008)])
def test_quantized_denoiser_is_close_to_fp32(fp32_model, mode, bound):
    inputs = denoiser_inputs(fp32_model)
    quantized = quantize(copy.deepcopy(fp32_model), mode)
    with torch.no_grad():
        ref = fp32_model(*inputs).sample
        # bf16 weights stay bf16 where the CPU has native bf16: run them as the pipeline does, under autocast
        with autocast() if mode == "bf16" else contextlib.nullcontext():
            out = quantized(*inputs).sample.float()
    error = relative_error(out, ref)
    assert 0 < error < bound, error  # 0 would mean nothing was quantized


def test_int8_replaces_linear_layers_but_keeps_the_output_projection_float(fp32_model):
    quantized = quantize(copy.deepcopy(fp32_model), "int8-dynamic")
    linears = [n for n, m in fp32_model.named_modules() if isinstance(m, torch.nn.Linear)]
    kinds = {n: type(quantized.get_submodule(n)) for n in linears}
    assert kinds.pop("proj_out") is torch.nn.Linear
    assert set(kinds.values()) == {Int8DynamicLinear}
    # the MLP's GELU moved into its first layer; the state dict (below) does not see it
    mlp = quantized.blocks[0].mlp
    assert mlp[0].gelu == fp32_model.blocks[0].mlp[1].approximate and type(mlp[1]) is torch.nn.Identity
    state = quantized_state_dict(quantized)
    assert state["blocks.0.mlp.0.weight_int8"].dtype == torch.int8
    assert state["blocks.0.mlp.0.weight_scale"].dtype == torch.float32
    assert "blocks.0.mlp.0.weight" not in state
    assert weights_bytes(quantized) < weights_bytes(fp32_model) / 3


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_int8_layer_with_the_gelu_moved_in_computes_the_gelu_of_its_product(approximate):
    torch.manual_seed(0)
    x = torch.randn(3, 70, 64)
    q, scale = int8_weight(torch.randn(96, 64) * 0.1)
    layer = Int8DynamicLinear(q, scale, torch.randn(96) * 0.1)
    product = layer(x)
    layer.gelu = approximate
    fused = layer(x)
    assert fused.shape == (3, 70, 96)
    torch.testing.assert_close(fused, torch.nn.functional.gelu(product, approximate=approximate), atol=2e-5, rtol=1e-4)
    dequantized = torch.nn.functional.linear(x, q.float() * scale[:, None], layer.bias)
    assert relative_error(product, dequantized) < 0.02  # only the activations' 8-bit rounding apart


def test_quantizing_twice_or_with_an_unknown_mode_is_refused(fp32_model):
    with pytest.raises(ConfigError, match="int8-dynamic, int8-weight-only, bf16"):
        quantize(copy.deepcopy(fp32_model), "int4")
    twice = quantize(copy.deepcopy(fp32_model), "int8-weight-only")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(twice, "int8-dynamic")


@pytest.fixture(scope="module")
def fp32_videos(tiny_bundle):
    return generate(VideoPipeline.from_pretrained(tiny_bundle))


@pytest.mark.parametrize("mode", MODES)
def test_saved_model_loads_and_generates_what_the_in_memory_model_does(tiny_bundle, fp32_videos, tmp_path, mode):
    pipe = quantize(VideoPipeline.from_pretrained(tiny_bundle), mode)
    in_memory = generate(pipe)
    out = save_quantized(pipe, tmp_path / "q")

    index = json.loads((out / "model_index.json").read_text())
    assert index["quantization"] == mode and index["version"].endswith(mode)
    assert not (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    with safe_open(out / "transformer" / WEIGHTS_FILE, framework="pt") as f:
        assert f.metadata()["quantization"] == mode

    loaded = VideoPipeline.from_pretrained(out)
    assert torch.equal(generate(loaded), in_memory)
    assert loaded.transformer.quantization == mode
    assert loaded.version == index["version"] != VideoPipeline.from_pretrained(tiny_bundle).version
    # the videos stay close to the float model's (pixels in [-1, 1]; the tiny bundle is stored in bf16 already,
    # so its bf16 copy is exact)
    assert (in_memory - fp32_videos).abs().mean() < 0.01


def test_int8_model_is_smaller_on_disk(tiny_bundle, tmp_path):
    # the tiny bundle's denoiser is stored in bf16 already: int8 must beat that, not just fp32
    for mode in ("int8-dynamic", "int8-weight-only"):
        out = save_quantized(quantize(VideoPipeline.from_pretrained(tiny_bundle), mode), tmp_path / mode)
        assert directory_bytes(out / "transformer") < 0.7 * directory_bytes(tiny_bundle / "transformer")
    out = save_quantized(quantize(VideoPipeline.from_pretrained(tiny_bundle), "bf16"), tmp_path / "bf16")
    with safe_open(out / "transformer" / WEIGHTS_FILE, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_weight_only_layers_hold_int8_in_memory(tiny_bundle, tmp_path):
    out = save_quantized(quantize(VideoPipeline.from_pretrained(tiny_bundle), "int8-weight-only"), tmp_path / "q")
    layer = VideoPipeline.from_pretrained(out).transformer.blocks[0].mlp[0]
    assert isinstance(layer, Int8WeightOnlyLinear) and layer.weight_int8.dtype == torch.int8


def test_corrupt_or_mislabelled_quantized_model_is_a_load_error(tiny_bundle, tmp_path):
    out = save_quantized(quantize(VideoPipeline.from_pretrained(tiny_bundle), "int8-dynamic"), tmp_path / "q")
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())

    index_path.write_text(json.dumps({**index, "quantization": "int8-weight-only"}))
    with pytest.raises(ModelLoadError, match="holds a 'int8-dynamic' model"):
        VideoPipeline.from_pretrained(out)
    index_path.write_text(json.dumps({**index, "quantization": "fp4"}))
    with pytest.raises(ModelLoadError, match="unknown quantization 'fp4'"):
        VideoPipeline.from_pretrained(out)

    index_path.write_text(json.dumps(index))
    weights = out / "transformer" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot read"):
        VideoPipeline.from_pretrained(out)


def test_save_refuses_a_float_model_or_overwriting_its_source(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="not quantized"):
        save_quantized(VideoPipeline.from_pretrained(tiny_bundle), tmp_path / "q")
    with pytest.raises(ConfigError, match="must differ"):
        save_quantized(quantize(VideoPipeline.from_pretrained(tiny_bundle), "bf16"), tiny_bundle)


def test_cli_quantize_writes_a_loadable_model(tiny_bundle, tmp_path):
    out = tmp_path / "int8"
    result = run_cli("quantize", tiny_bundle, "--out", out, "--mode", "int8-weight-only")
    assert result.returncode == 0, result.stderr
    assert "denoiser:" in result.stdout and "x smaller" in result.stdout
    assert VideoPipeline.from_pretrained(out).transformer.quantization == "int8-weight-only"

    bad = run_cli("quantize", tiny_bundle, "--out", tmp_path / "x", "--mode", "int3")
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown quantization mode 'int3'")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


def wide_vae():
    """An autoencoder as wide as the bundled one (64 channels), where the decoder's convolutions go int8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=16,
                         mid_block_add_attention=False).eval()


needs_onednn = pytest.mark.skipif(int8_engine() != "onednn", reason="int8 convolutions need oneDNN (VNNI or AMX)")


@needs_onednn
def test_int8_decoder_quantizes_only_its_wide_convolutions_and_decodes_close_to_fp32():
    vae = wide_vae()
    z = torch.randn(16, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z).sample
    wide = {n for n, m in vae.decoder.named_modules()
            if isinstance(m, torch.nn.Conv2d) and min(m.in_channels, m.out_channels) >= 64}
    assert quantize_decoder(vae.decoder) == len(wide) > 0
    assert {n for n, m in vae.decoder.named_modules() if isinstance(m, Int8DynamicConv2d)} == wide
    assert isinstance(vae.decoder.conv_out, torch.nn.Conv2d)  # 32 -> 3 channels: narrow, stays float
    with torch.no_grad():
        out = vae.decode(z).sample
    # 3.2% for this random decoder, ~2x the int8 denoiser's: 8-bit activations at each of its 9 wide convolutions
    assert 0 < relative_error(out, ref) < 0.08


def test_int8_decoder_stays_float_without_onednn(monkeypatch):
    vae = wide_vae()
    monkeypatch.setattr(quantize_module, "int8_engine", lambda: "x86")
    assert quantize_decoder(vae.decoder) == 0
    assert not any(isinstance(m, Int8DynamicConv2d) for m in vae.modules())


@needs_onednn
def test_saved_int8_model_decodes_with_an_int8_decoder(text_encoder, tmp_path):
    from vidiffuse.pipeline import save_bundle

    source = save_bundle(tmp_path / "wide", tiny_transformer(), wide_vae(), text_encoder, frames=16, size=64,
                         defaults={"steps": 2, "guidance": 3.0, "sampler": "euler"})
    float_pipe = VideoPipeline.from_pretrained(source)
    pipe = quantize(VideoPipeline.from_pretrained(source), "int8-dynamic")
    assert any(isinstance(m, Int8DynamicConv2d) for m in pipe.vae.decoder.modules())
    assert not any(isinstance(m, Int8DynamicConv2d) for m in pipe.vae.encoder.modules())  # image-to-video encodes in float
    in_memory = generate(pipe)
    loaded = VideoPipeline.from_pretrained(save_quantized(pipe, tmp_path / "q"))
    assert any(isinstance(m, Int8DynamicConv2d) for m in loaded.vae.decoder.modules())
    assert torch.equal(generate(loaded), in_memory)
    assert 0 < (in_memory - generate(float_pipe)).abs().mean() < 0.01


def test_compile_transformer_compiles_in_place(fp32_model):
    model = copy.deepcopy(fp32_model)
    assert not is_compiled(model)
    assert compile_transformer(model) is model
    assert is_compiled(model) and model.config.patch_size == fp32_model.config.patch_size
    with pytest.raises(ConfigError):
        compile_transformer("not a model")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("VIDIFFUSE_SLOW_TESTS"), reason="compiling takes 30-60 s on 2 cores; "
                    "set VIDIFFUSE_SLOW_TESTS=1")
def test_compiled_int8_denoiser_matches_eager(fp32_model):
    model = quantize(copy.deepcopy(fp32_model), "int8-dynamic")
    inputs = denoiser_inputs(fp32_model, batch=2)
    with torch.no_grad():
        eager = model(*inputs).sample
        compiled = compile_transformer(model)(*inputs).sample
    assert torch.allclose(compiled, eager, atol=1e-4)
