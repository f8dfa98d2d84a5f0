"""Near-duplicates within a dataset and leakage between a training and an evaluation set.

Both compare clip fingerprints (:mod:`vidiffuse.data.fingerprint`): a pair is reported when the pixel-space
cosine similarity of its clips is at or above the threshold (default
:data:`~vidiffuse.data.fingerprint.SIMILARITY_THRESHOLD`). Each pair also carries its pHash distance and
whether the two files are byte-identical, so an exact copy and a re-encoded one are told apart.
Check leakage before trusting any evaluation: an evaluation clip that is also in training measures recall,
not generalisation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from vidiffuse.errors import ConfigError

from .fingerprint import SIMILARITY_THRESHOLD, Fingerprints, fingerprint_dir, hash_distance, pairs_above

__all__ = ["dedup_report", "find_duplicates", "find_leakage", "format_report"]

METRIC = "pixel_cosine_similarity"


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"{what} not found: {path}" if not path.exists() else f"{what} is not a folder: {path}")


def _check_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pair_rows(a: Fingerprints, b: Fingerprints, root_a: Path, root_b: Path, pairs) -> list[dict]:
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = _file_digest(path)
        return digests[path]

    rows = []
    for i, j, sim in pairs:
        pa, pb = root_a / a.names[i], root_b / b.names[j]
        rows.append({"a": a.names[i], "b": b.names[j], "similarity": round(sim, 6),
                     "phash_distance": round(hash_distance(a.hashes[i], b.hashes[j]), 4),
                     "identical_bytes": digest(pa) == digest(pb)})
    return rows


def _groups(pairs: list[dict]) -> list[list[str]]:
    """Connected components of the duplicate pairs: each group is one clip and its copies."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        parent[find(p["a"])] = find(p["b"])
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def find_duplicates(root: str | os.PathLike, threshold: float = SIMILARITY_THRESHOLD,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Pairs of near-duplicate clips within one folder, and the groups they form."""
    root = Path(root)
    _check_dir(root, "dataset folder")
    _check_threshold(threshold)
    fp = fingerprint_dir(root, progress)
    rows = _pair_rows(fp, fp, root, root, pairs_above(fp.embeddings, None, threshold))
    groups = _groups(rows)
    return {"check": "near_duplicates", "metric": METRIC, "threshold": threshold, "dataset": str(root),
            "n_clips": len(fp), "n_pairs": len(rows), "n_groups": len(groups),
            "n_redundant_clips": sum(len(g) - 1 for g in groups), "pairs": rows, "groups": groups,
            "errors": [{"file": n, "error": r} for n, r in fp.errors]}


def find_leakage(train: str | os.PathLike, evaluation: str | os.PathLike, threshold: float = SIMILARITY_THRESHOLD,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Pairs (training clip, evaluation clip) that are near-duplicates: evaluation clips seen in training."""
    train, evaluation = Path(train), Path(evaluation)
    _check_dir(train, "training folder")
    _check_dir(evaluation, "evaluation folder")
    _check_threshold(threshold)
    ft, fe = fingerprint_dir(train, progress), fingerprint_dir(evaluation, progress)
    rows = _pair_rows(ft, fe, train, evaluation, pairs_above(ft.embeddings, fe.embeddings, threshold))
    leaked = sorted({r["b"] for r in rows})
    return {"check": "leakage", "metric": METRIC, "threshold": threshold, "train": str(train),
            "evaluation": str(evaluation), "n_train": len(ft), "n_evaluation": len(fe), "n_pairs": len(rows),
            "n_evaluation_leaked": len(leaked), "leaked_evaluation_clips": leaked, "pairs": rows,
            "errors": [{"file": str(train / n), "error": r} for n, r in ft.errors]
            + [{"file": str(evaluation / n), "error": r} for n, r in fe.errors]}


def dedup_report(root: str | os.PathLike, against: str | os.PathLike | None = None,
                 threshold: float = SIMILARITY_THRESHOLD, progress: Callable[[int, int], None] | None = None) -> dict:
    """Near-duplicates within ``root`` or, with ``against``, leakage between ``root`` (train) and ``against``."""
    if against is None:
        return find_duplicates(root, threshold, progress)
    return find_leakage(root, against, threshold, progress)


def format_report(report: dict, max_rows: int = 30) -> str:
    """A plain-text summary and table of the pairs, for the terminal."""
    if report["check"] == "leakage":
        head = (f"leakage: {report['n_pairs']} pair(s) at similarity >= {report['threshold']:g}; "
                f"{report['n_evaluation_leaked']} of {report['n_evaluation']} evaluation clips also appear in "
                f"training ({report['n_train']} clips)")
        cols = ("train", "evaluation")
    else:
        head = (f"near-duplicates: {report['n_pairs']} pair(s) at similarity >= {report['threshold']:g} among "
                f"{report['n_clips']} clips, in {report['n_groups']} group(s); "
                f"{report['n_redundant_clips']} clip(s) redundant")
        cols = ("clip", "duplicate")
    lines = [head]
    if report["pairs"]:
        width = max(len(cols[0]), *(len(p["a"]) for p in report["pairs"][:max_rows]))
        lines.append(f"  {cols[0]:<{width}}  {cols[1]:<24}  similarity  phash_dist  identical_bytes")
        for p in report["pairs"][:max_rows]:
            lines.append(f"  {p['a']:<{width}}  {p['b']:<24}  {p['similarity']:>10.4f}  {p['phash_distance']:>10.3f}"
                         f"  {'yes' if p['identical_bytes'] else 'no'}")
        if len(report["pairs"]) > max_rows:
            lines.append(f"  ... {len(report['pairs']) - max_rows} more in the JSON report")
    for e in report["errors"]:
        lines.append(f"  unreadable: {e['file']}: {e['error']}")
    return "\n".join(lines)
