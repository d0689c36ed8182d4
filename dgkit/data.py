"""Domain data: discovery of `<root>/<domain>/<class>/<image>`, the DomainBed split, decoding.

The protocol lives here and only here: each source domain is split 80/20 into train and
validation with a seeded permutation, model selection uses the mean source-validation accuracy,
and the held-out target domains are evaluated in full.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dgkit.errors import DgkitError
from dgkit.preprocess import IMAGE_SUFFIXES, ImageError, PreprocessSpec, load_prepared

HOLDOUT_FRACTION = 0.2
CHANCE_Z = 2.326  # one-sided 1 %: a guesser passes for better than chance once in 100


@dataclass(frozen=True)
class Sample:
    path: Path
    domain: int
    label: int


@dataclass
class DomainData:
    root: Path
    domains: list[str]
    classes: list[str]
    samples: list[Sample]
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> np.ndarray:
        """Domain x class image counts."""
        table = np.zeros((len(self.domains), len(self.classes)), dtype=np.int64)
        for s in self.samples:
            table[s.domain, s.label] += 1
        return table

    def domain_index(self, name: str) -> int:
        if name not in self.domains:
            raise DgkitError(f"--target '{name}' names no domain of {self.root}; "
                             f"the domains are: {', '.join(self.domains)}")
        return self.domains.index(name)


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _found(folder: Path) -> str:
    """What `folder` holds directly, for a message about a wrong layout."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    folders = sum(p.is_dir() for p in entries)
    images = sum(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
    counts = ((images, "images"), (len(entries) - folders - images, "other files"),
              (folders, "folders"))
    return "found " + (", ".join(f"{n} {what if n > 1 else what[:-1]}" for n, what in counts
                                 if n) or "nothing")


def discover(root: str | Path) -> DomainData:
    """Find domains, classes and images; fail with one sentence when the layout is wrong."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DgkitError(f"data root {root} does not exist")
    if not root.is_dir():
        raise DgkitError(f"data root {root} is not a folder")
    domain_dirs = _visible_dirs(root)
    if not domain_dirs:
        raise DgkitError(f"data root {root} has no domain folders ({_found(root)} in it): "
                         "expected <root>/<domain>/<class>/<image>")
    per_domain: dict[str, dict[str, list[Path]]] = {}
    for ddir in domain_dirs:
        per_domain[ddir.name] = {
            cdir.name: sorted(p for p in cdir.rglob("*")
                              if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            for cdir in _visible_dirs(ddir)
        }
        if not any(per_domain[ddir.name].values()):
            raise DgkitError(f"domain '{ddir.name}' ({ddir}) has no images in class folders "
                             f"({_found(ddir)} in it): expected <root>/<domain>/<class>/<image>")
    domains = sorted(per_domain)
    classes = sorted({c for cls in per_domain.values() for c, files in cls.items() if files})
    samples = [Sample(path, d, classes.index(c))
               for d, dname in enumerate(domains)
               for c, files in sorted(per_domain[dname].items()) if files
               for path in files]
    data = DomainData(root, domains, classes, samples)
    counts = data.counts()
    for d, dname in enumerate(domains):
        missing = [classes[c] for c in range(len(classes)) if counts[d, c] == 0]
        if missing:
            data.warnings.append(f"domain '{dname}' has no images of {', '.join(missing)}")
    return data


def check_targets(data: DomainData, targets: Sequence[str]) -> tuple[list[int], list[int]]:
    """Target and source domain indices; every target class must appear in some source domain.
    No targets: every domain is a source (the student to deploy, with nothing held out)."""
    target_ids = sorted({data.domain_index(t) for t in targets})
    source_ids = [d for d in range(len(data.domains)) if d not in target_ids]
    if not source_ids:
        raise DgkitError("--target holds out every domain; at least one must remain for training")
    counts = data.counts()
    unseen = [data.classes[c] for c in range(len(data.classes))
              if counts[target_ids, c].sum() > 0 and counts[source_ids, c].sum() == 0]
    if unseen:
        raise DgkitError(f"class {', '.join(unseen)} appears in the target domain but in no "
                         "source domain, so the student could never learn it")
    return target_ids, source_ids


def at_chance(accuracy: Mapping[str, float] | None, root: str | Path) -> bool:
    """Whether `accuracy` (% per domain of the data under `root`, as summary.json holds a
    teacher's zero-shot accuracy on every image) is nowhere clearly above always answering the
    domain's commonest class (one-sided binomial test at 1 %): what a CLIP with random weights,
    or one that cannot read the class names, scores. False when there is nothing to judge by."""
    try:
        data = discover(root)
    except (DgkitError, OSError):  # the data moved, is gone or unreadable: no verdict
        return False
    counts = data.counts()
    judged = [(acc / 100.0, counts[data.domains.index(d)]) for d, acc in (accuracy or {}).items()
              if d in data.domains]

    def near_guess(acc: float, row: np.ndarray) -> bool:
        n, guess = int(row.sum()), float(row.max() / row.sum())
        return acc * n <= n * guess + CHANCE_Z * math.sqrt(n * guess * (1 - guess))

    return bool(judged) and all(near_guess(acc, row) for acc, row in judged)


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def split_sources(data: DomainData, source_ids: Sequence[int], seed: int,
                  holdout: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's split: per source domain a seeded permutation, the first 20% for validation."""
    train, val = [], []
    for d in source_ids:
        idx = np.array([i for i, s in enumerate(data.samples) if s.domain == d], dtype=np.int64)
        perm = idx[np.random.default_rng(_seed_for(seed, data.domains[d])).permutation(len(idx))]
        n_val = int(len(idx) * holdout)
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def prompt_names(classes: Sequence[str], override: str | Path | None = None) -> list[str]:
    """Class folder names as prompt names (`art_painting` -> `art painting`), or from a file.

    The file is JSON (`{"folder": "prompt name"}`) or lines of `folder: prompt name`.
    """
    names = {c: c.replace("_", " ").replace("-", " ").strip() for c in classes}
    if override is None:
        return [names[c] for c in classes]
    path = Path(override)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DgkitError(f"--class-names file {path} cannot be read: {exc.strerror}") from exc
    try:
        given = json.loads(text) if path.suffix == ".json" else dict(
            (k.strip(), v.strip()) for k, v in
            (line.split(":", 1) for line in text.splitlines() if line.strip()))
    except ValueError as exc:
        raise DgkitError(f"--class-names file {path} is not 'folder: name' lines or a JSON "
                         f"object ({exc})") from exc
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise DgkitError(f"--class-names file {path} names unknown classes: {', '.join(unknown)}")
    names.update(given)
    return [names[c] for c in classes]


def content_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:20]


@dataclass
class Decoded:
    """Decoded pixels of some samples, their content hashes, and the ones that failed."""

    indices: np.ndarray  # indices into DomainData.samples, in pixel order
    pixels: np.ndarray  # N x S x S x 3 uint8
    hashes: list[str]
    bad: list[tuple[Path, str]]


def decode_one(path: Path, spec: PreprocessSpec) -> tuple[np.ndarray | None, str, str]:
    """(pixels, content hash, "") of one image, or (None, "", why) when it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, "", f"cannot read: {exc.strerror}"
    try:
        return load_prepared(raw, spec), content_hash(raw), ""
    except ImageError as exc:
        return None, "", str(exc).replace("<bytes> ", "")


def decode_samples(data: DomainData, indices: Sequence[int], spec: PreprocessSpec,
                   progress_label: str | None = "Decoding images",
                   workers: int = 4) -> Decoded:
    """Decode, resize and crop every sample once; PACS fits in memory at training size."""
    from dgkit.progress import track

    paths = [data.samples[i].path for i in indices]
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda p: decode_one(p, spec), paths)
        results = list(track(results, total=len(paths), description=progress_label))
    good = [k for k, (px, _, _) in enumerate(results) if px is not None]
    size = spec.input_size
    pixels = np.empty((len(good), size, size, 3), dtype=np.uint8)
    for row, k in enumerate(good):
        pixels[row] = results[k][0]
    return Decoded(
        indices=np.asarray(indices, dtype=np.int64)[good],
        pixels=pixels,
        hashes=[results[k][1] for k in good],
        bad=[(paths[k], results[k][2]) for k, (px, _, _) in enumerate(results) if px is None],
    )
