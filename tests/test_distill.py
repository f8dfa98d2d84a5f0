import copy
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_transformer
from vidiffuse.compress import distill
from vidiffuse.diffusion.sampling import make_scheduler, sample
from vidiffuse.errors import ConfigError
from vidiffuse.models.tiny_decoder import TinyDecoder
from vidiffuse.pipeline import VideoPipeline
from vidiffuse.precision import autocast

TINY_RUN = {"pairs": 6, "student_steps": 2, "steps": 4, "batch_size": 2, "decoder_steps": 3, "decoder_batch": 8,
            "decoder_student_videos": 2, "eval_prompts": 2, "eval_every": 2, "checkpoint_every": 2}


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_on_the_student_grid_follows_a_straight_path_exactly(steps):
    """What reflow relies on: a denoiser whose velocity is z − x₀ everywhere on the line takes Euler from z to
    x₀ in any number of steps, because the grid (set_steps) runs from 1 to 0 with nothing skipped."""
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(2, 4, 2, 3, 3, generator=g), torch.randn(2, 4, 2, 3, 3, generator=g)
    seen = []

    class Straight(torch.nn.Module):
        def forward(self, x, t, **cond):
            seen.append(float(t[0]) / 1000)
            return type("Out", (), {"sample": z - x0})

    out = sample(Straight(), z, {}, None, make_scheduler("euler"), steps)
    assert torch.allclose(out, x0, atol=1e-5)
    assert seen == pytest.approx(distill.student_grid(steps).tolist(), abs=1e-3)
    assert seen == pytest.approx([1 - k / steps for k in range(steps)], abs=1e-3)


def test_reflow_batch_lies_on_the_line_between_noise_and_the_teachers_sample():
    g = torch.Generator().manual_seed(1)
    pairs = {"x0": torch.randn(5, 4, 2, 3, 3, generator=g), "tokens": torch.randn(5, 3, 8, generator=g),
             "mask": torch.ones(5, 3, dtype=torch.long), "pooled": torch.randn(5, 8, generator=g)}
    noise = torch.randn(5, 4, 2, 3, 3, generator=g)
    inputs, target = distill.reflow_batch(pairs, noise, torch.tensor([1.0, 0.5]), 1.0, 64, torch.Generator().manual_seed(2))
    t = inputs["timestep"] / 1000
    assert set(t.tolist()) <= {1.0, 0.5}  # all on the grid with grid_share 1
    x_t = inputs["hidden_states"]
    # x_t = x0 + t * (z - x0) for the pair each row drew: recover x0 from the target and check it is a real pair
    x0 = x_t - t.view(-1, 1, 1, 1, 1) * target
    assert all(any(torch.allclose(row, p, atol=1e-5) for p in pairs["x0"]) for row in x0)


def _text(batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, 5, 384, generator=g),
            "encoder_attention_mask": torch.ones(batch, 5, dtype=torch.long), "pooled_projections": torch.randn(batch, 384, generator=g)}


def test_distribution_matching_is_zero_where_the_fake_model_agrees_with_the_teacher_and_trains_the_fake():
    torch.manual_seed(0)
    teacher = tiny_transformer().eval().requires_grad_(False)
    student, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    fake_before = [p.detach().clone() for p in fake.parameters()]
    z = torch.randn(2, teacher.config.in_channels, 4, 8, 8)
    x0 = torch.randn_like(z)
    optimizer = torch.optim.SGD(fake.parameters(), lr=0.1)
    loss, parts = distill.distribution_matching_loss(student, teacher, fake, optimizer, z, _text(2, 1), _text(2, 2), x0,
                                                     steps=2, guidance=1.0, regression=0.25,
                                                     gen=torch.Generator().manual_seed(3))
    # at guidance 1 the teacher's x₀ is its conditional one, which the fake (a copy) also predicts: no pull
    assert parts["dmd"] < 1e-8 and parts["fake"] > 0
    x_hat = distill.euler_steps(teacher, z, _text(2, 1), 2)
    assert parts["regression"] == pytest.approx(float((x_hat - x0).pow(2).mean()), rel=1e-4)
    assert float(loss) == pytest.approx(parts["dmd"] + 0.25 * parts["regression"], rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, fake.parameters()))  # one step on x̂
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())

    # with guidance the teacher's x₀ moves away from the fake's, and the pull is no longer zero
    agreeing = copy.deepcopy(teacher).requires_grad_(True)
    _, guided = distill.distribution_matching_loss(student, teacher, agreeing, torch.optim.SGD(agreeing.parameters(), lr=0.0),
                                                   z, _text(2, 1), _text(2, 2), x0, steps=2, guidance=4.0, regression=0.25,
                                                   gen=torch.Generator().manual_seed(3))
    assert guided["dmd"] > 1e-6


def test_pairs_carry_what_the_denoiser_read_when_the_model_rewrites_prompts(tiny_bundle_with_reader, tmp_path):
    pipe = VideoPipeline.from_pretrained(tiny_bundle_with_reader)
    prompts = distill.pair_prompts(3, 0)
    read = pipe.denoiser_prompts(prompts)
    assert read != prompts  # the reader rewrote them
    pairs = distill.teacher_pairs(pipe, 3, 0, tmp_path, print)
    # the student is trained on the embeddings the teacher sampled from, as the pipeline will feed it
    assert torch.equal(pairs["tokens"], pipe.text_encoder.encode(read).tokens.to(torch.bfloat16))


def test_latent_output_is_what_the_video_is_decoded_from(tiny_bundle):
    pipe = VideoPipeline.from_pretrained(tiny_bundle)
    latents = pipe(["a red circle moving left"], seed=3, output_type="latent", progress=False)
    video = pipe(["a red circle moving left"], seed=3, watermark=False, progress=False).videos
    assert latents.shape == (1, 4, 16, 8, 8)  # the tiny autoencoder downsamples 8x
    with autocast():  # as the pipeline decodes
        assert torch.equal(pipe.decode(latents), video)
    with pytest.raises(ConfigError, match="output_type"):
        pipe("x", output_type="pil")


def test_tiny_decoder_reads_the_autoencoders_latents():
    decoder = TinyDecoder(width=8, num_blocks=(1, 1, 0))
    out = decoder.decode(torch.randn(3, 4, 16, 16)).sample
    assert out.shape == (3, 3, 64, 64)


def test_decoder_data_pairs_the_students_latents_with_the_autoencoders_frames(tiny_bundle):
    pipe = VideoPipeline.from_pretrained(tiny_bundle)
    run = distill.check_run(TINY_RUN)
    z, frames = distill.student_decoder_data(pipe, pipe.transformer, run)
    assert z.shape[:2] == (2 * pipe.frames, pipe.vae.config.latent_channels)
    assert frames.shape == (2 * pipe.frames, 3, pipe.size, pipe.size) and frames.dtype == torch.uint8
    with torch.no_grad():
        decoded = pipe.vae.decode(z.float() / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert (frames.float() - (decoded + 1) * 127.5).abs().max() <= 1.0
    # the student's samples at its own settings: a different seed stream gives different latents
    z_other, _ = distill.student_decoder_data(pipe, pipe.transformer, {**run, "seed": 1})
    assert not torch.equal(z, z_other)


def test_distill_writes_a_few_step_model_that_loads_and_resumes(tiny_bundle, tmp_path):
    out, work = tmp_path / "student", tmp_path / "work"
    report = distill.distill_model(tiny_bundle, out, run=TINY_RUN, data={"num_clips": 3}, work_dir=work)
    teacher = VideoPipeline.from_pretrained(tiny_bundle)
    student = VideoPipeline.from_pretrained(out)
    assert student.defaults == {"steps": 2, "guidance": 1.0, "sampler": "euler", "shift": 1.0}
    assert student.index["distilled_from"] == {"name": teacher.name, "version": teacher.version}
    assert isinstance(student.decoder, TinyDecoder) and student.version != teacher.version
    # the student's weights moved away from the teacher's, and the decoder is the one that decodes
    moved = [not torch.equal(a, b.to(a.dtype)) for a, b in zip(teacher.transformer.parameters(),
                                                                 student.transformer.parameters())]
    assert any(moved)
    latents = student(["a blue square"], seed=1, output_type="latent", progress=False)
    z = latents.transpose(1, 2).flatten(0, 1) / student.vae.config.scaling_factor
    with torch.no_grad(), autocast():
        assert torch.equal(student.decode(latents).transpose(1, 2).flatten(0, 1),
                           student.decoder.decode(z.contiguous(memory_format=torch.channels_last)).sample.float().clamp(-1, 1))
    a = student("a blue square moving up", seed=5, progress=False).frames[0]
    b = student("a blue square moving up", seed=5, progress=False).frames[0]
    assert np.array_equal(a, b) and a.shape == (16, 64, 64, 3)
    record = json.loads((out / "training" / distill.RECORD).read_text())
    assert record["teacher"]["steps"] == 3 and record["run"]["pairs"] == 6
    assert record["decoder_last_eval"]["psnr"] > 0 and (out / "training" / distill.STUDENT_LOG).is_file()
    assert report["untrained_student_eval"] is not None and report["student_last_eval"] is not None

    # the pairs are the teacher's own samples at its defaults, for the recorded prompts and seeds
    pairs = distill.teacher_pairs(teacher, 6, 0, work, print)
    again = teacher(distill.pair_prompts(6, 0), seed=distill.pair_seeds(6, 0), output_type="latent", progress=False)
    assert torch.equal(pairs["x0"], again.to(torch.bfloat16))

    # a finished run resumes from its checkpoints without training again; without --resume it is refused
    before = (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    distill.distill_model(tiny_bundle, out, run=TINY_RUN, data={"num_clips": 3}, work_dir=work, resume=True)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match="--resume"):
        distill.distill_model(tiny_bundle, out, run=TINY_RUN, data={"num_clips": 3}, work_dir=work)
    with pytest.raises(ConfigError, match="another teacher or settings"):
        distill.distill_model(tiny_bundle, out, run={**TINY_RUN, "seed": 1}, data={"num_clips": 3}, work_dir=work,
                              resume=True)

    # the bench takes the student only for the model it was distilled from
    parts = distill.distilled_parts_for(teacher, out)
    assert parts[2] == {"steps": 2, "guidance": 1.0, "sampler": "euler"}
    with pytest.raises(ConfigError, match="not a distilled model"):
        distill.distilled_parts_for(teacher, tiny_bundle)
    with pytest.raises(ConfigError, match="already distilled"):
        distill.distill_model(out, tmp_path / "again", run=TINY_RUN, data={"num_clips": 3})


@pytest.mark.parametrize("args, message", [
    (["--student-steps", "8"], "error: the student samples in 1 to 4 steps, got 8"),
    (["--pairs", "0"], "error: pairs must be at least 1, got 0"),
    (["--clips", "1"], "error: --clips must be at least 2 (the last eighth is held out to score the decoder), got 1"),
])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, args, message):
    result = run_cli("distill", "shapes", "--out", tmp_path / "d", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "d").exists()
