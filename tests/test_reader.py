"""The prompt reader: trained on the shapes world's captions, labelled with the attributes each states, it reads
prompts in phrasings it never saw, and the pipeline gives the denoiser its plain rewrite."""

import json

import pytest
import torch

from conftest import run_cli
from vidiffuse.data import shapes
from vidiffuse.errors import ConfigError
from vidiffuse.pipeline import WEIGHTS_DIR, VideoPipeline
from vidiffuse.text.reader import PromptReader, shapes_vocabulary
from vidiffuse.train.data import shapes_captions, shapes_specs
from vidiffuse.train.trainer import train

READER_CONFIG = """
[run]
task = "reader"
out_dir = "{out}"
steps = {steps}
batch_size = 64
lr = 3e-3
warmup = 10
ema_decay = 0.9
checkpoint_every = 1000
eval_every = {steps}
eval_clips = 100
log_every = 10
[model]
queries = 4
max_length = 32
[data]
kind = "{kind}"
num_clips = 400
captions_per_clip = 2
seed = 5
caption_version = 2
"""

# phrasings no caption version uses (frames, verbs, word order), and what each asks for; None: left unsaid
UNSEEN = [
    ("I would like a large red circle that keeps heading to the right, black behind it",
     dict(background="black", color="red", shape="circle", size="large", direction="right")),
    ("Please draw a small blue square which goes down the screen; make the backdrop white",
     dict(background="white", color="blue", shape="square", size="small", direction="down")),
    ("gray scene, one big green triangle slowly going up",
     dict(background="gray", color="green", shape="triangle", size="large", direction="up")),
    ("A purple square, small, that never moves. White background please",
     dict(background="white", color="purple", shape="square", size="small", direction="still")),
    ("Can I get an orange circle drifting off to the left on black?",
     dict(background="black", color="orange", shape="circle", size=None, direction="left")),
    ("a yellow triangle", dict(background=None, color="yellow", shape="triangle", size=None, direction=None)),
    ("Animate a large blue circle moving from the top of the frame to the bottom, on gray",
     dict(background="gray", color="blue", shape="circle", size="large", direction="down")),
    ("On white: a small red triangle sliding toward the right edge",
     dict(background="white", color="red", shape="triangle", size="small", direction="right")),
]


def test_plain_caption_names_what_is_said_and_nothing_else():
    said = dict(background="black", color="orange", shape="circle", size="small", direction="left")
    assert shapes.plain_caption(said) == "a small orange circle moving left on a black background"
    assert shapes.plain_caption({**said, "size": None, "background": None, "direction": "still"}) == \
        "an orange circle standing still"
    assert shapes.plain_caption(dict.fromkeys(shapes.ATTRIBUTES)) == "a shape"


def test_captions_come_with_the_attributes_they_state():
    cfg = {"kind": "shapes", "num_clips": 60, "captions_per_clip": 2, "seed": 3, "caption_version": 2}
    captions, stated = shapes_captions(cfg)
    clips = [(spec, caption) for spec, caps in shapes_specs(cfg) for caption in caps]
    assert captions == [caption for _, caption in clips]  # the denoiser's captions, unchanged
    for (spec, _), said in zip(clips, stated):
        assert all(value in (None, spec.attributes()[a]) for a, value in said.items())
    unsaid = sum(value is None for said in stated for value in said.values())
    assert 0.05 < unsaid / (len(stated) * len(shapes.ATTRIBUTES)) < 0.3  # caption_drop_prob 0.15


def test_reader_task_trains_exports_and_reads(tmp_path):
    config = tmp_path / "reader.toml"
    config.write_text(READER_CONFIG.format(out=tmp_path / "run", steps=150, kind="shapes"))
    reader = PromptReader.from_pretrained(train(config))
    assert reader.config.attributes == shapes_vocabulary() and reader.config.max_length == 32
    evaluations = [json.loads(line)["eval"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                   if '"eval"' in line]
    # captions of clips it never saw, in the training phrasings; chance is 1/3 to 1/6 with the "unsaid" class
    assert all(evaluations[-1][f"acc_{a}"] >= 0.85 for a in shapes.ATTRIBUTES), evaluations[-1]


def test_reader_task_refuses_data_without_stated_attributes(tmp_path):
    config = tmp_path / "reader.toml"
    config.write_text(READER_CONFIG.format(out=tmp_path / "run", steps=1, kind="folder"))
    with pytest.raises(ConfigError, match='kind must be "shapes"'):
        train(config)
    result = run_cli("train", "--config", config)
    assert result.returncode != 0 and "Traceback" not in result.stderr and 'kind must be "shapes"' in result.stderr


def test_bundled_reader_reads_phrasings_it_never_saw():
    pipe = VideoPipeline.from_pretrained("shapes")
    readings = pipe.prompt_reader.read(pipe.text_encoder, [p for p, _ in UNSEEN])
    for a in shapes.ATTRIBUTES:
        right = sum(r[a] == truth[a] for r, (_, truth) in zip(readings, UNSEEN))
        assert right >= len(UNSEEN) - 1, (a, readings)


def test_pipeline_gives_the_denoiser_the_readers_rewrite(tiny_bundle_with_reader, tiny_bundle):
    with_reader, without = VideoPipeline.from_pretrained(tiny_bundle_with_reader), VideoPipeline.from_pretrained(tiny_bundle)
    prompt = "a big red ball going left over black"
    rewrite = with_reader.denoiser_prompts([prompt])[0]
    assert rewrite != prompt and without.denoiser_prompts([prompt]) is None
    read = with_reader(prompt, seed=3, progress=False)
    assert read.settings[0]["prompt"] == prompt and read.settings[0]["read_as"] == rewrite
    as_written = without(rewrite, seed=3, progress=False, watermark=False)
    assert "read_as" not in as_written.settings[0]
    assert torch.equal(with_reader(prompt, seed=3, progress=False, watermark=False).videos, as_written.videos)


def test_a_lora_turns_the_reader_off():
    """The reader knows the base model's words; an adapter's new ones ("pink") must reach the denoiser as written."""
    pipe = VideoPipeline.from_pretrained("shapes")
    assert pipe.denoiser_prompts(["a pink circle moving left"]) is not None
    pipe.load_lora(WEIGHTS_DIR / "loras" / "shapes-pink")
    assert pipe.denoiser_prompts(["a pink circle moving left"]) is None
    pipe.unload_lora()
    assert pipe.denoiser_prompts(["a pink circle moving left"]) is not None
