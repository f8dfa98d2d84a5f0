"""Prompts in phrasings the training captions never use (other templates, words and word orders).

The bundled model is trained on `vidiffuse.data.shapes.make_caption`; these templates share no
sentence frame with it, so adherence measured here says how the model reads free-form prompts.
"""

from __future__ import annotations

import numpy as np

from vidiffuse.data import shapes

BG = {"black": ["black", "a black", "an all-black"], "white": ["white", "a white", "an all-white"],
      "gray": ["gray", "a grey", "an ash-grey"]}
COLOR = {"red": ["red", "cherry-red"], "green": ["green", "grass-green"], "blue": ["blue", "cobalt"],
         "yellow": ["yellow", "sunny yellow"], "purple": ["purple", "plum"], "orange": ["orange", "pumpkin-orange"]}
SHAPE = {"circle": ["circle", "round shape"], "square": ["square", "four-sided square"], "triangle": ["triangle", "three-sided shape"]}
SIZE = {"small": ["small", "miniature"], "large": ["large", "giant"]}
MOTION = {"left": ["travels from right to left", "goes leftwards", "makes its way to the left"],
          "right": ["travels from left to right", "goes rightwards", "makes its way to the right"],
          "up": ["travels from bottom to top", "goes upwards", "makes its way to the top"],
          "down": ["travels from top to bottom", "goes downwards", "makes its way to the bottom"],
          "still": ["does not move at all", "stays where it is", "keeps perfectly still"]}
TEMPLATES = [
    "There is a {size} {color} {shape} that {motion}, and the background is {bg_bare}.",
    "{bg_a} scene in which a {color} {shape} of {size} size {motion}",
    "Picture a {shape}: {size}, {color}. It {motion}. Background: {bg_bare}.",
    "My video: {color}, {size} {shape}; it {motion} across {bg_a} canvas",
    "Make the {shape} {color} and {size}, put it on {bg_a} backdrop, and it {motion}",
]


def heldout_prompts(n: int, seed: int = 2026, rare_words: bool = False) -> tuple[list[str], list[dict]]:
    """`n` prompts and their attributes. With `rare_words`, attributes are also named by words the
    training captions never use (cobalt, plum, giant, ...); without, by the plain names."""
    rng = np.random.default_rng(seed)
    pick = (lambda xs: xs[int(rng.integers(len(xs)))]) if rare_words else (lambda xs: xs[0])  # noqa: E731
    prompts, truth = [], []
    for i in range(n):
        spec = shapes.sample_clip_spec(rng)
        a = spec.attributes()
        bg_a = BG[a["background"]][1 + int(rng.integers(2))]
        text = TEMPLATES[i % len(TEMPLATES)].format(
            size=pick(SIZE[a["size"]]), color=pick(COLOR[a["color"]]), shape=pick(SHAPE[a["shape"]]),
            motion=MOTION[a["direction"]][int(rng.integers(3))], bg_bare=BG[a["background"]][0], bg_a=bg_a)
        prompts.append(text[0].upper() + text[1:])
        truth.append(a)
    return prompts, truth
