"""Sampling in shards: a run of N samples cut into fixed chunks, one file per chunk, so that one
process or many (torchrun) give bit-identical results, a killed run resumes where it stopped, and
the merge into one file streams.

Inside ``--out``::

    OUT/shards/00000-00255.npz   samples 0..255 (both ends included): data, labels, seeds, run
    OUT/samples.npz              the merged SampleSet, written last (it marks the run as complete)
    OUT/adm_samples.npz          the ADM evaluator's batch, when asked for

A chunk is ``batch_size`` consecutive samples (:func:`ditrt.distributed.chunk_ranges`) drawn in one
sampler call, so its samples do not depend on how many processes there are or which one drew it.
The chunks still missing are dealt out round robin (:func:`ditrt.distributed.my_chunks`), so every
rank has as many to draw, also when resuming a run that another number of processes started.

Each shard records the *run* it belongs to (a JSON dict the caller makes: what is sampled,
identified by path, size and modification time, the sampler settings, seed, classes, device type),
so a resumed run takes the shards of its own run and refuses those of another, naming what differs.
Shards are written atomically: a killed process leaves complete shards (and at most a stray temp
file), never a half-written one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditrt.contracts.errors import ArtifactError, ConfigError, DitrtError
from ditrt.diffusion.sample_set import ArrayStream, SampleSet, write_adm_npz, write_npz
from ditrt.distributed import SINGLE, World, barrier, broadcast_object, chunk_ranges, my_chunks

log = logging.getLogger(__name__)

_SHARD_NAME = re.compile(r"^\d+-\d+\.npz$")


@dataclass(frozen=True)
class ShardPlan:
    """``num`` samples in chunks of ``batch_size``, sharded into ``out/shards`` and merged into ``out``."""

    out: Path
    num: int
    batch_size: int

    def __post_init__(self):
        if self.num <= 0:
            raise ConfigError(f"--num must be positive, got {self.num}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of images, got {self.batch_size}")

    @property
    def folder(self) -> Path:
        return Path(self.out) / "shards"

    @property
    def samples(self) -> Path:
        return Path(self.out) / "samples.npz"

    @property
    def adm(self) -> Path:
        return Path(self.out) / "adm_samples.npz"

    @property
    def chunks(self) -> list[range]:
        return chunk_ranges(self.num, self.batch_size)

    def path(self, rows: range) -> Path:
        """The shard of samples ``rows``: its first and last index (a name any --num agrees on)."""
        return self.folder / f"{rows.start:05d}-{rows.stop - 1:05d}.npz"


@dataclass(frozen=True)
class Resume:
    """What a run finds in its ``--out``: the chunks already sampled, or the merged result itself."""

    done: tuple[int, ...] = ()
    complete: bool = False


def file_identity(path) -> dict:
    """An input file or folder, identified without reading it: the resolved path, with the size and
    modification time of the file, or of every file in the folder."""
    p = Path(path)
    if not p.exists():
        return {"path": str(path)}
    p = p.resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = {str(f.relative_to(p)): [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.rglob("*")) if f.is_file()}
    return {"path": str(p), "files": files}


def write_shard(path: Path, data: np.ndarray, labels, seeds, *, kind: str, run: dict) -> Path:
    return write_npz(path, {kind: data, "labels": np.asarray(labels), "seeds": np.asarray(seeds), "run": np.array(_json(run))})


def find_resume(plan: ShardPlan, run: dict, labels, seeds, *, overwrite: bool = False, adm: bool = False) -> Resume:
    """The shards of this ``run`` already in ``plan.folder`` (their chunk indices), or ``complete`` when
    ``samples.npz`` (and the ADM npz when ``adm``) of this run are there. ``overwrite`` discards the
    shards first. A shard of another run is a :class:`ConfigError` naming what differs."""
    run = _canonical(run)
    if overwrite:
        shutil.rmtree(plan.folder, ignore_errors=True)
        return Resume()
    if _complete(plan, run, adm):
        return Resume(tuple(range(len(plan.chunks))), complete=True)
    if not plan.folder.is_dir():
        return Resume()
    index = {plan.path(rows).name: c for c, rows in enumerate(plan.chunks)}
    labels, seeds = np.asarray(labels), np.asarray(seeds)
    fix = f"pass --overwrite to discard the shards in {plan.folder}, or choose another --out"
    done = []
    for path in sorted(plan.folder.iterdir()):
        if not _SHARD_NAME.match(path.name):
            continue  # a temp file a killed process left behind
        try:
            with np.load(path, allow_pickle=False) as z:
                theirs, shard_labels, shard_seeds = json.loads(str(z["run"])), z["labels"], z["seeds"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("%s is unreadable (%s): its samples are drawn again", path, type(e).__name__)
            continue
        if theirs != run:
            raise ConfigError(f"{path} is a shard of another run ({_differences(theirs, run)}); {fix}")
        c = index.get(path.name)
        if c is None:
            continue  # this run's samples in chunks of another --batch-size: not used
        rows = slice(plan.chunks[c].start, plan.chunks[c].stop)
        if not (np.array_equal(shard_labels, labels[rows]) and np.array_equal(shard_seeds, seeds[rows])):
            raise ConfigError(f"{path} holds other labels or seeds than samples {rows.start}..{rows.stop - 1} of this run; {fix}")
        done.append(c)
    return Resume(tuple(done))


def sample_shards(
    plan: ShardPlan,
    draw: Callable,
    *,
    labels,
    seeds,
    kind: str,
    run: dict,
    steps: int,
    world: World = SINGLE,
    overwrite: bool = False,
    adm: bool = False,
    progress: bool = True,
) -> Resume:
    """Draw and write this rank's missing shards, then wait for every rank (a barrier).

    ``draw(labels, seeds, on_step) -> (n, C, H, W)`` float32 samples of one chunk (``on_step(k, n)``
    after each of its ``steps`` sampler steps). Rank 0 looks for earlier shards (:func:`find_resume`)
    and tells the others, so every rank acts on one answer (or raises the same error). Returns it."""
    run = _canonical(run)
    labels, seeds = np.asarray(labels), np.asarray(seeds)
    found: Resume | DitrtError | None = None
    if world.is_main:
        try:
            found = find_resume(plan, run, labels, seeds, overwrite=overwrite, adm=adm)
        except DitrtError as e:
            found = e
    found = broadcast_object(found, world)
    if isinstance(found, DitrtError):
        raise found
    if found.complete:
        return found
    chunks, done = plan.chunks, set(found.done)
    missing = [c for c in range(len(chunks)) if c not in done]
    todo = [missing[i] for i in my_chunks(len(missing), world)]  # the missing chunks dealt out evenly: no rank idles at the barrier
    bar = None
    if progress and world.is_main and todo:
        from tqdm.auto import tqdm

        who = f" (rank 0 of {world.size})" if world.distributed else ""
        bar = tqdm(total=len(todo) * steps, desc=f"sampling {sum(len(chunks[c]) for c in todo)} {kind}{who}", unit="step")
    try:
        for c in todo:
            rows = slice(chunks[c].start, chunks[c].stop)
            data = np.asarray(draw(labels[rows].tolist(), seeds[rows].tolist(), (lambda k, n: bar.update(1)) if bar else None))
            if len(data) != len(chunks[c]) or data.dtype != np.float32:
                raise ArtifactError(f"the sampler returned {len(data)} {data.dtype} samples for the {len(chunks[c])} float32 of chunk {c}")
            write_shard(plan.path(chunks[c]), data, labels[rows], seeds[rows], kind=kind, run=run)
    finally:
        if bar is not None:
            bar.close()
    barrier(world)
    return found


def shard_samples(plan: ShardPlan, indices, *, kind: str) -> np.ndarray:
    """The samples at ``indices`` (a few, e.g. for a picture), read from their shards."""
    out, chunk = [], plan.batch_size
    for c in sorted({i // chunk for i in indices}):
        data = _shard_data(plan, c, kind)
        out += [(i, data[i - c * chunk].copy()) for i in indices if i // chunk == c]  # copies: the shard itself is let go
    return np.stack([x for _, x in sorted(out, key=lambda p: p[0])])


def merge_shards(plan: ShardPlan, *, kind: str, labels, seeds, settings: dict, run: dict, adm: bool = False,
                 keep: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """Rank 0, once every chunk has its shard: the ADM npz (when ``adm``; a stale one is removed
    otherwise), then ``samples.npz`` (with ``run`` in its settings), both streamed shard by shard in
    index order; then the shard folder is removed unless ``keep``. Returns ``plan.samples``."""
    chunks = plan.chunks
    missing = [plan.path(r) for r in chunks if not plan.path(r).is_file()]
    if missing:
        raise ArtifactError(f"{len(missing)} shards are missing, e.g. {missing[0]}; re-run the same command to sample them")
    shape = (plan.num, *_shard_data(plan, 0, kind).shape[1:])

    def parts(what: str):
        from tqdm.auto import tqdm

        for c in tqdm(range(len(chunks)), desc=f"writing {what}", unit="shard", disable=not progress, leave=False):
            yield _shard_data(plan, c, kind, shape[1:])

    if adm:
        write_adm_npz(plan.adm, ArrayStream(shape, np.float32, lambda: parts(plan.adm.name)), labels)
    else:
        plan.adm.unlink(missing_ok=True)  # an earlier run's batch beside this run's samples would be mistaken for them
    stream = ArrayStream(shape, np.float32, lambda: parts(plan.samples.name))
    SampleSet(stream, np.asarray(labels), np.asarray(seeds), kind, {**settings, "run": _canonical(run)}).save(plan.samples)
    if not keep:
        shutil.rmtree(plan.folder, ignore_errors=True)
    return plan.samples


def _shard_data(plan: ShardPlan, c: int, kind: str, sample_shape: tuple | None = None) -> np.ndarray:
    rows = plan.chunks[c]
    path = plan.path(rows)
    fix = "delete it and re-run the same command to sample it again"
    try:
        with np.load(path, allow_pickle=False) as z:
            data = z[kind]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"shard {path} cannot be read as {kind} ({type(e).__name__}); {fix}") from None
    if len(data) != len(rows) or data.dtype != np.float32 or (sample_shape is not None and data.shape[1:] != tuple(sample_shape)):
        raise ArtifactError(f"shard {path} holds {data.dtype} {kind} of shape {data.shape}, not {len(rows)} float32 samples like the others; {fix}")
    return data


def _complete(plan: ShardPlan, run: dict, adm: bool) -> bool:
    if not plan.samples.is_file() or (adm and not plan.adm.is_file()):
        return False
    try:
        with np.load(plan.samples, allow_pickle=False) as z:
            return json.loads(str(z["settings"])).get("run") == run and len(z["seeds"]) == plan.num
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def _json(run: dict) -> str:
    return json.dumps(run, sort_keys=True)


def _canonical(run: dict) -> dict:
    """``run`` as it reads back from JSON (tuples become lists), so that comparisons are exact."""
    return json.loads(_json(run))


def _differences(theirs: dict, ours: dict) -> str:
    """What two runs disagree on, e.g. ``another artifact; seed 1 there, 0 here``."""
    out = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if a != b:
            scalar = not isinstance(a, (dict, list)) and not isinstance(b, (dict, list))
            out.append(f"{key} {a} there, {b} here" if scalar else f"another {key}")
    return "; ".join(out)
