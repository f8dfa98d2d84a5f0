"""Prompts in phrasings the training captions never use (other templates, words and word orders).

The bundled model is trained on `vidiffuse.data.shapes.make_caption`. Set 1 was written against caption
version 1; version 2 added path phrasings ("moving from right to left"), so set 1's "travels from right to
left" is no longer unseen in spirit. Set 2 was written after version 2 and shares no sentence frame and
no motion word with it ("starts on the right and ends up on the left", "proceeds leftward"), so adherence
measured on set 2 says how the model reads free-form prompts today.
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
MOTION_2 = {"left": ["starts on the right and ends up on the left", "proceeds leftward", "advances toward the left-hand side"],
            "right": ["starts on the left and ends up on the right", "proceeds rightward", "advances toward the right-hand side"],
            "up": ["starts at the bottom and ends up at the top", "proceeds upward", "advances toward the upper side"],
            "down": ["starts at the top and ends up at the bottom", "proceeds downward", "advances toward the lower side"],
            "still": ["remains fixed in one place", "never changes position", "holds completely steady"]}
TEMPLATES_2 = [
    "Animate {bg_a} frame where one {size} {color} {shape} {motion}.",
    "{color} {shape}, {size}, {motion}; backdrop is {bg_bare}",
    "Could you show a {shape} ({color}, {size}) that {motion} over {bg_bare}?",
    "In this clip, against {bg_bare}, the {size} {color} {shape} {motion}.",
    "Just one {size} {shape}, coloured {color}, which {motion}, with everything behind it {bg_bare}",
]
SETS = {1: (TEMPLATES, MOTION), 2: (TEMPLATES_2, MOTION_2)}


def heldout_prompts(n: int, seed: int = 2026, rare_words: bool = False, phrasing: int = 1) -> tuple[list[str], list[dict]]:
    """`n` prompts of phrasing set 1 or 2 and their attributes. With `rare_words`, attributes are also named
    by words the training captions never use (cobalt, plum, giant, ...); without, by the plain names."""
    templates, motions = SETS[phrasing]
    rng = np.random.default_rng(seed)
    pick = (lambda xs: xs[int(rng.integers(len(xs)))]) if rare_words else (lambda xs: xs[0])  # noqa: E731
    prompts, truth = [], []
    for i in range(n):
        spec = shapes.sample_clip_spec(rng)
        a = spec.attributes()
        bg_a = BG[a["background"]][1 + int(rng.integers(2))]
        text = templates[i % len(templates)].format(
            size=pick(SIZE[a["size"]]), color=pick(COLOR[a["color"]]), shape=pick(SHAPE[a["shape"]]),
            motion=motions[a["direction"]][int(rng.integers(3))], bg_bare=BG[a["background"]][0], bg_a=bg_a)
        prompts.append(text[0].upper() + text[1:])
        truth.append(a)
    return prompts, truth
