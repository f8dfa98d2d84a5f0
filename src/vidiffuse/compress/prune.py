"""Structured pruning of VideoDiT: whole attention heads and MLP channels, then a short recovery fine-tune.

    vidiffuse prune shapes --out my-pruned --ratio 0.25 --heads 3

The same number of heads and MLP channels go from every block, so the pruned denoiser is still a plain
`VideoDiT` whose config says its size (`num_heads` with `attention_head_dim` fixed, `mlp_hidden_size`):
`VideoDiT.from_pretrained` loads it, every tool that runs the original runs it, and it is smaller on disk
and faster because its matrices are smaller (no masks, no sparse kernels).

Which units go: each one's *output energy* on calibration batches of the model's own training data
(noised latents of shapes-world clips with their captions, noise levels drawn as in training) — the mean
squared norm of what the unit adds to the residual stream, adaLN gate included:
- MLP channel j: sum over tokens of h_j² · ‖gate ⊙ W_out[:, j]‖²  (h_j its activation after the GELU),
- attention head h: sum over tokens of ‖gate ⊙ W_out[:, head h] · a_h‖²  (a_h the head's attention output).
That is exactly how far the block's output moves when the unit alone is removed, so a unit whose removal
changes nothing (zero weights, a dead channel) scores zero and goes first; weight magnitude alone cannot
see a large weight that reads a channel which is almost always zero. Self- and cross-attention choose
their heads independently; both keep the same count.

Recovery: the pruned student learns the unpruned teacher's velocity on the same noised latents (output
distillation, MSE), with an EMA of the weights, AdamW, warmup then cosine decay. Why distillation rather
than the original flow-matching loss: the flow-matching target (noise − x₀) is a one-sample estimate of the
velocity the teacher already predicts as an average, so the teacher's prediction is the same target
without that sampling noise — the student recovers in far fewer steps, and it recovers the
unconditional branch (10% empty prompts, as in training) that classifier-free guidance needs. It also
needs no ground truth beyond clean latents, and it aims at what pruning must preserve: the teacher's
behaviour, not a new fit to the data. Checkpoints are atomic (`train.checkpoint`) and every draw is
seeded by the step, so a run stopped by its time limit resumes exactly (`--resume`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import shapes
from ..errors import ConfigError
from ..files import atomic_directory, sha256_file, write_atomic

logger = logging.getLogger(__name__)

FORMAT = "vidiffuse-pruned-v1"
PRUNE_RECORD = "prune.json"  # in the pruned model's training/ folder: what was removed and how it was chosen
RECOVERY_LOG = "recovery_metrics.jsonl"
MLP_MULTIPLE = 8  # kept MLP channels are a multiple of this: matmul kernels run best on such widths
# the recovery data default: the first clips of the bundled model's own training set (seed 1 in its config)
DEFAULT_DATA = {"kind": "shapes", "num_clips": 1500, "captions_per_clip": 2, "caption_drop_prob": 0.15, "seed": 1}
DEFAULT_RECOVERY = {"steps": 400, "batch_size": 16, "lr": 2e-4, "warmup": 50, "min_lr_ratio": 0.1,
                    "ema_decay": 0.995, "grad_clip": 1.0, "p_uncond": 0.1, "seed": 0, "checkpoint_every": 100,
                    "eval_every": 250, "eval_prompts": 32, "log_every": 10}


# ---------------------------------------------------------------- sizes


def check_ratio(ratio: float) -> float:
    """The share of the denoiser's parameters to remove: strictly between 0 and 1."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"the pruning ratio must be a number between 0 and 1 (exclusive), got {ratio!r}") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise ConfigError(f"the pruning ratio must be between 0 and 1 (exclusive), got {ratio!r}")
    return value


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _head_dim(config) -> int:
    return config["attention_head_dim"] or config["hidden_size"] // config["num_heads"]


def _mlp_hidden(config) -> int:
    return config["mlp_hidden_size"] or int(config["hidden_size"] * config["mlp_ratio"])


def _config(model_or_config) -> dict:
    config = getattr(model_or_config, "config", model_or_config)
    config = dict(config)
    config.setdefault("attention_head_dim", None)
    config.setdefault("mlp_hidden_size", None)
    return config


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _count_for(config: dict) -> int:
    """Parameters of a VideoDiT with this config, without allocating its weights."""
    from ..models.transformer import VideoDiT

    with torch.device("meta"):
        return parameter_count(VideoDiT(**_public(config)))


@dataclass(frozen=True)
class PruneShape:
    """What every block keeps."""

    heads: int  # attention heads, in self- and in cross-attention (each head keeps its size)
    mlp_hidden_size: int  # MLP channels


def plan_shape(model_or_config, ratio: float, heads: int | None = None, multiple: int = MLP_MULTIPLE) -> PruneShape:
    """The per-block sizes that remove at least `ratio` of the parameters: `heads` heads kept (default: all),
    and as many MLP channels (a multiple of `multiple`) as that still allows.

    Raises ConfigError when the ratio cannot be reached with that many heads.
    """
    ratio = check_ratio(ratio)
    config = _config(model_or_config)
    n_heads = int(config["num_heads"])
    heads = n_heads if heads is None else int(heads)
    if not 1 <= heads <= n_heads:
        raise ConfigError(f"heads to keep must be between 1 and the model's {n_heads}, got {heads}")
    hidden = _mlp_hidden(config)
    total = _count_for(config)
    with_heads = _count_for({**config, "num_heads": heads, "attention_head_dim": _head_dim(config), "mlp_hidden_size": hidden})
    per_channel = int(config["depth"]) * (2 * int(config["hidden_size"]) + 1)  # a row in, a column and a bias out
    still_needed = ratio * total - (total - with_heads)
    keep = hidden - max(0, math.ceil(still_needed / per_channel))
    if keep < hidden:  # round the kept channels down, so at least `ratio` goes
        keep = keep // multiple * multiple
    if keep < max(1, multiple):
        best = 1 - (with_heads - per_channel * (hidden - max(1, multiple))) / total
        raise ConfigError(f"cannot remove {ratio:.0%} of the parameters keeping {heads} of {n_heads} heads "
                          f"(at most {best:.0%}); keep fewer heads or ask for less")
    return PruneShape(heads=heads, mlp_hidden_size=keep)


# ---------------------------------------------------------------- importance


@torch.no_grad()
def importance_scores(model: nn.Module, batches: Iterable[dict]) -> list[dict[str, torch.Tensor]]:
    """Per block, the output energy of every self-attention head ("attn"), cross-attention head
    ("cross_attn") and MLP channel ("mlp"), summed over `batches` (the denoiser's keyword arguments)."""
    scores = [{"attn": 0.0, "cross_attn": 0.0, "mlp": 0.0} for _ in model.blocks]
    gates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def keep_gates(i):
        def hook(module, args, output):
            _, _, gate1, _, _, gate2 = output.float().chunk(6, dim=-1)
            gates[i] = gate1, gate2
        return hook

    def head_energy(i, name, attn):
        def hook(module, args):
            a = args[0].float()  # (B, N, heads * head_dim), heads major
            b, n, _ = a.shape
            w = module.weight.float().view(module.out_features, attn.heads, -1)  # (D, H, hd)
            y = torch.einsum("bnhk,dhk->bnhd", a.view(b, n, attn.heads, -1), w)
            if name == "attn":  # self-attention's output is scaled by the adaLN gate; cross-attention's is not
                y = y * gates[i][0][:, None, None, :]
            scores[i][name] = scores[i][name] + y.pow(2).sum(dim=(0, 1, 3))
        return hook

    def channel_energy(i):
        def hook(module, args):
            h2 = args[0].float().pow(2).sum(1)  # (B, F)
            out_sq = gates[i][1].pow(2) @ module.weight.float().pow(2)  # (B, F): ‖gate ⊙ W[:, j]‖² per sample
            scores[i]["mlp"] = scores[i]["mlp"] + (h2 * out_sq).sum(0)
        return hook

    for i, block in enumerate(model.blocks):
        handles += [block.ada.register_forward_hook(keep_gates(i)),
                    block.attn.out.register_forward_pre_hook(head_energy(i, "attn", block.attn)),
                    block.cross_attn.out.register_forward_pre_hook(head_energy(i, "cross_attn", block.cross_attn)),
                    block.mlp[2].register_forward_pre_hook(channel_energy(i))]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            model(**batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError("no calibration batches: importance needs at least one")
    return scores


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (ties broken by position, deterministically)."""
    order = sorted(range(len(score)), key=lambda j: (-float(score[j]), j))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def scores_from_kept(kept: list[dict[str, list[int]]], model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Scores that make `prune_transformer` keep exactly the units a pruning record lists (training/prune.json's
    "kept"): rebuilds a pruned model's starting point from the record alone."""
    config = _config(model)
    sizes = {"attn": int(config["num_heads"]), "cross_attn": int(config["num_heads"]), "mlp": _mlp_hidden(config)}
    out = []
    for block in kept:
        scores = {}
        for name, size in sizes.items():
            scores[name] = torch.zeros(size)
            scores[name][torch.tensor(block[name], dtype=torch.long)] = 1.0
        out.append(scores)
    return out


# ---------------------------------------------------------------- surgery


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def prune_transformer(model: nn.Module, shape: PruneShape, scores: list[dict[str, torch.Tensor]] | None = None):
    """A new, smaller VideoDiT keeping in every block the `shape.heads` heads and `shape.mlp_hidden_size`
    MLP channels with the highest scores (`importance_scores`; without scores: the first ones).

    The kept units' weights are copied unchanged, so a unit whose removal changes nothing (zero output
    weights) is removed exactly: the pruned model computes the same function.
    """
    from ..models.transformer import VideoDiT

    if getattr(model, "quantization", None):
        raise ConfigError("prune the float model, then quantize the pruned one (this denoiser is already quantized)")
    config = _config(model)
    head_dim, n_heads, hidden = _head_dim(config), int(config["num_heads"]), _mlp_hidden(config)
    if not 1 <= shape.heads <= n_heads or not 1 <= shape.mlp_hidden_size <= hidden:
        raise ConfigError(f"cannot keep {shape.heads} heads and {shape.mlp_hidden_size} MLP channels of a model "
                          f"with {n_heads} and {hidden}")
    new_config = {**_public(config), "num_heads": shape.heads, "attention_head_dim": head_dim,
                  "mlp_hidden_size": shape.mlp_hidden_size}
    pruned = VideoDiT.from_config(new_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        s = scores[i] if scores is not None else {}
        default_heads, default_channels = torch.ones(n_heads), torch.ones(hidden)
        for name in ("attn", "cross_attn"):
            rows = _head_rows(_top(s.get(name, default_heads), shape.heads), head_dim)
            inner = n_heads * head_dim
            p = f"blocks.{i}.{name}."
            state[p + "q.weight"], state[p + "q.bias"] = state[p + "q.weight"][rows], state[p + "q.bias"][rows]
            kv_rows = torch.cat([rows, inner + rows])  # k then v, each heads-major
            state[p + "kv.weight"], state[p + "kv.bias"] = state[p + "kv.weight"][kv_rows], state[p + "kv.bias"][kv_rows]
            state[p + "out.weight"] = state[p + "out.weight"][:, rows]
        channels = _top(s.get("mlp", default_channels), shape.mlp_hidden_size)
        p = f"blocks.{i}.mlp."
        state[p + "0.weight"], state[p + "0.bias"] = state[p + "0.weight"][channels], state[p + "0.bias"][channels]
        state[p + "2.weight"] = state[p + "2.weight"][:, channels]
    pruned.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    dtype = next(model.parameters()).dtype
    return (pruned if dtype == torch.float32 else pruned.to(dtype)).eval()


# ---------------------------------------------------------------- data


def recovery_data(pipe, data_cfg: dict, cache_dir: Path) -> dict[str, torch.Tensor]:
    """Latent clips and caption embeddings for calibration and recovery (train.data's cached format)."""
    from ..train.data import latent_dataset

    vae_file = Path(pipe.path or "") / "vae" / "diffusion_pytorch_model.safetensors"
    vae_id = sha256_file(vae_file) if vae_file.is_file() else "in-memory"
    return latent_dataset(data_cfg, pipe.frames, pipe.size, pipe.vae, pipe.text_encoder, Path(cache_dir), vae_id=vae_id)


def _rng(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


def noised_batch(data: dict, empty, batch_size: int, gen: torch.Generator, p_uncond: float = 0.1) -> dict:
    """The denoiser's keyword arguments for a batch drawn as in training: random captions (a share replaced
    by the empty prompt, for guidance), logit-normal noise levels, x_t = (1 − t)·x₀ + t·noise."""
    from ..diffusion.flow import interpolate, sample_t

    idx = torch.randint(len(data["caption_clip"]), (batch_size,), generator=gen)
    drop = torch.rand(batch_size, generator=gen) < p_uncond
    noise = torch.randn((batch_size, *data["latents"].shape[1:]), generator=gen)
    t = sample_t(batch_size, gen)
    x0 = data["latents"][data["caption_clip"][idx]].float()
    tokens, mask, pooled = data["tokens"][idx].float(), data["mask"][idx].clone(), data["pooled"][idx].float()
    tokens[drop], mask[drop], pooled[drop] = empty.tokens[0], empty.mask[0], empty.pooled[0]
    return {"hidden_states": interpolate(x0, noise, t), "timestep": t * 1000, "encoder_hidden_states": tokens,
            "encoder_attention_mask": mask, "pooled_projections": pooled}


def calibration_batches(data: dict, empty, n_batches: int = 8, batch_size: int = 32, seed: int = 1234) -> Iterator[dict]:
    for k in range(n_batches):
        yield noised_batch(data, empty, batch_size, _rng(seed, k, 7))


# ---------------------------------------------------------------- recovery


def _lr(step: int, run: dict) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak at the last step."""
    peak, warmup, steps = float(run["lr"]), int(run["warmup"]), int(run["steps"])
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = float(run["min_lr_ratio"])
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def recover(student: nn.Module, teacher: nn.Module, data: dict, empty, work_dir: str | os.PathLike, run: dict | None = None,
            evaluate: Callable[[nn.Module], dict] | None = None, resume: bool = False,
            time_limit_s: float | None = None, progress: Callable[[str], None] | None = None) -> tuple[nn.Module, bool]:
    """Distil `teacher`'s velocity into `student` for run["steps"] steps; returns (the EMA student, finished).

    Checkpoints go to `work_dir/checkpoint` every run["checkpoint_every"] steps and when `time_limit_s`
    stops the run early (finished False); `resume` continues from there. Metrics (loss, and `evaluate`'s
    numbers on the EMA every run["eval_every"] steps) are appended to `work_dir/recovery_metrics.jsonl`.
    """
    from ..train.checkpoint import resume_step, save_checkpoint

    run = {**DEFAULT_RECOVERY, **(run or {})}
    say = progress or (lambda message: None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt, log = work_dir / "checkpoint", work_dir / RECOVERY_LOG
    teacher = teacher.eval().requires_grad_(False)
    student.train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=float(run["lr"]), weight_decay=0.0, betas=(0.9, 0.99))
    start = resume_step(ckpt, student, ema, optimizer, resume, "recovery", work_dir)
    if start:
        say(f"resuming recovery at step {start}")
    steps, seed, began = int(run["steps"]), int(run["seed"]), time.perf_counter()
    t_last, n_last = began, start

    def write(record: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if start == 0 and evaluate is not None and not any("eval" in r for r in _read_jsonl(log)):
        write({"step": 0, "eval": evaluate(ema)})  # the pruned model before any recovery
    for step in range(start, steps):
        lr = _lr(step, run)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = noised_batch(data, empty, int(run["batch_size"]), _rng(seed, step, 0), float(run["p_uncond"]))
        with torch.no_grad():
            target = teacher(**batch).sample.float()
        loss = (student(**batch).sample.float() - target).pow(2).mean()
        loss.backward()
        loss = loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), float(run["grad_clip"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        decay = min(float(run["ema_decay"]), (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - decay)
        done = step + 1
        out_of_time = time_limit_s is not None and time.perf_counter() - began > time_limit_s
        if done % int(run["log_every"]) == 0 or done == steps:
            now = time.perf_counter()
            rate = (done - n_last) * int(run["batch_size"]) / max(now - t_last, 1e-9)
            t_last, n_last = now, done
            write({"step": done, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate,
                   "time": time.time()})
            say(f"step {done}/{steps}: distillation loss {float(loss):.4f}, {rate:.1f} samples/s")
        if done % int(run["checkpoint_every"]) == 0 or done == steps or out_of_time:
            save_checkpoint(ckpt, student, ema, optimizer, {"step": done, "run": run})
        if evaluate is not None and (done % int(run["eval_every"]) == 0 or done == steps):
            result = evaluate(ema)
            write({"step": done, "eval": result})
            say(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        if out_of_time and done < steps:
            say(f"time limit reached at step {done} of {steps}; rerun with --resume to continue")
            return ema, False
    return ema, True


def adherence_probe(pipe, n_prompts: int = 32) -> Callable[[nn.Module], dict]:
    """Analyzer adherence of a denoiser on `n_prompts` fixed, fully specified prompts (the training loop's
    watch set), sampled with `pipe`'s defaults: quality measured while recovering, not guessed from the loss."""
    from ..pipeline import VideoPipeline
    from ..train.trainer import eval_prompts

    prompts, truth = eval_prompts(n_prompts)

    def probe(model: nn.Module) -> dict:
        was_training = model.training
        probe_pipe = VideoPipeline(model, pipe.vae, pipe.text_encoder, frames=pipe.frames, size=pipe.size, fps=pipe.fps,
                                   defaults=pipe.defaults, name=pipe.name)
        pipeline_logger = logging.getLogger("vidiffuse.pipeline")
        level = pipeline_logger.level
        pipeline_logger.setLevel(logging.ERROR)  # no watermark on purpose: only the analyzer reads these videos
        try:
            videos = probe_pipe(prompts, seed=0, progress=False, watermark=False).frames
        finally:
            pipeline_logger.setLevel(level)
        model.train(was_training)
        readings = [shapes.analyze_video(v) for v in videos]
        scores = {f"acc_{a}": float(np.mean([r[a] == t[a] for r, t in zip(readings, truth)])) for a in shapes.ATTRIBUTES}
        scores["acc_mean"] = float(np.mean(list(scores.values())))
        return scores

    return probe


# ---------------------------------------------------------------- model directories


def save_pruned(source_pipe, transformer: nn.Module, out: str | os.PathLike, record: dict,
                recovery_log: Path | None = None) -> Path:
    """A complete model directory: the source's autoencoder, text encoder settings and extras, the pruned
    denoiser (bf16 on disk, as `save_bundle` writes), `training/prune.json` and the recovery log."""
    from ..pipeline import model_version

    if source_pipe.path is None:
        raise ConfigError("the source pipeline was not loaded from a model directory")
    source, out = Path(source_pipe.path), Path(out)
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out must differ from the source model directory {source}")
    index = {k: v for k, v in source_pipe.index.items() if k != "version"}  # the version is the new weights' hash
    index.update(name=out.name, pruned_from={"name": index.get("name", source.name),
                                             "version": model_version(source, source_pipe.index)},
                 pruning={k: record[k] for k in ("ratio", "heads", "mlp_hidden_size", "parameters", "recovery")})
    with atomic_directory(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("transformer", "README.md", "*.tmp", "*.old"))
        copy.deepcopy(transformer).to(torch.bfloat16).save_pretrained(tmp / "transformer")
        config_file = tmp / "transformer" / "config.json"  # diffusers records where the weights came from: a local path
        config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                           if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
        (tmp / "training").mkdir(exist_ok=True)
        (tmp / "training" / PRUNE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if recovery_log is not None and Path(recovery_log).is_file():
            shutil.copyfile(recovery_log, tmp / "training" / RECOVERY_LOG)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card_note(index, record))
    return out


def model_card_note(index: dict, record: dict) -> str:
    p, r = record["parameters"], record["recovery"]
    last_eval = r.get("last_eval") or {}
    watch = ", ".join(f"{k.removeprefix('acc_')} {v:.2f}" for k, v in last_eval.items()) or "not measured"
    return "\n".join([
        f"# {index['name']} — structurally pruned from {index['pruned_from']['name']} "
        f"({index['pruned_from']['version']})",
        "",
        f"Made by {_made_by(record, 'vidiffuse prune', 'compress/prune.py')}: every DiT block keeps {record['heads']} attention heads "
        f"(self- and cross-attention, head size unchanged) and {record['mlp_hidden_size']} MLP channels, chosen by "
        f"their output energy on {record['calibration']['samples']} noised "
        f"{'teacher samples' if record.get('recipe') else 'training latents'}; "
        f"{p['before']:,} → {p['after']:,} denoiser parameters ({p['removed_share']:.1%} fewer). "
        f"Then {r['steps_done']} recovery steps × batch {r['batch_size']} distilling the source model's velocity "
        f"(EMA {r['ema_decay']}).",
        "",
        "Same world, prompts, sampling defaults, autoencoder and text encoder as the source model; its intended use "
        "and limitations apply unchanged. Still a plain `VideoDiT`: `vidiffuse generate --model <this folder>`.",
        "",
        f"- Adherence on the recovery watch set ({r.get('eval_prompts', '?')} prompts) at the last step: {watch}.",
        "- `training/prune.json`: what was kept and why; "
        f"`training/{'gpu_compress_log.jsonl' if record.get('recipe') else RECOVERY_LOG}`: the recovery run.",
        "",
    ])


def _made_by(record: dict, command: str, module: str) -> str:
    """Who made a derived model: the command, or the recipe that ran its methods elsewhere (a GPU script)."""
    recipe = record.get("recipe")
    if recipe:
        return f"`{recipe['script']}` on one {recipe['device']}, with the methods of `{command}` (`{module}`)"
    return f"`{command}` (`{module}`)"


BUNDLED_PRUNED = "shapes-pruned"


def derived_model(pipe, model: str | os.PathLike, kind: str, process: str) -> tuple[Path, dict]:
    """The directory and model_index.json of a model made from `pipe`'s own model by `vidiffuse prune` or
    `distill` (`kind` "pruned" or "distilled": its index says `<kind>_from`), for a bench variant that swaps
    its parts into `pipe`. Refused when `pipe`'s denoiser was already quantized or compiled (the swap would
    silently drop that) and when the model was made from another one (the comparison would be wrong)."""
    from ..pipeline import resolve_model_path

    current = pipe.transformer
    if getattr(current, "quantization", None) or getattr(current, "_compiled_call_impl", None) is not None:
        raise ConfigError(f"{process} replaces the denoiser, so it comes first: e.g. {kind}+int8, not int8+{kind}")
    path = resolve_model_path(model)
    index = json.loads((path / "model_index.json").read_text())
    origin = index.get(f"{kind}_from")
    if not origin:
        raise ConfigError(f"{path} is not a {kind} model (no '{kind}_from' in its model_index.json)")
    if origin.get("version") != pipe.version:
        raise ConfigError(f"{path.name} was {kind} from {origin.get('name')}@{origin.get('version')}, "
                          f"not from {pipe.name}@{pipe.version}")
    return path, index


def pruned_transformer_for(pipe, model: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """The denoiser of a pruned model directory (default: the bundled `shapes-pruned`), checked to have been
    pruned from `pipe`'s own model, to run in `pipe` in place of the full one (the bench's `pruned` variant).

    Returns it with what to report: the pruned model's folder and its share of fewer parameters.
    """
    from ..models.transformer import VideoDiT

    path, _ = derived_model(pipe, model or BUNDLED_PRUNED, "pruned", "pruning")
    transformer = VideoDiT.from_pretrained(path / "transformer", torch_dtype=torch.float32).eval()
    full, kept = parameter_count(pipe.transformer), parameter_count(transformer)
    return transformer, {"model": path.name, "parameters": kept, "fewer_parameters": 1 - kept / full}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def prune_model(model: str | os.PathLike | None, out: str | os.PathLike, ratio: float = 0.25, heads: int | None = None,
                recovery: dict | None = None, data: dict | None = None, work_dir: str | os.PathLike | None = None,
                resume: bool = False, time_limit_s: float | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Prune a model directory's denoiser, recover it and write a new model directory at `out`.

    The intermediate state lives in `work_dir` (default `<out>.work`): the recovery data cache, the pruned
    model before recovery (`unrecovered/`, a full model directory, for comparison) and the recovery
    checkpoint. Returns a report; `report["finished"]` is False when `time_limit_s` stopped the recovery
    (then `out` is not written: rerun with `resume=True`).
    """
    from ..models.transformer import VideoDiT
    from ..pipeline import VideoPipeline, resolve_model_path

    ratio = check_ratio(ratio)
    say = progress or (lambda message: None)
    run = {**DEFAULT_RECOVERY, **(recovery or {})}
    if int(run["steps"]) < 0:
        raise ConfigError(f"recovery steps must be 0 or more, got {run['steps']}")
    data_cfg = {**DEFAULT_DATA, **(data or {})}
    source = resolve_model_path(model)
    pipe = VideoPipeline.from_pretrained(source)
    if pipe.index.get("quantization"):
        raise ConfigError(f"{source} is quantized ({pipe.index['quantization']}); prune the float model, then quantize")
    if not isinstance(pipe.transformer, VideoDiT):
        raise ConfigError(f"pruning works on vidiffuse's VideoDiT, not {type(pipe.transformer).__name__}")
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    teacher = pipe.transformer.float().eval()
    shape = plan_shape(teacher, ratio, heads)
    say(f"keeping {shape.heads} of {teacher.config.num_heads} heads and {shape.mlp_hidden_size} of "
        f"{_mlp_hidden(_config(teacher))} MLP channels per block")
    say(f"encoding {data_cfg['num_clips']} shapes-world clips for calibration and recovery (cached in {work})")
    latents = recovery_data(pipe, data_cfg, work / "cache")
    empty = pipe.text_encoder.encode([""])
    unrecovered_dir = work / "unrecovered"
    calib = {"batches": 8, "batch_size": 32, "seed": 1234}
    if resume and (unrecovered_dir / "model_index.json").is_file():
        student = VideoDiT.from_pretrained(unrecovered_dir / "transformer", torch_dtype=torch.float32)
        saved = PruneShape(student.config.num_heads, student.config.mlp_hidden_size)
        if saved != shape:
            raise ConfigError(f"{work} holds a run pruned to {saved}, not {shape}; use another work folder")
        kept = json.loads((unrecovered_dir / "training" / PRUNE_RECORD).read_text())["kept"]
    else:
        if (work / "checkpoint").exists() and not resume:
            raise ConfigError(f"{work} already holds a recovery run; pass --resume to continue it or choose another")
        say("scoring heads and channels on calibration batches")
        scores = importance_scores(teacher, calibration_batches(latents, empty, calib["batches"], calib["batch_size"],
                                                                calib["seed"]))
        student = prune_transformer(teacher, shape, scores)
        kept = [{name: _top(s[name], shape.heads if name != "mlp" else shape.mlp_hidden_size).tolist()
                 for name in ("attn", "cross_attn", "mlp")} for s in scores]
    before, after = parameter_count(teacher), parameter_count(student)
    record = {"format": FORMAT, "ratio": ratio, "heads": shape.heads, "mlp_hidden_size": shape.mlp_hidden_size,
              "criterion": "output energy (adaLN gate included) on calibration batches",
              "calibration": {**calib, "samples": calib["batches"] * calib["batch_size"], "data": data_cfg},
              "parameters": {"before": before, "after": after, "removed_share": 1 - after / before},
              "kept": kept,
              "recovery": {k: run[k] for k in ("steps", "batch_size", "lr", "ema_decay", "p_uncond", "eval_prompts")}
              | {"method": "velocity distillation from the source model (MSE)", "data": data_cfg, "steps_done": 0}}
    if not (unrecovered_dir / "model_index.json").is_file():
        save_pruned(pipe, student, unrecovered_dir, record)
    probe = adherence_probe(pipe, int(run["eval_prompts"])) if run["eval_prompts"] else None
    finished = True
    log = work / RECOVERY_LOG
    if probe is not None and int(run["steps"]) > 0 and not log.exists():
        say("scoring the source model on the watch set, for reference")
        work.mkdir(parents=True, exist_ok=True)
        write_atomic(log, json.dumps({"step": 0, "teacher_eval": probe(teacher)}) + "\n")
    if int(run["steps"]) > 0:
        student, finished = recover(student, teacher, latents, empty, work, run, evaluate=probe, resume=resume,
                                    time_limit_s=time_limit_s, progress=say)
    report = {"source": str(source), "out": str(out), "work_dir": str(work), "finished": finished,
              "heads": shape.heads, "mlp_hidden_size": shape.mlp_hidden_size, "parameters": record["parameters"]}
    if not finished:
        return report
    evals = [r["eval"] for r in _read_jsonl(log) if "eval" in r]
    record["recovery"].update(steps_done=int(run["steps"]), last_eval=evals[-1] if evals else None)
    save_pruned(pipe, student, out, record, recovery_log=log)
    report.update(denoiser_bytes={"before": _dir_bytes(source / "transformer"), "after": _dir_bytes(out / "transformer")},
                  last_eval=record["recovery"]["last_eval"], first_eval=evals[0] if evals else None)
    return report


def _read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def format_report(report: dict) -> str:
    p = report["parameters"]
    lines = [f"pruned {report['source']}: {report['heads']} heads and {report['mlp_hidden_size']} MLP channels per block",
             f"denoiser parameters: {p['before']:,} -> {p['after']:,} ({p['removed_share']:.1%} fewer)"]
    if not report["finished"]:
        lines.append(f"recovery stopped by the time limit; rerun with --resume (state in {report['work_dir']})")
        return "\n".join(lines)
    b = report["denoiser_bytes"]
    lines.append(f"denoiser on disk: {b['before'] / 1e6:.1f} MB -> {b['after'] / 1e6:.1f} MB")
    for label, key in (("watch-set adherence before recovery", "first_eval"), ("after recovery", "last_eval")):
        if report.get(key):
            lines.append(f"{label}: " + ", ".join(f"{k.removeprefix('acc_')} {v:.2f}" for k, v in report[key].items()))
    lines.append(f"wrote {report['out']}")
    return "\n".join(lines)
