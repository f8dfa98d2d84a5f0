"""The few-step student and the pruned denoiser of the bundled model, trained on one CUDA GPU in minutes
(the same methods as `vidiffuse distill` and `vidiffuse prune`, at a scale a 2-core CPU cannot reach).

    python scripts/gpu_compress.py --prompt-table .gpu/prompts.safetensors --pairs 49152   # CPU: caption embeddings
    python3 scripts/gpu_compress.py --prompts .gpu/prompts.safetensors --out OUT            # GPU (PYTHONPATH=src)
    python scripts/gpu_compress.py --distilled-from OUT --pruned-from OUT                   # CPU: model directories

The shipped models came from two device runs (their logs are in each model's training/ folder):
`--student-seconds 170 --prune-seconds 170` gave shapes-pruned; `--pairs 12288 --student-seconds 45
--dmd-seconds 380 --dmd-lr 5e-5 --prune-seconds 0` gave shapes-distilled's student, the EMA half-way through
its distribution matching (`--distilled-from OUT --half`), chosen by `scripts/score_student.py`.

1. Teacher pairs: the teacher (the bundled `shapes` denoiser, at its defaults: UniPC, 20 steps, guidance 4)
   samples x₀ for `--pairs` seeded noises and the captions the prompt reader writes for the denoiser
   (`shapes.plain_caption`, attributes left unsaid as in training); the last `--held-out` pairs are scored,
   never trained on.
2. Student (reflow, as `compress/distill.py` explains): from the teacher's weights, MSE on v = z − x₀ at
   x_t on the straight path, t on the 2-step Euler grid for 75 % of a batch and logit-normal for the rest.
   Then, with `--dmd-seconds`, distribution matching (`distribution_matching`): reflow's regression alone
   gives the average of what the teacher might draw from nearby noise, and a blurred outline reads as the
   wrong shape; DMD pulls each sample towards where the guided teacher puts probability mass.
3. Pruned: `plan_shape(ratio, heads)` sizes, units chosen by `importance_scores` on noised teacher samples,
   then recovery by velocity distillation from the teacher (as `compress/prune.py` explains), half the
   batch at the pair's own noise (near the guided trajectories sampling visits), half at fresh noise; 10 %
   empty prompts, for guidance.
Both runs are given wall-clock budgets; their step counts follow from the speed measured in their first
steps, and both keep an EMA of the weights. Scored on the held-out pairs: the latent MSE between each
model's samples (at its own settings) and the teacher's, at the start and as it trains.

The device has no text encoder weights and no network, so the embeddings of every caption the pairs use
travel in the prompt table (the embeddings of 2,017 captions: all the world's plain captions).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vidiffuse.compress.distill import distribution_matching_loss, student_grid
from vidiffuse.compress.prune import _lr, _top, importance_scores, parameter_count, plan_shape, prune_transformer
from vidiffuse.diffusion.flow import interpolate
from vidiffuse.diffusion.sampling import make_scheduler, sample
from vidiffuse.models.transformer import VideoDiT

TEACHER = Path(__file__).resolve().parents[1] / "src" / "vidiffuse" / "weights" / "shapes"
STUDENT_STEPS = 2
PART_BYTES = 14 << 20  # the device returns files of at most 16 MiB: weights travel in parts


class Pairs:
    def __init__(self, table: dict, n: int, dev: torch.device):
        self.tokens, self.pooled = table["tokens"].to(dev), table["pooled"].to(dev)
        self.mask = table["mask"].to(dev).bool()
        self.prompt = table["pair_prompt"][:n].to(dev)
        self.n = n
        self.noise = self.x0 = None

    def uncond(self, idx: torch.Tensor) -> dict:
        return self.cond(idx, torch.ones_like(idx, dtype=torch.bool))

    def cond(self, idx: torch.Tensor, drop: torch.Tensor | None = None) -> dict:
        p = self.prompt[idx]
        if drop is not None:
            p = torch.where(drop, torch.zeros_like(p), p)  # caption 0 is the empty prompt
        return {"encoder_hidden_states": self.tokens[p], "encoder_attention_mask": self.mask[p],
                "pooled_projections": self.pooled[p]}


class Log:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **record) -> None:
        print(json.dumps(record, default=str), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16)


@torch.no_grad()
def teacher_pairs(teacher, pairs: Pairs, batch: int, seed: int, dev: torch.device) -> None:
    c = teacher.config
    gen = torch.Generator(dev).manual_seed(seed)
    pairs.noise = torch.randn((pairs.n, c.in_channels, c.sample_frames, c.sample_size, c.sample_size), generator=gen,
                              device=dev)
    pairs.x0 = torch.empty_like(pairs.noise, dtype=torch.bfloat16)
    for s in range(0, pairs.n, batch):
        idx = torch.arange(s, min(pairs.n, s + batch), device=dev)
        with autocast(dev):
            pairs.x0[idx] = sample(teacher, pairs.noise[idx], pairs.cond(idx), pairs.uncond(idx),
                                   make_scheduler("unipc", 1.0), 20, 4.0).to(torch.bfloat16)


@torch.no_grad()
def sample_error(model, pairs: Pairs, held: torch.Tensor, dev: torch.device, steps: int, guidance: float,
                 sampler: str) -> float:
    """Latent MSE between `model`'s samples at these settings and the teacher's, on the held-out pairs."""
    total = 0.0
    for chunk in held.split(256):
        uncond = pairs.uncond(chunk) if guidance != 1 else None
        with autocast(dev):
            x = sample(model, pairs.noise[chunk], pairs.cond(chunk), uncond, make_scheduler(sampler, 1.0), steps, guidance)
        total += float((x.float() - pairs.x0[chunk].float()).pow(2).sum())
    return total / (len(held) * pairs.x0[0].numel())


def train(model, loss_fn, seconds: float, lr: float, evaluate, log: Log, name: str, dev: torch.device,
          ema_decay: float = 0.999) -> tuple[torch.nn.Module, int]:
    """AdamW with warmup and cosine decay over as many steps as `seconds` allows at the speed of steps 10–40."""
    model.train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    run = {"lr": lr, "warmup": 100, "min_lr_ratio": 0.1, "steps": 10**9}
    log(phase=name, step=0, **evaluate(ema))
    began, step, marks = time.perf_counter(), 0, {}
    params, ema_params = list(model.parameters()), list(ema.parameters())
    while step < run["steps"]:
        if step in (10, 40):
            torch.cuda.synchronize() if dev.type == "cuda" else None
            marks[step] = time.perf_counter()
            if step == 40:
                rate = 30 / (marks[40] - marks[10])
                run["steps"] = max(100, 40 + int((seconds - (marks[40] - began)) * rate))
                log(phase=name, steps_per_s=rate, planned_steps=run["steps"])
        for group in opt.param_groups:
            group["lr"] = _lr(step, run)
        with autocast(dev):
            loss = loss_fn(model, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(ema_decay, (1 + step) / (10 + step)))
        step += 1
        if step % 200 == 0:
            log(phase=name, step=step, loss=float(loss), lr=_lr(step, run))
        if step > 40 and step in {run["steps"] * k // 4 for k in (1, 2, 3, 4)}:
            log(phase=name, step=step, seconds=time.perf_counter() - began, **evaluate(ema))
    return ema, step


def distribution_matching(student, teacher, pairs: Pairs, held, draw, gen, args, log: Log, dev, out: Path):
    """`distribution_matching_loss` (DMD, as `compress/distill.py` explains) against the teacher at guidance 4,
    with the fake velocity model starting as the teacher. The EMA half-way is kept too (`dmd-half`; the device
    returns 64 MiB, two models): the held-out MSE to the teacher's samples cannot say which one draws shapes
    best, so both are scored by the evaluation suite afterwards."""
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=args.fake_lr, betas=(0.9, 0.99), weight_decay=0.0)

    def loss_fn(model, step):
        idx = draw(args.dmd_batch)
        loss, parts = distribution_matching_loss(model, teacher, fake, fake_opt, pairs.noise[idx], pairs.cond(idx),
                                                 pairs.uncond(idx), pairs.x0[idx], STUDENT_STEPS, 4.0,
                                                 args.dmd_regression, gen)
        if step % 100 == 0:
            log(phase="dmd", step=step, **parts)
        return loss

    quarters = iter(range(5))

    def evaluate(model):
        if next(quarters) == 2:
            save_parts(model, out, "dmd-half", with_config=False)
        return {"sample_mse": sample_error(model, pairs, held, dev, STUDENT_STEPS, 1.0, "euler")}

    student, steps = train(student, loss_fn, args.dmd_seconds, args.dmd_lr, evaluate, log, "dmd", dev, ema_decay=0.995)
    log(phase="dmd", done_steps=steps, batch=args.dmd_batch)
    return student


def save_parts(model, out: Path, name: str, with_config: bool = True) -> None:
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    parts, part, size = [], {}, 0
    for k, v in state.items():
        if part and size + v.numel() * 2 > PART_BYTES:
            parts.append(part)
            part, size = {}, 0
        part[k], size = v, size + v.numel() * 2
    parts.append(part)
    for i, p in enumerate(parts):
        save_file(p, out / f"{name}-{i}.safetensors")
    if with_config:
        (out / f"{name}.json").write_text(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}, indent=1))


def load_parts(folder: Path, name: str, config_name: str | None = None) -> VideoDiT:
    config = json.loads((folder / f"{config_name or name}.json").read_text())
    model = VideoDiT.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = {}
    for part in sorted(folder.glob(f"{name}-[0-9]*.safetensors")):
        state.update(load_file(part))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def run_device(args) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.jsonl")
    log(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, args=vars(args))
    teacher = VideoDiT.from_pretrained(TEACHER / "transformer", torch_dtype=torch.float32).to(dev).eval().requires_grad_(False)
    n = args.pairs + args.held_out
    pairs = Pairs(load_file(args.prompts), n, dev)
    began = time.perf_counter()
    teacher_pairs(teacher, pairs, args.sample_batch, args.seed, dev)
    log(phase="pairs", pairs=n, seconds=time.perf_counter() - began)
    held = torch.arange(args.pairs, n, device=dev)
    gen = torch.Generator(dev).manual_seed(args.seed + 1)
    B = args.batch

    def draw(size):
        return torch.randint(args.pairs, (size,), device=dev, generator=gen)

    # the student
    grid = student_grid(STUDENT_STEPS).to(dev)

    def reflow_loss(model, step):
        idx = draw(B)
        t = torch.where(torch.rand(B, device=dev, generator=gen) < 0.75,
                        grid[torch.randint(len(grid), (B,), device=dev, generator=gen)],
                        torch.sigmoid(torch.randn(B, device=dev, generator=gen)))
        x0, z = pairs.x0[idx].float(), pairs.noise[idx]
        v = model(interpolate(x0, z, t), t * 1000, **pairs.cond(idx)).sample.float()
        return (v - (z - x0)).pow(2).mean()

    student = copy.deepcopy(teacher)
    student, steps = train(student, reflow_loss, args.student_seconds, args.student_lr,
                           lambda m: {"sample_mse": sample_error(m, pairs, held, dev, STUDENT_STEPS, 1.0, "euler")},
                           log, "student", dev)
    if args.dmd_seconds <= 0:
        save_parts(student, out, "student")
    log(phase="student", done_steps=steps, batch=B)
    if args.dmd_seconds > 0:
        student = distribution_matching(student, teacher, pairs, held, draw, gen, args, log, dev, out)
        save_parts(student, out, "dmd")
    del student
    if args.prune_seconds <= 0:
        return

    # the pruned denoiser
    def noised(size, own_noise_share=0.5):
        idx = draw(size)
        t = torch.sigmoid(torch.randn(size, device=dev, generator=gen))
        z = torch.where((torch.rand(size, device=dev, generator=gen) < own_noise_share)[:, None, None, None, None],
                        pairs.noise[idx], torch.randn(pairs.noise[idx].shape, device=dev, generator=gen))
        drop = torch.rand(size, device=dev, generator=gen) < 0.1
        return {"hidden_states": interpolate(pairs.x0[idx].float(), z, t), "timestep": t * 1000, **pairs.cond(idx, drop)}

    shape = plan_shape(teacher, args.ratio, args.heads)
    scores = importance_scores(teacher, (noised(128) for _ in range(8)))
    scores = [{k: v.float().cpu() for k, v in s.items()} for s in scores]
    pruned = prune_transformer(copy.deepcopy(teacher).cpu(), shape, scores).to(dev)
    kept = [{k: _top(s[k], shape.heads if k != "mlp" else shape.mlp_hidden_size).tolist() for k in ("attn", "cross_attn", "mlp")}
            for s in scores]
    (out / "prune.json").write_text(json.dumps({"ratio": args.ratio, "heads": shape.heads,
                                                "mlp_hidden_size": shape.mlp_hidden_size, "kept": kept,
                                                "parameters": {"before": parameter_count(teacher),
                                                               "after": parameter_count(pruned)}}))

    def kd_loss(model, step):
        batch = noised(B)
        with torch.no_grad():
            target = teacher(**batch).sample.float()
        return (model(**batch).sample.float() - target).pow(2).mean()

    pruned, steps = train(pruned, kd_loss, args.prune_seconds, args.prune_lr,
                          lambda m: {"sample_mse": sample_error(m, pairs, held, dev, 20, 4.0, "unipc")}, log, "pruned", dev)
    save_parts(pruned, out, "pruned")
    log(phase="pruned", done_steps=steps, batch=B, shape=[shape.heads, shape.mlp_hidden_size])


def _device_run(folder: Path) -> dict:
    """What a model's record says of the device run in `folder` (script, device, settings, step counts, held-out MSE)."""
    events = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    curves = {}
    for e in events:
        if "sample_mse" in e:
            curves.setdefault(e["phase"], []).append([e["step"], e["sample_mse"]])
    return {"script": "scripts/gpu_compress.py", "device": events[0]["device"], "torch": events[0]["torch"],
            "args": events[0]["args"], "held_out_sample_mse": curves,
            "steps": {e["phase"]: e["done_steps"] for e in events if "done_steps" in e},
            "seconds": {e["phase"]: e["seconds"] for e in events if "seconds" in e}}


def assemble_distilled(folder: Path, out: Path, decoder_steps: int, half: bool) -> None:
    """The distilled model directory of a device run: its last student (after distribution matching when the run
    did it; with `half`, the one half-way through it), and a TinyDecoder trained here on clips and on that
    student's samples (`train_decoder`)."""
    from vidiffuse.compress import distill, prune
    from vidiffuse.pipeline import VideoPipeline

    recipe = _device_run(folder)
    args = recipe["args"]
    pipe = VideoPipeline.from_pretrained(TEACHER)
    last = "dmd" if (folder / "dmd.json").is_file() else "student"
    steps = recipe["steps"][last]
    if half:
        student = load_parts(folder, "dmd-half", config_name="dmd")
        recipe["planned_steps"] = {"dmd": steps}
        steps = recipe["held_out_sample_mse"]["dmd"][2][0]  # the evaluations: the start, then each quarter
        recipe["steps"]["dmd"] = steps
    else:
        student = load_parts(folder, last)
    run = {**distill.DEFAULT_RUN, "pairs": args["pairs"], "student_steps": STUDENT_STEPS, "seed": args["seed"],
           "steps": steps, "batch_size": args["dmd_batch" if last == "dmd" else "batch"],
           "lr": args[f"{last}_lr"], "warmup": 100, "ema_decay": 0.995 if last == "dmd" else 0.999, "grid_share": 0.75,
           "decoder_steps": decoder_steps}
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    decoder = distill.train_decoder(pipe, prune.DEFAULT_DATA, run, work, False, print,
                                    distill.student_decoder_data(pipe, student, run))
    log_copy = work / "gpu_compress_log.jsonl"
    shutil.copyfile(folder / "log.jsonl", log_copy)
    probe = prune.adherence_probe(distill._with_defaults(pipe, distill.student_defaults(run)))
    method = "guided rectified-flow distillation (reflow)" + (", then distribution matching (DMD)" if last == "dmd" else "")
    if half:
        method += f" stopped half-way ({steps} of a {recipe['planned_steps']['dmd']}-step cosine schedule)"
    record = {"format": distill.FORMAT, "method": f"{method}, on a GPU", "recipe": recipe,
              "teacher": {"name": pipe.name, "version": pipe.version,
                          **{k: pipe.defaults[k] for k in ("steps", "guidance", "sampler")}},
              "student": distill.student_defaults(run), "run": run, "decoder_data": prune.DEFAULT_DATA,
              "seconds": {**recipe["seconds"], "decoder": time.perf_counter() - started},
              "student_last_eval": probe(student), "untrained_student_eval": probe(pipe.transformer.float()),
              "decoder_last_eval": distill._last_eval(work / distill.DECODER_LOG)}
    distill.save_distilled(pipe, student, decoder, out, record, logs=[work / distill.DECODER_LOG, log_copy])


def assemble_pruned(folder: Path, out: Path) -> None:
    """The pruned model directory of a device run, as `vidiffuse prune` writes one."""
    from vidiffuse.compress import prune
    from vidiffuse.pipeline import VideoPipeline

    recipe = _device_run(folder)
    args = recipe["args"]
    pipe = VideoPipeline.from_pretrained(TEACHER)
    shape = json.loads((folder / "prune.json").read_text())
    pruned = load_parts(folder, "pruned")
    params = shape["parameters"]
    recovery = {"steps": recipe["steps"]["pruned"], "batch_size": args["batch"], "lr": args["prune_lr"],
                "ema_decay": 0.999, "p_uncond": 0.1, "eval_prompts": 32, "steps_done": recipe["steps"]["pruned"],
                "method": "velocity distillation from the source model (MSE), on noised teacher samples",
                "last_eval": prune.adherence_probe(pipe)(pruned)}
    record = {"format": prune.FORMAT, "ratio": shape["ratio"], "heads": shape["heads"],
              "mlp_hidden_size": shape["mlp_hidden_size"],
              "criterion": "output energy (adaLN gate included) on calibration batches",
              "calibration": {"batches": 8, "batch_size": 128, "samples": 1024,
                              "data": "noised teacher samples (the distillation pairs), 10 % empty prompts"},
              "parameters": {**params, "removed_share": 1 - params["after"] / params["before"]}, "kept": shape["kept"],
              "recovery": recovery, "recipe": recipe}
    prune.save_pruned(pipe, pruned, out, record, recovery_log=None)
    shutil.copyfile(folder / "log.jsonl", out / "training" / "gpu_compress_log.jsonl")


def prompt_table(path: Path, pairs: int, held_out: int, seed: int) -> None:
    """The text encoder's embeddings of every caption the pairs use (index 0: the empty prompt, for guidance),
    cut to the longest caption's tokens (the denoiser masks the rest), and each pair's caption index."""
    from vidiffuse.compress.distill import plain_captions
    from vidiffuse.pipeline import VideoPipeline

    captions, index, pair_caption = [""], {"": 0}, []
    for caption in plain_captions(pairs + held_out, seed, 0xD157):
        pair_caption.append(index.setdefault(caption, len(captions)))
        if pair_caption[-1] == len(captions):
            captions.append(caption)
    emb = VideoPipeline.from_pretrained(TEACHER).text_encoder.encode(captions)
    longest = int(emb.mask.sum(1).max())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": emb.tokens[:, :longest].to(torch.bfloat16).contiguous(),
               "mask": emb.mask[:, :longest].to(torch.uint8).contiguous(),
               "pooled": emb.pooled.to(torch.bfloat16).contiguous(), "pair_prompt": torch.tensor(pair_caption)}, path)
    print(f"{len(captions)} captions, {longest} tokens at most: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-table", type=Path, help="write the caption embeddings the device run reads")
    parser.add_argument("--prompts", type=Path, default=Path(".gpu/prompts.safetensors"))
    parser.add_argument("--out", type=Path, help="the device run's output folder")
    parser.add_argument("--distilled-from", type=Path, help="a device run's output folder: write its distilled model")
    parser.add_argument("--pruned-from", type=Path, help="a device run's output folder: write its pruned model")
    parser.add_argument("--distilled-out", type=Path, default=Path("runs/shapes-distilled-gpu"))
    parser.add_argument("--decoder-steps", type=int, default=4500, help="the TinyDecoder's training steps")
    parser.add_argument("--half", action="store_true",
                        help="with --distilled-from: the student half-way through distribution matching (dmd-half)")
    parser.add_argument("--pruned-out", type=Path, default=Path("runs/shapes-pruned-gpu"))
    parser.add_argument("--pairs", type=int, default=49152)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--sample-batch", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--student-seconds", type=float, default=180)
    parser.add_argument("--student-lr", type=float, default=2e-4)
    parser.add_argument("--prune-seconds", type=float, default=180)
    parser.add_argument("--prune-lr", type=float, default=4e-4)
    parser.add_argument("--dmd-seconds", type=float, default=0, help="then distribution matching, this long")
    parser.add_argument("--dmd-batch", type=int, default=256)
    parser.add_argument("--dmd-lr", type=float, default=3e-5)
    parser.add_argument("--fake-lr", type=float, default=1e-4)
    parser.add_argument("--dmd-regression", type=float, default=0.25)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompt_table:
        prompt_table(args.prompt_table, args.pairs, args.held_out, args.seed)
    elif args.distilled_from or args.pruned_from:
        if args.distilled_from:
            assemble_distilled(args.distilled_from, args.distilled_out, args.decoder_steps, args.half)
        if args.pruned_from:
            assemble_pruned(args.pruned_from, args.pruned_out)
    elif args.out:
        run_device(args)
    else:
        parser.error("give --out (on the GPU), or --distilled-from / --pruned-from (after it)")


if __name__ == "__main__":
    main()
