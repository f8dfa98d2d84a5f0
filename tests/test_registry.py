"""Model registry: immutable versions, eval-gated promotion, rollback, audit log, concurrent writers, CLI."""

import json
import multiprocessing
import threading

import pytest
from typer.testing import CliRunner

from conftest import ROOT, run_cli
from vidiffuse.cli import app
from vidiffuse.errors import ConfigError, ModelLoadError, VidiffuseError
from vidiffuse.pipeline import model_version
from vidiffuse.registry import ModelRegistry, PromotionRefused, RegistryError

BASELINE = ROOT / "benchmarks" / "results" / "eval-shapes" / "report.json"  # the bundled model's real report
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
MANIFEST_SHA = "ab" * 32


def fake_model(path, weights=b"weights-1"):
    """A model directory as far as the registry looks: an index, denoiser weights (hashed for the version), a vae."""
    (path / "transformer").mkdir(parents=True)
    (path / "vae").mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "VideoPipeline", "name": "fake", "frames": 16,
                                                       "size": 64, "fps": 8, "training_data_manifest_sha256": MANIFEST_SHA}))
    (path / WEIGHTS).write_bytes(weights)
    (path / "vae" / "config.json").write_text("{}")
    return path


def report_file(path, scale: dict | None = None, **fields):
    """The real report with some metrics scaled (e.g. adherence_mean=0.9 for 10% worse) and top-level fields replaced."""
    report = json.loads(BASELINE.read_text())
    for name, factor in (scale or {}).items():
        report["metrics"][name] *= factor
    report.update(fields)
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def reg(tmp_path):
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def src(tmp_path):
    return fake_model(tmp_path / "src")


def test_register_copies_the_model_and_records_its_provenance(reg, src, tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# demo card\n")
    report = report_file(tmp_path / "report.json")
    mv = reg.register("demo", src, eval_report=report, card=card, description="first", tags={"stage": "dev"})
    assert (mv.name, mv.version, mv.description, mv.tags, mv.aliases) == ("demo", 1, "first", {"stage": "dev"}, ())
    assert mv.path.is_relative_to(reg.root) and (mv.path / WEIGHTS).read_bytes() == b"weights-1"
    assert mv.model_version == model_version(src) and mv.training_data_manifest_sha256 == MANIFEST_SHA
    assert mv.card.read_text() == "# demo card\n" and mv.eval_report.read_bytes() == report.read_bytes()
    assert len(mv.content_sha256) == 64 and mv.source == str(src.resolve())

    # editing the source afterwards changes nothing registered; registering it again makes version 2
    (src / WEIGHTS).write_bytes(b"weights-2")
    assert reg.get("demo", 1).model_version == mv.model_version
    assert (reg.get("demo", 1).path / WEIGHTS).read_bytes() == b"weights-1" and reg.verify("demo", 1) == []
    mv2 = reg.register("demo", src)
    assert mv2.version == 2 and mv2.model_version == model_version(src) != mv.model_version
    assert mv2.eval_report is None and mv2.card is None
    assert [v.version for v in reg.versions("demo")] == [1, 2] and reg.models() == ["demo"]

    # an edit inside the registry is caught
    weights = reg.get("demo", 1).path / WEIGHTS
    weights.chmod(0o644)
    weights.write_bytes(b"tampered")
    assert reg.verify("demo", 1) == [f"changed: {WEIGHTS}"] and reg.verify("demo", 2) == []

    # a bundled model by name, with the directory's own README as its card
    shapes = reg.register("shapes", "shapes")
    assert shapes.card == shapes.path / "README.md"
    assert shapes.model_version == model_version(ROOT / "src" / "vidiffuse" / "weights" / "shapes")
    assert [e["action"] for e in reg.audit()] == ["register"] * 3 and len(reg.audit("demo")) == 2


def test_bad_input_is_refused_and_leaves_nothing_behind(reg, src, tmp_path):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    not_a_report = tmp_path / "nope.json"
    not_a_report.write_text('{"hello": 1}')
    with pytest.raises(ModelLoadError, match="no vidiffuse model"):
        reg.register("demo", tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="model_index.json missing"):
        reg.register("demo", tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        reg.register("demo", broken)
    for bad_name in ("../escape", "", "a b", "x" * 65):
        with pytest.raises(RegistryError, match="invalid model name"):
            reg.register(bad_name, src)
    with pytest.raises(ConfigError, match="not a vidiffuse eval report"):
        reg.register("demo", src, eval_report=not_a_report)
    with pytest.raises(RegistryError, match="model card not found"):
        reg.register("demo", src, card=tmp_path / "no-card.md")
    with pytest.raises(RegistryError, match="measured model version"):  # a report of other weights
        reg.register("demo", src, eval_report=report_file(tmp_path / "r.json", model_version="0123456789ab"))
    assert reg.models() == [] and reg.audit() == [] and reg.resolve("demo") is None
    assert not (reg.root / "models").exists() and not any((reg.root / "staging").iterdir())

    reg.register("demo", src)
    with pytest.raises(RegistryError, match="no version 7"):
        reg.get("demo", 7)
    with pytest.raises(RegistryError, match="no registered model 'other'"):
        reg.versions("other")
    for reserved in ("latest", "v2", "bad alias"):
        with pytest.raises(RegistryError):
            reg.set_alias("demo", reserved, 1)


def test_promotion_is_gated_on_the_production_report(reg, src, tmp_path):
    reg.register("demo", src, eval_report=report_file(tmp_path / "base.json"))
    degraded = report_file(tmp_path / "degraded.json", scale={"adherence_mean": 0.9, "adherence_shape": 0.8})
    reg.register("demo", src, eval_report=degraded)
    better = report_file(tmp_path / "better.json", scale={"adherence_mean": 1.02, "fvd_shapes": 0.9})
    reg.register("demo", src, eval_report=better)
    reg.register("demo", src)  # version 4: no report
    reg.register("demo", src, eval_report=report_file(tmp_path / "n64.json", n=64))  # measured on fewer prompts

    first = reg.promote("demo", 1, actor="alice")
    assert first.aliases == ("production",) and reg.resolve("demo").version == 1
    assert reg.audit()[-1]["gate"]["baseline_version"] is None  # nothing on production to compare with

    with pytest.raises(PromotionRefused) as refused:
        reg.promote("demo", 2, actor="bob")
    assert [r.split(":")[0] for r in refused.value.reasons] == ["adherence_shape", "adherence_mean"]
    assert reg.resolve("demo").version == 1
    entry = reg.audit("demo")[-1]
    assert (entry["action"], entry["who"], entry["from"], entry["to"]) == ("promote_refused", "bob", 1, 2)
    assert entry["gate"]["reasons"] == refused.value.reasons and not entry["gate"]["passed"]

    with pytest.raises(PromotionRefused, match="no eval report"):
        reg.promote("demo", 4)
    with pytest.raises(PromotionRefused, match="measured differently.*n: 256 → 64"):
        reg.promote("demo", 5)
    assert reg.resolve("demo").version == 1

    assert reg.promote("demo", 3).version == 3 and reg.resolve("demo").version == 3
    gate = reg.audit()[-1]["gate"]
    assert (gate["baseline_version"], gate["passed"]) == (1, True)
    # a looser tolerance lets the degraded version through (2 is 12% and 20% worse than 3)
    with pytest.raises(PromotionRefused):
        reg.promote("demo", 2, tolerances={"*": 0.15})
    assert reg.promote("demo", 2, tolerances={"*": 0.25}).version == 2

    # force promotes a refused version, and the audit log says so
    reg.rollback("demo")
    assert reg.promote("demo", 4, force=True, actor="carol").aliases == ("production",)
    entry = reg.audit()[-1]
    assert (entry["action"], entry["forced"], entry["who"]) == ("promote", True, "carol")
    assert "no eval report" in entry["gate"]["reasons"][0]
    # promoting the version already there changes nothing
    n_entries = len(reg.audit())
    assert reg.promote("demo", 4).version == 4 and len(reg.audit()) == n_entries


def test_rollback_walks_the_alias_history(reg, src, tmp_path):
    report = report_file(tmp_path / "r.json")
    for _ in range(3):
        reg.register("demo", src, eval_report=report)
    with pytest.raises(RegistryError, match="no alias 'production'"):
        reg.rollback("demo")
    for v in (1, 2, 3):
        reg.promote("demo", v)
    reg.set_alias("demo", "candidate", 1)  # another alias has its own history
    assert reg.alias_history("demo") == [1, 2, 3] and reg.aliases("demo") == {"production": 3, "candidate": 1}

    assert reg.rollback("demo", actor="ops").version == 2 and reg.resolve("demo").version == 2
    assert reg.rollback("demo").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("demo")
    assert reg.resolve("demo").version == 1 and reg.resolve("demo", "candidate").version == 1
    moves = [(e["action"], e.get("alias"), e["from"], e["to"]) for e in reg.audit("demo") if e["action"] != "register"]
    assert moves == [("promote", "production", None, 1), ("promote", "production", 1, 2),
                     ("promote", "production", 2, 3), ("set_alias", "candidate", None, 1),
                     ("rollback", "production", 3, 2), ("rollback", "production", 2, 1)]
    assert reg.audit("demo")[-2]["who"] == "ops"
    assert all({"when", "who", "action", "model"} <= e.keys() for e in reg.audit())


def test_resolve_follows_changes_made_by_other_processes(reg, src):
    assert reg.resolve("demo") is None and reg.resolve("demo", "latest") is None
    reg.register("demo", src)
    reg.register("demo", src)
    other = ModelRegistry(reg.root)  # e.g. the CLI, while `reg` is the server's
    assert reg.resolve("demo") is None and reg.resolve("demo", "latest").version == 2
    other.set_alias("demo", "production", 1)
    assert reg.resolve("demo").version == 1
    other.set_alias("demo", "production", 2)
    assert reg.resolve("demo").version == 2 and reg.resolve("demo").aliases == ("production",)
    assert reg.resolve("unknown") is None and reg.resolve("demo", "nonexistent") is None


def _write_in_process(root, src, who, start):
    reg = ModelRegistry(root)
    start.wait()  # all writers at once, so that unserialized read-modify-writes would collide
    for i in range(2):
        reg.register("demo", src, actor=who)
    for i in range(15):
        reg.set_tag("demo", 1, f"{who}-{i}", str(i), actor=who)


def test_concurrent_writers_do_not_lose_or_corrupt_anything(reg, src):
    reg.register("demo", src)
    # fork: the children only copy files and write JSON, so they need none of the parent's torch state
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    writers = [ctx.Process(target=_write_in_process, args=(reg.root, src, f"w{k}", start)) for k in range(4)]
    for p in writers:
        p.start()
    start.set()
    for p in writers:
        p.join(60)
    assert [p.exitcode for p in writers] == [0] * 4
    versions = reg.versions("demo")
    assert [v.version for v in versions] == list(range(1, 10))
    assert len(versions[0].tags) == 4 * 15  # no update lost
    assert all(reg.verify("demo", v.version) == [] for v in versions)
    json.loads((reg.root / "registry.json").read_text())
    entries = [json.loads(line) for line in (reg.root / "audit.jsonl").read_text().splitlines()]
    assert len(entries) == 1 + 4 * 17
    assert sorted(e["version"] for e in entries if e["action"] == "register") == list(range(1, 10))
    assert sorted(e["who"] for e in entries if e["action"] == "set_tag") == sorted([f"w{k}" for k in range(4)] * 15)


def _flip(root, times):
    reg = ModelRegistry(root)
    for _ in range(times):
        reg.promote("demo", 2)
        reg.rollback("demo")


def test_readers_always_see_a_version_while_production_moves(reg, src, tmp_path):
    """What lets the server resolve before every job with no lock: never a missing or half-written state."""
    report = report_file(tmp_path / "r.json")
    reg.register("demo", src, eval_report=report)
    reg.register("demo", src, eval_report=report)
    reg.promote("demo", 1)
    writer = multiprocessing.get_context("fork").Process(target=_flip, args=(reg.root, 40))
    seen, errors = [], []

    def read():
        while writer.is_alive() or not seen:
            try:
                mv = ModelRegistry(reg.root).resolve("demo")  # a new instance per job, as the server does
                seen.append(None if mv is None else mv.version)
            except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                errors.append(e)

    writer.start()
    reader = threading.Thread(target=read)
    reader.start()
    writer.join(60)
    reader.join(60)
    assert writer.exitcode == 0 and errors == []
    assert set(seen) == {1, 2}, set(seen)
    assert reg.resolve("demo").version == 1 and len(reg.audit()) == 2 + 1 + 80


def test_promote_with_eval_measures_the_candidate_like_production(reg, tiny_bundle):
    reg.register("tiny", tiny_bundle)
    reg.register("tiny", tiny_bundle)
    first = reg.evaluate_version("tiny", 1, n=2)
    base = json.loads(first.eval_report.read_text())
    assert base["n"] == 2 and base["model_version"] == first.model_version
    # timings on a shared 2-core machine are not what this test is about: keep the quality metrics only
    for timing in ("seconds_per_video", "peak_memory_mb"):
        del base["metrics"][timing]
    quality_only = reg.root.parent / "quality.json"
    quality_only.write_text(json.dumps(base))
    reg.attach_report("tiny", 1, quality_only)
    reg.promote("tiny", 1)

    promoted = reg.promote("tiny", 2, evaluate=True)  # same weights, evaluated with version 1's settings
    assert promoted.version == 2 and reg.resolve("tiny").version == 2
    new = json.loads(promoted.eval_report.read_text())
    assert (new["n"], new["settings"], new["golden_set"]) == (2, base["settings"], base["golden_set"])
    assert {k: new["metrics"][k] for k in base["metrics"]} == base["metrics"]
    assert [e["action"] for e in reg.audit("tiny")] == ["register", "register", "attach_report", "attach_report",
                                                       "promote", "attach_report", "promote"]


def test_cli(tmp_path, monkeypatch, src):
    monkeypatch.setenv("VIDIFFUSE_HOME", str(tmp_path / "home"))
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [str(a) for a in args])

    good = report_file(tmp_path / "good.json")
    degraded = report_file(tmp_path / "degraded.json", scale={"adherence_mean": 0.9})
    assert cli("registry", "register", "demo", src, "--eval-report", good, "--tag", "stage=dev").exit_code == 0
    assert cli("registry", "register", "demo", src, "--eval-report", degraded, "--description", "worse").exit_code == 0
    assert cli("registry", "promote", "demo", 1).exit_code == 0

    refused = cli("registry", "promote", "demo", 2)
    assert refused.exit_code == 1 and "refused" in refused.stderr and "adherence_mean" in refused.stderr
    reg = ModelRegistry()
    assert reg.root == tmp_path / "home" / "registry" and reg.resolve("demo").version == 1

    assert cli("registry", "promote", "demo", 2, "--tolerance", "0.2").exit_code == 0
    assert reg.resolve("demo").version == 2
    listing = cli("registry", "list")
    mean = json.loads(BASELINE.read_text())["metrics"]["adherence_mean"]
    assert listing.exit_code == 0 and "demo" in listing.stdout and f"{mean:.4g}" in listing.stdout, listing.stdout
    shown = json.loads(cli("registry", "show", "demo", "--json").stdout)
    assert (shown["version"], shown["aliases"], shown["description"]) == (2, ["production"], "worse")
    assert json.loads(cli("registry", "show", "demo", "--version", 1, "--json").stdout)["tags"] == {"stage": "dev"}

    assert cli("registry", "rollback", "demo").exit_code == 0 and reg.resolve("demo").version == 1
    assert cli("registry", "alias", "demo", "candidate", 2).exit_code == 0
    assert reg.resolve("demo", "candidate").version == 2
    audit = [json.loads(line) for line in cli("registry", "audit", "demo", "--json").stdout.splitlines()]
    assert [e["action"] for e in audit] == ["register", "register", "promote", "promote_refused", "promote",
                                            "rollback", "set_alias"]
    assert cli("registry", "audit").exit_code == 0 and cli("registry", "verify", "demo", 1).exit_code == 0

    # errors are VidiffuseErrors, which the real entry point prints as one line (next test)
    for args in (("show", "nope"), ("show", "demo", "--version", 9), ("alias", "demo", "production", 2),
                 ("register", "demo", tmp_path / "missing"), ("rollback", "demo"), ("register", "demo", src, "--tag", "x")):
        result = cli("registry", *args)
        assert result.exit_code != 0 and isinstance(result.exception, VidiffuseError), (args, result.output)
    assert reg.resolve("demo").version == 1 and len(reg.versions("demo")) == 2


def test_cli_errors_are_one_line(src):
    ModelRegistry().register("cli-demo", src)
    proc = run_cli("registry", "show", "cli-demo", "--version", 3)  # the real entry point, in a fresh process
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: cli-demo has no version 3 (versions: 1)"]
