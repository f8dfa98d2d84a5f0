"""CLIPScorer on tiny CLIP models the tests build and save themselves (nothing is downloaded).

The adherence test uses a CLIP whose weights are set by hand so that every embedding is known in
closed form (see ``_make_colour_clip``): a frame's image embedding points along its colour, a prompt's
text embedding along the colour words it contains. The expected scores then follow from geometry,
not from running the code under test.
"""

import json
import math

import numpy as np
import pytest
import torch

from vidiffuse.errors import ConfigError, ModelLoadError
from vidiffuse.evaluate.clip_score import CLIPScorer, sample_frame_indices

H = 8  # hidden size = projection size of both towers
WORDS = ["a", "video", "red", "green", "blue", "purple", "cyan"]


def _colour(r, g, b):
    """A zero-mean H-vector for an RGB direction: LayerNorm keeps its direction, only rescales it."""
    return torch.tensor([r, g, b, -r, -g, -b, 0.0, 0.0])


# word -> token embedding; words not listed ("a", "video") embed to zero and do not move the text embedding
WORD_VECTORS = {"red": _colour(1, 0, 0), "green": _colour(0, 1, 0), "blue": _colour(0, 0, 1),
                "purple": _colour(1, 0, 1), "cyan": _colour(-1, 0, 0)}


def _write_tokenizer(folder):
    """A minimal CLIP BPE vocabulary (vocab.json + merges.txt) in which every word of WORDS is one token."""
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(WORDS)))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    ranks = {}  # (left, right) -> priority; BPE merges the lowest-ranked adjacent pair first
    for w in WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            # merge as BPE would with the rules so far; if none applies, add a rule for the first pair
            pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                ranks[(pieces[0], pieces[1])] = len(ranks)
                i = 0
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
            vocab.setdefault(pieces[i], len(vocab))
    merges = [f"{a} {b}" for a, b in ranks]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder)
    for w in WORDS:
        assert tok.convert_ids_to_tokens(tok(w)["input_ids"]) == ["<|startoftext|>", w + "</w>", "<|endoftext|>"]
    return tok


def _save_clip(out, tok, seed=0, colour_weights=False):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=H, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=16, projection_dim=H,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=H, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                           image_size=16, patch_size=8, projection_dim=H),
        projection_dim=H)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    if colour_weights:
        _make_colour_clip(model, tok)
    # mean 0, std 1: a pure-red frame enters the vision tower as (1, 0, 0) per pixel
    processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@torch.no_grad()
def _make_colour_clip(model, tok):
    """Set weights so that image and text embeddings are known exactly.

    Both towers: zero positional embeddings; one layer whose query/key projections are zero (so attention
    is uniform over the visible tokens), value/output projections the identity, and an MLP whose output
    is zero. The pooled token (vision CLS, text EOS) then holds the mean of the LayerNormed token vectors it
    sees, LayerNorm keeps the direction of the zero-mean vectors built by ``_colour``, and the projections
    are the identity.

    - Vision: the class embedding is zero and the patch convolution maps a patch of mean colour (r, g, b)
      to ``_colour(r, g, b)``, so a uniformly coloured frame embeds along its colour.
    - Text: BOS/EOS and the words "a", "video" embed to zero; each colour word to its WORD_VECTORS entry,
      so a prompt embeds along the sum of the unit directions of its colour words.
    """
    for tower in (model.vision_model, model.text_model):
        layer = tower.encoder.layers[0]
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_(), proj.bias.zero_()
        for proj in (attn.v_proj, attn.out_proj):
            proj.weight.copy_(torch.eye(H)), proj.bias.zero_()
        layer.mlp.fc2.weight.zero_(), layer.mlp.fc2.bias.zero_()
        tower.embeddings.position_embedding.weight.zero_()
    for proj in (model.visual_projection, model.text_projection):
        proj.weight.copy_(torch.eye(H))

    emb = model.vision_model.embeddings
    emb.class_embedding.zero_()
    p = emb.patch_embedding.weight.shape[-1]
    rgb_to_hidden = torch.stack([_colour(*np.eye(3)[c]) for c in range(3)], dim=1)  # (H, 3)
    emb.patch_embedding.weight.copy_(rgb_to_hidden[:, :, None, None].expand(H, 3, p, p) / (p * p))

    table = model.text_model.embeddings.token_embedding.weight
    table.zero_()
    for word, vec in WORD_VECTORS.items():
        table[tok.convert_tokens_to_ids(word + "</w>")] = vec


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    tok = _write_tokenizer(root / "tokenizer_src")
    return {"random": _save_clip(root / "random", tok, seed=0),
            "colour": _save_clip(root / "colour", tok, colour_weights=True)}


@pytest.fixture(scope="module")
def colour_scorer(clip_dirs):
    return CLIPScorer(clip_dirs["colour"], frames_per_video=8)


def _video(*colours, size=16):
    """uint8 (T, size, size, 3): one uniformly coloured frame per RGB triple in [0, 1]."""
    return np.stack([np.full((size, size, 3), np.asarray(c) * 255, dtype=np.uint8) for c in colours])


RED, GREEN, BLUE = (1, 0, 0), (0, 1, 0), (0, 0, 1)


def test_loads_offline_and_scores_are_bounded_and_deterministic(clip_dirs, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorer = CLIPScorer(clip_dirs["random"], frames_per_video=4, batch_size=3)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (t, 20, 24, 3), dtype=np.uint8) for t in (6, 2, 9)]
    prompts = ["a red video", "blue", "green purple cyan video"]
    s1 = scorer(videos, prompts)
    assert s1.shape == (3,) and s1.dtype == np.float64
    assert np.all((s1 >= 0) & (s1 <= 100))
    np.testing.assert_array_equal(s1, scorer(videos, prompts))
    # batching and the order of videos do not change a video's score
    scorer.batch_size = 64
    np.testing.assert_allclose(scorer(videos[::-1], prompts[::-1])[::-1], s1, rtol=1e-5, atol=1e-4)
    # the pipeline's tensor convention, (B, 3, T, H, W) in [-1, 1], gives the same score as uint8 frames
    tensor = torch.from_numpy(videos[0]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    np.testing.assert_allclose(scorer(tensor, prompts[0]), s1[:1], rtol=1e-5, atol=1e-4)
    assert scorer(videos[1], "blue").shape == (1,)


def test_scores_follow_the_prompt_on_a_constructed_clip(colour_scorer):
    s = colour_scorer
    red, blue = _video(*[RED] * 4), _video(*[BLUE] * 4)
    # same colour direction: cos 1; orthogonal colours: cos 0; zero-embedding words change nothing
    np.testing.assert_allclose(s([red, red, red], ["red", "a red video", "blue"]), [100, 100, 0], atol=1e-3)
    np.testing.assert_allclose(s([blue, blue], ["blue", "green"]), [100, 0], atol=1e-3)
    # purple = red + blue directions: cos 1/sqrt(2) with either
    np.testing.assert_allclose(s([red, blue], "purple"), [100 / math.sqrt(2)] * 2, atol=1e-3)
    # cyan is anti-red (cos -1): clamped to 0, never negative
    np.testing.assert_allclose(s(red, "cyan"), [0], atol=1e-3)


def test_frame_average_clamps_each_frame(colour_scorer):
    half = _video(RED, RED, BLUE, BLUE)  # 4 frames <= frames_per_video: all are used
    np.testing.assert_allclose(colour_scorer([half] * 3, ["red", "blue", "purple"]),
                               [50, 50, 100 / math.sqrt(2)], atol=1e-3)
    # "cyan blue" = blue - red: red frames cos -1/sqrt(2) -> clamped to 0, blue frames 1/sqrt(2);
    # clamping the averaged cosine (0) instead would give 0
    np.testing.assert_allclose(colour_scorer(half, "cyan blue"), [50 / math.sqrt(2)], atol=1e-3)


def test_frame_sampling(clip_dirs):
    np.testing.assert_array_equal(sample_frame_indices(16, 8), [1, 3, 5, 7, 9, 11, 13, 15])
    np.testing.assert_array_equal(sample_frame_indices(5, 8), [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(sample_frame_indices(5, 1), [2])
    one = CLIPScorer(clip_dirs["colour"], frames_per_video=1)
    np.testing.assert_allclose(one(_video(BLUE, BLUE, RED, BLUE, BLUE), ["red"]), [100], atol=1e-3)
    two = CLIPScorer(clip_dirs["colour"], frames_per_video=2)  # of 8 frames: indices 2 and 6
    v = _video(GREEN, GREEN, RED, GREEN, GREEN, GREEN, BLUE, GREEN)
    np.testing.assert_allclose(two([v, v], ["red", "blue"]), [50, 50], atol=1e-3)


def test_bad_inputs(colour_scorer):
    red = _video(RED, RED)
    with pytest.raises(ConfigError, match="one prompt per video"):
        colour_scorer([red, red], ["red"])
    with pytest.raises(ConfigError, match="uint8"):
        colour_scorer(red.astype(np.float32), "red")
    with pytest.raises(ConfigError, match="no frames"):
        colour_scorer(red[:0], "red")
    with pytest.raises(ConfigError):
        CLIPScorer("unused", frames_per_video=0)


def _copy_dir(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_errors(clip_dirs, tmp_path):
    src = clip_dirs["random"]
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        CLIPScorer(None)
    with pytest.raises(ModelLoadError, match="not found.*save_pretrained"):
        CLIPScorer(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="not a directory"):
        CLIPScorer(src / "config.json")
    with pytest.raises(ModelLoadError, match="no config.json"):
        CLIPScorer(_copy_dir(src, tmp_path / "noconfig", skip={"config.json"}))

    bert = _copy_dir(src, tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model, not CLIP"):
        CLIPScorer(bert)
    with pytest.raises(ModelLoadError, match="no CLIP tokenizer"):
        CLIPScorer(_copy_dir(src, tmp_path / "notok", skip={"tokenizer.json", "vocab.json", "merges.txt"}))
    with pytest.raises(ModelLoadError, match="no image processor"):
        CLIPScorer(_copy_dir(src, tmp_path / "noproc", skip={"preprocessor_config.json"}))
    with pytest.raises(ModelLoadError, match="cannot load CLIP weights"):
        CLIPScorer(_copy_dir(src, tmp_path / "noweights", skip={"model.safetensors"}))

    garbage = _copy_dir(src, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match="cannot load CLIP weights"):
        CLIPScorer(garbage)
    truncated = _copy_dir(src, tmp_path / "truncated")
    data = (src / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot load CLIP weights"):
        CLIPScorer(truncated)

    # a readable file that lacks tensors would otherwise be filled with random weights
    from safetensors.torch import load_file, save_file

    partial = _copy_dir(src, tmp_path / "partial")
    state = load_file(src / "model.safetensors")
    save_file({k: v for k, v in state.items() if "visual_projection" not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="incomplete.*visual_projection"):
        CLIPScorer(partial)
