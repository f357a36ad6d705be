"""Several processes, one job: the torch.distributed world that ``torchrun`` launches.

ditrt launches nothing itself. ``torchrun --nproc_per_node N -m ditrt ...`` (or ``torchrun ...
$(which ditrt) ...``) starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; :func:`process_group` joins them (NCCL when the job runs on CUDA, gloo on the
CPU) and a plain single-process run is a world of size 1 with no process group at all.

Work is split by *chunk*, not by rank: a job of ``n`` items is cut into fixed chunks of
``chunk`` items (:func:`chunk_ranges`, independent of the number of processes) and rank ``r``
takes chunks ``r, r + size, ...`` (:func:`my_chunks`). Every chunk therefore runs with the same
batch composition whatever the world size, so results are bit-identical for 1 or N processes
(item i always uses seed + i), and a finished chunk is a unit that a resumed run can skip.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ditrt.contracts.errors import ConfigError

# torch is imported where it is used: World and the chunk plan are read by torch-free modules
# (the method registry that the CLI loads at start-up), which must not pay torch's import.
if TYPE_CHECKING:
    import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """Who this process is: ``rank`` of ``size`` processes, ``local_rank`` on its machine (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl", "gloo", or None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is joined (collectives run through it, even for one rank)."""
        return self.backend is not None

    def device(self, device: str) -> str:
        """The device this rank uses for ``device``: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
        if self.distributed and str(device) == "cuda":  # torchrun: one GPU per local rank
            return f"cuda:{self.local_rank}"
        return str(device)


SINGLE = World()


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process: then it joins a
    process group, also as the only rank (``--nproc_per_node 1`` checks the NCCL path on one GPU)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> World:
    """The world of the joined process group, or :data:`SINGLE` when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


@contextmanager
def process_group(device: str = "cpu"):
    """Join the torchrun world for the duration of the block; yields the :class:`World`.

    Without torchrun's variables nothing is initialised and the world is :data:`SINGLE`. A group that is
    already initialised (a caller's) is used and left alone."""
    import torch
    import torch.distributed as dist

    if not launched():
        yield SINGLE
        return
    if dist.is_initialized():
        yield current()
        return
    missing = [v for v in (*ENV_VARS, "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch several processes with `torchrun --nproc_per_node N`")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible): start at most one process per GPU")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def chunk_ranges(n: int, chunk: int) -> list[range]:
    """``n`` items cut into consecutive chunks of ``chunk`` (the last may be shorter)."""
    if chunk <= 0:
        raise ConfigError(f"chunk size must be positive, got {chunk}")
    return [range(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def my_chunks(num_chunks: int, world: World) -> list[int]:
    """The chunk indices rank ``world.rank`` takes: round robin, so ranks get near-equal work."""
    return list(range(world.rank, num_chunks, world.size))


def map_items(fn, items, world: World) -> list:
    """``[fn(item) for item in items]`` with each rank computing its share (round robin, one item a chunk)
    and every rank getting every result, in item order. For independent jobs whose result depends only
    on the item; ``fn`` returns small picklable CPU data (results travel as objects)."""
    mine = {i: fn(items[i]) for i in my_chunks(len(items), world)}
    merged: dict = {}
    for part in all_gather_objects(mine, world):
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed:
        dist.barrier()


def all_gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable; used for small, trusted in-process data only), in rank order."""
    import torch.distributed as dist

    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    import torch.distributed as dist

    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_max(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over ranks (in place; exact, so order does not matter)."""
    import torch.distributed as dist

    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (in place). Float sums depend on the order: use it for counts, or
    in float64 where the result is compared loosely; gather and add in index order where it must be exact."""
    import torch.distributed as dist

    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
