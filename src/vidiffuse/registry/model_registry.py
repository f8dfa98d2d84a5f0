"""The model registry: MLflow's registry semantics in local files.

A registered model has a name and integer versions 1, 2, 3, ... Each version is an immutable copy of a
model directory with its eval report, training-data manifest hash and model card. Aliases (`production`,
`candidate`, any name) point at one version each; `promote` moves an alias only when the candidate's eval
report is no worse than the current version's (the `vidiffuse eval --baseline` gate), `rollback` moves it
back along its history, and every change is appended to an audit log.

Layout under the root (default `$VIDIFFUSE_HOME/registry`):

    registry.json              all models, versions, aliases and alias histories (replaced atomically)
    audit.jsonl                one JSON line per change or refusal; only ever appended to
    .lock                      flock'ed by whoever changes registry.json or audit.jsonl
    models/<name>/<version>/
        model/                 the copied model directory that the pipeline loads (files read-only)
        files.sha256           the copy's files and digests, in `sha256sum -c` format
        eval_report.json       the version's `vidiffuse eval` report, when it has one
        MODEL_CARD.md          its model card, when one was given (else the model directory's own)

Readers (the server resolving `production` before each job) take no lock: registry.json is replaced by
rename, so they see the old state or the new one, never half of one. Version directories are never
deleted, so a job still running on the version an alias just left keeps its files.
"""

from __future__ import annotations

import copy
import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ConfigError, ModelLoadError, VidiffuseError
from ..files import vidiffuse_home, write_atomic

STATE_FILE = "registry.json"
AUDIT_FILE = "audit.jsonl"
LOCK_FILE = ".lock"
FORMAT = 1
PRODUCTION = "production"
LATEST = "latest"  # like MLflow's models:/name/latest: not an alias one can set, the newest version
DEFAULT_EVAL_N = 256  # golden prompts when `promote --eval` has no production report to copy settings from
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
CARD_NAMES = ("MODEL_CARD.md", "README.md")  # a model directory's own card, when none is given

# parsed registry.json per path, keyed by (inode, mtime, size): the server builds a ModelRegistry and
# resolves its alias before every job, and a stat is far cheaper than reading and parsing the file
_STATE_CACHE: dict[Path, tuple[tuple[int, int, int], dict]] = {}


class RegistryError(VidiffuseError):
    """An unknown model, version or alias, or a request the registry's rules do not allow."""


class PromotionRefused(RegistryError):
    """The candidate's eval report is worse than the current version's, or there is nothing to gate on."""

    def __init__(self, name: str, version: int, alias: str, reasons: list[str]):
        self.name, self.version, self.alias, self.reasons = name, version, alias, list(reasons)
        super().__init__(f"promotion of {name} version {version} to {alias} refused: " + "; ".join(self.reasons))


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path  # the model directory the pipeline loads
    model_version: str  # pipeline.model_version: the index's "version" or a hash of the denoiser's weights
    content_sha256: str  # of files.sha256, i.e. of every file in the copied model directory
    eval_report: Path | None
    training_data_manifest_sha256: str | None
    card: Path | None
    created: str  # ISO 8601, UTC
    created_by: str
    source: str  # the directory it was copied from
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict, hash=False)
    aliases: tuple[str, ...] = ()  # the aliases pointing at it when it was read

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("path", "eval_report", "card"):
            out[key] = None if out[key] is None else str(out[key])
        out["aliases"] = list(self.aliases)
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: use up to 64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def _check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: use up to 32 letters, digits, '_' or '-', starting with a letter")
    # the same reserved names as MLflow: they would be ambiguous with a version reference
    if alias.lower() == LATEST or re.fullmatch(r"[vV]\d+", alias):
        raise RegistryError(f"{alias!r} is reserved (it reads as a version), pick another alias")
    return alias


def _hash_tree(root: Path) -> str:
    """`sha256sum`-style lines for every file under `root`, sorted by path."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(root).as_posix()}\n")
    return "".join(lines)


def _make_read_only(root: Path) -> None:
    """Files lose their write bits so that an accidental in-place edit fails; directories stay writable
    (replacing the eval report and removing the registry stay possible)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _read_index(model_dir: Path) -> dict:
    try:
        index = json.loads((model_dir / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{model_dir / 'model_index.json'} is not valid JSON: {e}") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{model_dir / 'model_index.json'} is not a JSON object")
    return index


def _load_report(path: Path) -> tuple[bytes, dict]:
    """The report's bytes (stored as given) and its parsed, checked content."""
    from ..evaluate.suite import read_report

    report = read_report(path)  # ConfigError with a clear message when missing or not a report
    return Path(path).read_bytes(), report


class ModelRegistry:
    def __init__(self, root: str | os.PathLike | None = None):
        # no filesystem access here: the server builds one per job, and a registry that does not exist
        # yet simply resolves nothing
        self.root = Path(root) if root is not None else vidiffuse_home() / "registry"
        self._state_path = self.root / STATE_FILE
        self._audit_path = self.root / AUDIT_FILE

    # ------------------------------------------------------------------ reading

    def _state(self, cached: bool = True) -> dict:
        try:
            st = os.stat(self._state_path)
        except FileNotFoundError:
            return {"format": FORMAT, "models": {}}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = _STATE_CACHE.get(self._state_path)
        if cached and hit is not None and hit[0] == key:
            return hit[1]
        try:
            state = json.loads(self._state_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self._state_path} is corrupt: {e}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("models"), dict):
            raise RegistryError(f"{self._state_path} is not a vidiffuse registry (format {FORMAT})")
        # if the file was replaced between stat and read, the next call's stat differs and reads again
        _STATE_CACHE[self._state_path] = (key, state)
        return state

    def _model(self, state: dict, name: str) -> dict:
        model = state["models"].get(name)
        if model is None:
            known = ", ".join(sorted(state["models"])) or "none registered yet"
            raise RegistryError(f"no registered model {name!r} (known: {known})")
        return model

    def _record(self, state: dict, name: str, version: int) -> dict:
        model = self._model(state, name)
        record = model["versions"].get(str(version)) if str(version).isdigit() else None
        if record is None:
            known = ", ".join(sorted(model["versions"], key=int))
            raise RegistryError(f"{name} has no version {version!r} (versions: {known})")
        return record

    def _version(self, name: str, model: dict, record: dict) -> ModelVersion:
        v = record["version"]
        at = lambda rel: None if rel is None else self.root / rel  # noqa: E731
        return ModelVersion(
            name=name, version=v, path=self.root / record["path"], model_version=record["model_version"],
            content_sha256=record["content_sha256"], eval_report=at(record.get("eval_report")),
            training_data_manifest_sha256=record.get("training_data_manifest_sha256"), card=at(record.get("card")),
            created=record["created"], created_by=record["created_by"], source=record["source"],
            description=record.get("description", ""), tags=dict(record.get("tags", {})),
            aliases=tuple(sorted(a for a, target in model["aliases"].items() if target == v)))

    def models(self) -> list[str]:
        return sorted(self._state()["models"])

    def versions(self, name: str) -> list[ModelVersion]:
        model = self._model(self._state(), name)
        return [self._version(name, model, model["versions"][k]) for k in sorted(model["versions"], key=int)]

    def get(self, name: str, version: int) -> ModelVersion:
        state = self._state()
        return self._version(name, self._model(state, name), self._record(state, name, version))

    def resolve(self, name: str, alias: str = PRODUCTION) -> ModelVersion | None:
        """The version `alias` points at (`latest`: the newest version); None when the model or alias is unknown.

        Cheap enough to call before every job: one stat of registry.json while it has not changed."""
        model = self._state()["models"].get(name)
        if model is None:
            return None
        if alias == LATEST:
            version = max(map(int, model["versions"]), default=None)
        else:
            version = model["aliases"].get(alias)
        return None if version is None else self._version(name, model, model["versions"][str(version)])

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._model(self._state(), name)["aliases"])

    def alias_history(self, name: str, alias: str = PRODUCTION) -> list[int]:
        """The versions `alias` pointed at, oldest first; the last is the current one."""
        return list(self._model(self._state(), name)["alias_history"].get(alias, []))

    def audit(self, name: str | None = None) -> list[dict]:
        """Every audit entry (optionally one model's), oldest first."""
        try:
            lines = self._audit_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-append; the rest is intact
                continue
            if name is None or entry.get("model") == name:
                entries.append(entry)
        return entries

    def verify(self, name: str, version: int) -> list[str]:
        """Files of the registered copy that changed, went missing or appeared since registration; [] if intact."""
        mv = self.get(name, version)
        listing = mv.path.parent / "files.sha256"
        if not listing.is_file():
            return [f"missing: {listing}"]
        recorded = dict(line.split("  ", 1)[::-1] for line in listing.read_text().splitlines() if line)
        now = dict(line.split("  ", 1)[::-1] for line in _hash_tree(mv.path).splitlines())
        problems = [f"changed: {f}" for f in sorted(recorded.keys() & now.keys()) if recorded[f] != now[f]]
        problems += [f"missing: {f}" for f in sorted(recorded.keys() - now.keys())]
        problems += [f"added: {f}" for f in sorted(now.keys() - recorded.keys())]
        return problems

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _transaction(self) -> Iterator[tuple[dict, list[dict]]]:
        """Exclusive access: yields a private copy of the state and a list for audit entries; on a clean
        exit writes the state (when changed), then appends the entries, both while holding the lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = self._state(cached=False)
            state, entries = copy.deepcopy(before), []
            try:
                yield state, entries
            except BaseException:
                # the state may be half changed and is dropped; a refusal's audit entry is still written
                for entry in entries:
                    self._append_audit(entry)
                raise
            if state != before:
                write_atomic(self._state_path, json.dumps(state, indent=1) + "\n")
            for entry in entries:
                self._append_audit(entry)
        finally:
            os.close(fd)  # releases the lock

    def _append_audit(self, entry: dict) -> None:
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self._audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write with O_APPEND: lines never interleave
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _entry(action: str, name: str, actor: str | None, **fields) -> dict:
        return {"when": _now(), "who": actor or _default_actor(), "action": action, "model": name, **fields}

    def register(self, name: str, model_dir: str | os.PathLike, eval_report: str | os.PathLike | None = None,
                 card: str | os.PathLike | None = None, description: str = "", actor: str | None = None,
                 tags: dict[str, str] | None = None) -> ModelVersion:
        """Copy `model_dir` into the registry as the next version of `name`.

        The copy makes the version immutable whatever happens to the source later; its files are listed
        with their SHA-256 in files.sha256 (see `verify`)."""
        from ..pipeline import model_version, resolve_model_path

        _check_name(name)
        source = resolve_model_path(model_dir)  # a bundled name or a directory with model_index.json
        index = _read_index(source)
        report_bytes, report = _load_report(Path(eval_report)) if eval_report is not None else (None, None)
        if card is not None and not Path(card).is_file():
            raise RegistryError(f"model card not found: {card}")
        tags = {str(k): str(v) for k, v in (tags or {}).items()}

        # the copy (the slow part, for big models) happens outside the lock, in a private staging folder
        staging = self.root / "staging" / f"{name}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            shutil.copytree(source, staging / "model", ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))
            manifest = _hash_tree(staging / "model")
            (staging / "files.sha256").write_text(manifest)
            version_hash = model_version(staging / "model", index)
            if report is not None:
                self._check_report_matches(report, version_hash, eval_report)
                (staging / "eval_report.json").write_bytes(report_bytes)
            if card is not None:
                card_name = "MODEL_CARD" + (Path(card).suffix or ".md")
                shutil.copyfile(card, staging / card_name)
            else:
                card_name = next((f"model/{c}" for c in CARD_NAMES if (staging / "model" / c).is_file()), None)
            _make_read_only(staging)

            with self._transaction() as (state, audit):
                model = state["models"].setdefault(name, {"created": _now(), "versions": {}, "aliases": {},
                                                          "alias_history": {}})
                version = max(map(int, model["versions"]), default=0) + 1
                final = self.root / "models" / name / str(version)
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # left by a register that crashed after its rename, before its state write
                    shutil.rmtree(final)
                os.replace(staging, final)
                rel = final.relative_to(self.root).as_posix()
                model["versions"][str(version)] = {
                    "version": version, "path": f"{rel}/model", "model_version": version_hash,
                    "content_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
                    "eval_report": f"{rel}/eval_report.json" if report is not None else None,
                    "eval_report_sha256": hashlib.sha256(report_bytes).hexdigest() if report is not None else None,
                    "training_data_manifest_sha256": index.get("training_data_manifest_sha256"),
                    "card": f"{rel}/{card_name}" if card_name else None,
                    "created": _now(), "created_by": actor or _default_actor(),
                    "source": str(Path(source).resolve()), "description": description, "tags": tags}
                audit.append(self._entry("register", name, actor, version=version, model_version=version_hash,
                                         source=str(Path(source).resolve()), eval_report=report is not None))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name, version)

    @staticmethod
    def _check_report_matches(report: dict, version_hash: str, path) -> None:
        # reports that record which weights they measured (a "model_version" field) must name these ones
        measured = report.get("model_version")
        if measured is not None and str(measured) != version_hash:
            raise RegistryError(f"{path} measured model version {measured}, not this one ({version_hash})")

    def attach_report(self, name: str, version: int, eval_report: str | os.PathLike,
                      actor: str | None = None) -> ModelVersion:
        """Give a version its eval report (or replace it): typically `vidiffuse eval --model <its path>`'s."""
        report_bytes, report = _load_report(Path(eval_report))
        with self._transaction() as (state, audit):
            record = self._record(state, name, version)
            self._check_report_matches(report, record["model_version"], eval_report)
            rel = Path(record["path"]).parent / "eval_report.json"
            write_atomic(self.root / rel, report_bytes)
            old = record.get("eval_report_sha256")
            new = hashlib.sha256(report_bytes).hexdigest()
            record.update(eval_report=rel.as_posix(), eval_report_sha256=new)
            audit.append(self._entry("attach_report", name, actor, version=version, **{"from": old, "to": new}))
        return self.get(name, version)

    def set_tag(self, name: str, version: int, key: str, value: str, actor: str | None = None) -> ModelVersion:
        with self._transaction() as (state, audit):
            record = self._record(state, name, version)
            old = record["tags"].get(key)
            record["tags"][str(key)] = str(value)
            audit.append(self._entry("set_tag", name, actor, version=version, tag=key, **{"from": old, "to": value}))
        return self.get(name, version)

    @staticmethod
    def _move_alias(model: dict, alias: str, version: int) -> int | None:
        previous = model["aliases"].get(alias)
        model["aliases"][alias] = version
        model["alias_history"].setdefault(alias, []).append(version)
        return previous

    def set_alias(self, name: str, alias: str, version: int, actor: str | None = None) -> ModelVersion:
        """Point `alias` at `version` without any gate (MLflow's set_registered_model_alias); audited.
        Use `promote` for `production`."""
        _check_alias(alias)
        with self._transaction() as (state, audit):
            self._record(state, name, version)
            model = self._model(state, name)
            if model["aliases"].get(alias) != version:
                previous = self._move_alias(model, alias, version)
                audit.append(self._entry("set_alias", name, actor, alias=alias, **{"from": previous, "to": version}))
        return self.get(name, version)

    def promote(self, name: str, version: int, alias: str = PRODUCTION, tolerances: dict[str, float] | None = None,
                force: bool = False, actor: str | None = None, evaluate: bool = False,
                progress: Callable[[str], None] | None = None) -> ModelVersion:
        """Point `alias` at `version` if its eval report passes the regression gate against the version
        `alias` points at now (same metrics, directions and tolerances as `vidiffuse eval --baseline`).

        Raises PromotionRefused with the gate's reasons, after auditing the refusal, when the candidate is
        worse, was measured differently, or has no report. `force=True` promotes anyway (audited as forced).
        `evaluate=True` first evaluates a candidate that has no report, with the current report's settings.
        """
        from ..evaluate import suite

        _check_alias(alias)
        candidate = self.get(name, version)
        if evaluate and candidate.eval_report is None:
            current = self.resolve(name, alias)
            like = suite.read_report(current.eval_report) if current and current.eval_report else None
            self.evaluate_version(name, version, like=like, progress=progress, actor=actor)

        with self._transaction() as (state, audit):
            model, record = self._model(state, name), self._record(state, name, version)
            current_version = model["aliases"].get(alias)
            if current_version == version:
                return self._version(name, model, record)
            reasons, note, baseline_version = [], None, None
            if record.get("eval_report") is None:
                reasons.append(f"version {version} has no eval report (attach one with `vidiffuse registry "
                               f"attach-report`, or promote with --eval)")
            elif current_version is not None:
                baseline = model["versions"][str(current_version)]
                if baseline.get("eval_report") is None:
                    note = f"version {current_version} has no eval report: nothing to gate against"
                else:
                    baseline_version = current_version
                    new = suite.read_report(self.root / record["eval_report"])
                    old = suite.read_report(self.root / baseline["eval_report"])
                    mismatch = suite.settings_mismatch(new, old)
                    if mismatch:
                        reasons.append(f"measured differently from version {current_version}'s report, so the "
                                       "gate cannot compare them: " + "; ".join(mismatch))
                    else:
                        reasons += suite.gate(new, old, tolerances)
            gate = {"baseline_version": baseline_version, "passed": not reasons, "reasons": reasons,
                    "tolerances": dict(tolerances or {}), **({"note": note} if note else {})}
            if reasons and not force:
                audit.append(self._entry("promote_refused", name, actor, alias=alias,
                                         **{"from": current_version, "to": version}, gate=gate))
                raise PromotionRefused(name, version, alias, reasons)
            self._move_alias(model, alias, version)
            audit.append(self._entry("promote", name, actor, alias=alias, **{"from": current_version, "to": version},
                                     gate=gate, forced=bool(reasons)))
            return self._version(name, model, record)

    def rollback(self, name: str, alias: str = PRODUCTION, actor: str | None = None) -> ModelVersion:
        """Point `alias` back at the version it pointed at before the current one (no gate: it is the way
        out of a bad promotion). Repeated rollbacks walk further back."""
        with self._transaction() as (state, audit):
            model = self._model(state, name)
            current = model["aliases"].get(alias)
            if current is None:
                raise RegistryError(f"{name} has no alias {alias!r}")
            history = model["alias_history"].setdefault(alias, [current])
            if len(history) < 2:
                raise RegistryError(f"{name}'s {alias} has no earlier version to roll back to "
                                    f"(its history holds only version {current})")
            history.pop()
            target = history[-1]
            model["aliases"][alias] = target
            audit.append(self._entry("rollback", name, actor, alias=alias, **{"from": current, "to": target}))
            return self._version(name, model, model["versions"][str(target)])

    def evaluate_version(self, name: str, version: int, like: dict | None = None, n: int | None = None,
                         progress: Callable[[str], None] | None = None, actor: str | None = None) -> ModelVersion:
        """Run `vidiffuse eval` on a registered version and attach the report. `like`, a report to be
        compared with, fixes the golden set, prompt count and sampling settings so the gate can compare."""
        from ..evaluate import suite
        from ..pipeline import VideoPipeline

        mv = self.get(name, version)
        settings = (like or {}).get("settings", {})
        if like is not None and n is not None and n != like.get("n"):
            raise ConfigError(f"n={n} differs from the report to compare with (n={like.get('n')})")
        pipe = VideoPipeline.from_pretrained(mv.path)
        report, _ = suite.evaluate_model(
            pipe, n=(like or {}).get("n") or n or DEFAULT_EVAL_N, steps=settings.get("steps"),
            guidance=settings.get("guidance"), sampler=settings.get("sampler"),
            batch_size=settings.get("batch_size", 16), golden=(like or {}).get("golden_set", suite.GOLDEN_SET),
            progress=progress)
        report["model_version"] = mv.model_version
        self.root.joinpath("staging").mkdir(parents=True, exist_ok=True)
        tmp = self.root / "staging" / f"report-{uuid.uuid4().hex}.json"
        try:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            return self.attach_report(name, version, tmp, actor=actor)
        finally:
            tmp.unlink(missing_ok=True)
