"""The shapes world (DESIGN.md §3): a procedural video world with known ground truth.

Three things live here because they share one spec:
- `sample_attributes` / `render_clip`: deterministic clips from a seed,
- `make_caption`: natural-language captions in many phrasings, some leaving attributes unsaid,
- `analyze_video`: reads the attributes back from pixels, which makes prompt adherence measurable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FRAMES, SIZE, FPS = 16, 64, 8

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
# Opt-in colours outside the v1 world, for teaching a trained model a new attribute (`vidiffuse train`
# with [lora], configs/shapes_lora_pink.toml). They appear only where asked for (`colors=`/`extra_colors=`),
# so the v1 world, its captions and the analyzer's readings stay exactly as they were. Pink is 123 RGB
# units from its nearest v1 colour (purple) and 137 from the nearest background (gray); the v1 colours are
# as close as 81 to each other (yellow-orange).
EXTRA_COLORS = {"pink": (255, 120, 180)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 24}
DIRECTIONS = ("left", "right", "up", "down", "still")
ATTRIBUTES = ("background", "color", "shape", "size", "direction")
# unit step per frame in image coordinates (y grows downwards)
_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
SPEED_RANGE = (1.6, 2.0)


@dataclass(frozen=True)
class ClipSpec:
    background: str
    color: str
    shape: str
    size: str
    direction: str
    speed: float  # px per frame, 0 for still
    x0: float  # centre of the shape's bounding box in frame 0, pixels
    y0: float

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def palette(extra_colors: Sequence[str] = ()) -> dict[str, tuple[int, int, int]]:
    """The object colours: the v1 world's, plus the named `EXTRA_COLORS`."""
    unknown = [c for c in extra_colors if c not in EXTRA_COLORS]
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"unknown extra colour(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(EXTRA_COLORS)}")
    return {**COLORS, **{c: EXTRA_COLORS[c] for c in extra_colors}}


_ALL_COLORS = {**COLORS, **EXTRA_COLORS}


def sample_clip_spec(rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE,
                     attributes: dict[str, str] | None = None, colors: Sequence[str] | None = None) -> ClipSpec:
    """A random clip; `attributes` fixes some of them (the draws happen anyway, so the stream is unchanged).

    `colors` is the palette to draw the colour from (default: the v1 world's `COLORS`).
    """
    fixed = attributes or {}
    background = fixed.get("background", str(rng.choice(list(BACKGROUNDS))))
    color = fixed.get("color", str(rng.choice(list(COLORS if colors is None else colors))))
    shape = fixed.get("shape", str(rng.choice(SHAPES)))
    size_name = fixed.get("size", str(rng.choice(list(SIZES))))
    direction = fixed.get("direction", str(rng.choice(DIRECTIONS)))
    d = SIZES[size_name]
    speed = 0.0 if direction == "still" else float(rng.uniform(*SPEED_RANGE))
    vx, vy = _VELOCITY[direction]
    travel = speed * (frames - 1)
    half = d / 2
    # start so that every frame keeps the whole shape inside the image
    lo_x, hi_x = half + max(0.0, -vx * travel), size - half - max(0.0, vx * travel)
    lo_y, hi_y = half + max(0.0, -vy * travel), size - half - max(0.0, vy * travel)
    return ClipSpec(background, color, shape, size_name, direction, speed,
                    float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))


_SS = 4  # supersampling factor per axis: anti-aliased edges make sub-pixel motion visible


def _coverage(shape: str, d: int, cx: float, cy: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Fraction of each pixel in the window [x0, x0+w) × [y0, y0+h) covered by the shape."""
    xs = x0 + (np.arange(w * _SS) + 0.5) / _SS
    ys = y0 + (np.arange(h * _SS) + 0.5) / _SS
    X, Y = np.meshgrid(xs - cx, ys - cy)
    r = d / 2
    if shape == "circle":
        inside = X * X + Y * Y <= r * r
    elif shape == "square":
        inside = (np.abs(X) <= r) & (np.abs(Y) <= r)
    else:  # upright triangle: apex at top centre, base d at the bottom
        t = (Y + r) / d  # 0 at apex, 1 at base
        inside = (t >= 0) & (t <= 1) & (np.abs(X) <= t * r)
    return inside.reshape(h, _SS, w, _SS).mean(axis=(1, 3))


def render_clip(spec: ClipSpec, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """Render a clip as uint8 (T, H, W, 3)."""
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    fg = np.array(_ALL_COLORS[spec.color], dtype=np.float32)
    d = SIZES[spec.size]
    vx, vy = _VELOCITY[spec.direction]
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    video[:] = bg
    for t in range(frames):
        cx, cy = spec.x0 + vx * spec.speed * t, spec.y0 + vy * spec.speed * t
        x0, y0 = max(0, int(np.floor(cx - d / 2)) - 1), max(0, int(np.floor(cy - d / 2)) - 1)
        x1, y1 = min(size, int(np.ceil(cx + d / 2)) + 1), min(size, int(np.ceil(cy + d / 2)) + 1)
        a = _coverage(spec.shape, d, cx, cy, x0, y0, x1 - x0, y1 - y0)[..., None]
        video[t, y0:y1, x0:x1] = a * fg + (1 - a) * bg
    return np.round(video).astype(np.uint8)


# ---------------------------------------------------------------- captions

_SYN = {
    "background": {
        "black": ["black", "dark", "pitch-black", "jet black"],
        "white": ["white", "bright white", "plain white", "snow-white"],
        "gray": ["gray", "grey", "medium gray", "neutral grey"],
    },
    "color": {
        "red": ["red", "crimson", "scarlet"],
        "green": ["green", "emerald", "leaf-green"],
        "blue": ["blue", "azure", "royal blue"],
        "yellow": ["yellow", "golden", "lemon-yellow"],
        "purple": ["purple", "violet", "lilac"],
        "orange": ["orange", "tangerine", "amber"],
    },
    "shape": {
        "circle": ["circle", "disc", "disk", "dot", "ball", "round blob"],
        "square": ["square", "box", "block", "square tile"],
        "triangle": ["triangle", "triangular shape", "pyramid shape", "wedge"],
    },
    "size": {
        "small": ["small", "little", "tiny", "compact"],
        "large": ["large", "big", "huge", "sizeable"],
    },
}
_EXTRA_COLOR_WORDS = {"pink": ["pink", "rose-pink", "hot pink"]}
_COLOR_WORDS = {**_SYN["color"], **_EXTRA_COLOR_WORDS}
_MOTION = {
    "left": ["moving left", "sliding to the left", "drifting leftward", "travelling left", "heading left",
             "gliding towards the left", "that moves left", "going left", "moving to the left side",
             "shifting leftwards", "moving towards the left edge", "panning left"],
    "right": ["moving right", "sliding to the right", "drifting rightward", "travelling right", "heading right",
              "gliding towards the right", "that moves right", "going right", "moving to the right side",
              "shifting rightwards", "moving towards the right edge", "panning right"],
    "up": ["moving up", "rising", "drifting upward", "travelling upwards", "heading up", "floating up",
           "climbing towards the top", "that moves up", "going up", "ascending", "moving towards the top edge"],
    "down": ["moving down", "falling", "sinking", "drifting downward", "travelling downwards", "heading down",
             "dropping towards the bottom", "that moves down", "going down", "descending",
             "moving towards the bottom edge"],
    "still": ["standing still", "not moving", "staying in place", "motionless", "at rest", "sitting still",
              "that stays put", "resting", "frozen in place", "stationary", "static", "that does not move"],
}
# Caption version 2 adds phrasings that name where the motion starts as well as where it ends ("moving from
# right to left"), in several sentence frames. The bundled model (version 1 captions) reads "from top to
# bottom" as both up and down and draws a still object (0 of 24 such prompts moved); a 48k-sample CPU
# fine-tune on version 2 did not teach it (README, "Known limits"), so version 2 waits for a longer run.
# Version 1 stays the default: it is what every shipped model was trained on, and a data manifest's
# caption_version must regenerate the same captions.
_PATHS = {"left": ("right", "left"), "right": ("left", "right"), "up": ("bottom", "top"), "down": ("top", "bottom")}
_PATH_FRAMES = ["moving from {a} to {b}", "going from the {a} to the {b}", "sliding from the {a} side to the {b} side",
                "crossing the frame from {a} to {b}", "travelling from the {a} edge to the {b} edge",
                "moving {a} to {b}", "coming from the {a} towards the {b}"]
_MOTION_BY_VERSION = {1: _MOTION, 2: {d: phrases + ([f.format(a=_PATHS[d][0], b=_PATHS[d][1]) for f in _PATH_FRAMES]
                                                   if d in _PATHS else []) for d, phrases in _MOTION.items()}}
CAPTION_VERSIONS = tuple(_MOTION_BY_VERSION)
_BG_PHRASES = ["on a {b} background", "over {b}", "against a {b} backdrop", "in front of a {b} background",
               "on {b}", "with a {b} background", "over a {b} screen", "on a plain {b} field",
               "set on {b}", "on a {b} backdrop"]
_OPENERS = ["", "", "", "a video of ", "a clip of ", "an animation of ", "footage of ", "show ", "generate ",
            "render ", "a short video showing "]
_ORDERS = ("subject_motion_bg", "bg_first", "subject_bg_motion", "sentence", "adjectives_after", "background_label")


def make_caption(attrs: dict[str, str | None], rng: np.random.Generator, version: int = 1) -> str:
    """A natural-language caption for the given attributes; an attribute set to None is left unsaid.
    `version` picks the caption vocabulary (`CAPTION_VERSIONS`)."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    size = pick(_SYN["size"][attrs["size"]]) if attrs.get("size") else None
    color = pick(_COLOR_WORDS[attrs["color"]]) if attrs.get("color") else None
    shape = pick(_SYN["shape"][attrs["shape"]]) if attrs.get("shape") else pick(["shape", "object", "thing"])
    bg_word = pick(_SYN["background"][attrs["background"]]) if attrs.get("background") else None
    motion = pick(_MOTION_BY_VERSION[version][attrs["direction"]]) if attrs.get("direction") else ""
    bg = pick(_BG_PHRASES).format(b=bg_word) if bg_word else ""
    order = _ORDERS[int(rng.integers(len(_ORDERS)))]
    if order == "adjectives_after" and (size or color):
        adjs = " and ".join(w for w in (size, color) if w)
        subject = f"{'an' if shape[0] in 'aeiou' else 'a'} {shape}, {adjs},"
        if not motion and not bg:
            subject = subject.rstrip(",")
    else:
        noun = " ".join(w for w in (size, color, shape) if w)
        subject = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if order == "bg_first" and bg:
        text = f"{bg}, {subject} {motion}"
    elif order == "subject_bg_motion" and bg and motion:
        text = f"{subject} {bg}, {motion}"
    elif order == "sentence" and motion:
        verb = motion.removeprefix("that ")
        text = f"{subject} is {verb}" if not verb.startswith(("moves", "stays", "does")) else f"{subject} {verb}"
        text += f" {bg}" if bg else ""
    elif order == "background_label" and bg_word:
        text = f"{subject} {motion}; {bg_word} background"
    else:
        text = " ".join(p for p in (subject, motion, bg) if p)
    text = pick(_OPENERS) + text
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return " ".join(text.replace(" ,", ",").replace(",;", ";").split()).rstrip(",")


def plain_caption(attrs: dict[str, str | None]) -> str:
    """The caption of `attrs` in the world's own names for them, in one fixed sentence frame ("a small red circle
    moving left on a black background"); attributes set to None are left unsaid. What a `PromptReader`
    writes for the denoiser: the phrasing every caption version trains on, so it is read best."""
    noun = " ".join(attrs[a] for a in ("size", "color") if attrs.get(a)) + " " + (attrs.get("shape") or "shape")
    motion = _MOTION[attrs["direction"]][0] if attrs.get("direction") else ""
    bg = f"on a {attrs['background']} background" if attrs.get("background") else ""
    return " ".join(p for p in (f"{'an' if noun.strip()[0] in 'aeiou' else 'a'} {noun.strip()}", motion, bg) if p)


def stated_attributes(spec: ClipSpec, rng: np.random.Generator, drop_prob: float = 0.15) -> dict[str, str | None]:
    """The clip's attributes, each left unsaid (None) with probability `drop_prob`."""
    return {a: (None if rng.random() < drop_prob else v) for a, v in spec.attributes().items()}


def sample_caption(spec: ClipSpec, rng: np.random.Generator, drop_prob: float = 0.15, version: int = 1) -> str:
    """Caption a clip, leaving each attribute unsaid with probability `drop_prob`."""
    return make_caption(stated_attributes(spec, rng, drop_prob), rng, version)


def generate_example(seed: int, frames: int = FRAMES, size: int = SIZE,
                     extra_colors: Sequence[str] = ()) -> tuple[ClipSpec, np.ndarray, str]:
    """Clip `seed` of the world: the spec, its pixels (T,H,W,3 uint8) and one caption. Deterministic.

    `extra_colors` (names in `EXTRA_COLORS`) join the palette the colour is drawn from.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    spec = sample_clip_spec(rng, frames, size, colors=list(palette(extra_colors)) if extra_colors else None)
    return spec, render_clip(spec, frames, size), sample_caption(spec, rng)


def synthesize(out: Path, n: int, seed: int = 0, progress: bool = True, extra_colors: Sequence[str] = ()) -> Path:
    """Write `n` clips as MP4 plus `captions.jsonl` (file, caption, licence, attributes) into `out`;
    `extra_colors` as in `generate_example`."""
    from ..video.io import write_video
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc="synth", disable=not progress):
        spec, video, caption = generate_example(seed * 1_000_003 + i, extra_colors=extra_colors)
        name = f"{i:06d}.mp4"
        write_video(out / name, video, fps=FPS)
        # generated by this project's code, so under its licence; the dataset manifest and training read this
        lines.append(json.dumps({"file": name, "caption": caption, "license": "Apache-2.0", **asdict(spec)}))
    tmp = out / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "captions.jsonl")
    return out


# ---------------------------------------------------------------- analyzer


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    dist = np.linalg.norm(np.array([table[n] for n in names], dtype=np.float32) - rgb, axis=1)
    return names[int(np.argmin(dist))]


@dataclass
class FrameReading:
    found: bool
    color: str | None = None
    shape: str | None = None
    size: str | None = None
    cx: float = float("nan")
    cy: float = float("nan")


def _read_frame(frame: np.ndarray, bg_rgb: np.ndarray, colors: dict = COLORS) -> FrameReading:
    import cv2

    diff = np.abs(frame.astype(np.float32) - bg_rgb).max(axis=-1)
    contrast = max(40.0, float(np.percentile(diff, 99.9)))
    alpha = np.clip(diff / contrast, 0, 1)  # ~ how much of each pixel the object covers
    mask = (alpha > 0.5).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return FrameReading(False)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[k, cv2.CC_STAT_AREA] < 20:
        return FrameReading(False)
    blob = labels == k
    color = _nearest(np.median(frame[blob].astype(np.float32), axis=0), colors)
    x, y, w, h = (int(stats[k, i]) for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    size = "small" if max(w, h) < 18 else "large"
    # the corners of the bounding box tell the shapes apart: a square fills all four, an upright
    # triangle only the bottom two, a circle none
    box = alpha[y : y + h, x : x + w]
    top = (box[:2, :2].mean() + box[:2, -2:].mean()) / 2
    bottom = (box[-2:, :2].mean() + box[-2:, -2:].mean()) / 2
    if bottom < 0.35:
        shape = "circle"
    elif top < 0.35:
        shape = "triangle"
    else:
        shape = "square"
    return FrameReading(True, color, shape, size, float(centroids[k][0]), float(centroids[k][1]))


def locate_object(frame: np.ndarray) -> tuple[float, float] | None:
    """The object's centroid (x, y) in pixels in one frame (H, W, 3) uint8, against the colour of the frame's
    border; None where no object is found."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)
    reading = _read_frame(frame, np.median(border, axis=0))
    return (reading.cx, reading.cy) if reading.found else None


def _vote(values: list[str]) -> tuple[str | None, float]:
    if not values:
        return None, 0.0
    names, counts = np.unique(values, return_counts=True)
    return str(names[np.argmax(counts)]), float(counts.max() / len(values))


def analyze_video(video: np.ndarray, extra_colors: Sequence[str] = ()) -> dict:
    """Read the shapes-world attributes from the pixels of a video (T, H, W, 3) uint8.

    Returns each attribute (None where nothing could be read), the measured velocity, and
    `stability`: the share of frames that agree with the clip-level colour, shape and size.
    Colours are read against the v1 palette plus `extra_colors` (names in `EXTRA_COLORS`).
    """
    colors = palette(extra_colors) if extra_colors else COLORS
    video = np.asarray(video)
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1).reshape(-1, 3)
    bg_rgb = np.median(border.astype(np.float32), axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    readings = [_read_frame(f, bg_rgb, colors) for f in video]
    found = [r for r in readings if r.found]
    color, color_agree = _vote([r.color for r in found])
    shape, shape_agree = _vote([r.shape for r in found])
    size, size_agree = _vote([r.size for r in found])
    direction, vx, vy = None, 0.0, 0.0
    if len(found) >= max(3, len(readings) // 2):
        t = np.array([i for i, r in enumerate(readings) if r.found], dtype=np.float64)
        vx = float(np.polyfit(t, [r.cx for r in found], 1)[0])
        vy = float(np.polyfit(t, [r.cy for r in found], 1)[0])
        if max(abs(vx), abs(vy)) < 0.6:
            direction = "still"
        elif abs(vx) >= abs(vy):
            direction = "right" if vx > 0 else "left"
        else:
            direction = "down" if vy > 0 else "up"
    return {
        "background": background,
        "color": color,
        "shape": shape,
        "size": size,
        "direction": direction,
        "velocity": (vx, vy),
        "object_frames": len(found) / max(len(readings), 1),
        "stability": {"color": color_agree, "shape": shape_agree, "size": size_agree},
    }
