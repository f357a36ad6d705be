"""ditrt.distributed: the chunk plan and a real one-rank gloo group (the multi-process runs are tested
through torchrun by the sampling and calibration tests)."""

import pytest
import torch

from ditrt import distributed
from ditrt.contracts.errors import ConfigError


def test_chunks_do_not_depend_on_the_world_size_and_cover_every_item_once():
    chunks = distributed.chunk_ranges(10, 4)
    assert [list(c) for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for size in (1, 2, 3, 5):
        taken = [k for r in range(size) for k in distributed.my_chunks(len(chunks), distributed.World(r, size))]
        assert sorted(taken) == list(range(len(chunks)))
    assert distributed.my_chunks(3, distributed.World(1, 2)) == [1]
    with pytest.raises(ConfigError, match="chunk size"):
        distributed.chunk_ranges(3, 0)


def test_single_process_has_no_group(monkeypatch):
    for v in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    with distributed.process_group("cpu") as world:
        assert world == distributed.SINGLE and not world.distributed
        assert distributed.all_gather_objects(3, world) == [3]
        assert world.device("cuda") == "cuda"


def test_one_rank_under_torchrun_variables_joins_a_gloo_group(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with distributed.process_group("cpu") as world:
        assert world.backend == "gloo" and world.distributed and world.is_main
        assert distributed.all_gather_objects({"a": 1}, world) == [{"a": 1}]
        assert torch.equal(distributed.all_reduce_max(torch.tensor([1.0, 2.0]), world), torch.tensor([1.0, 2.0]))
        assert world.device("cuda") == "cuda:0"
    assert distributed.current() == distributed.SINGLE


def test_missing_rendezvous_variables_are_named(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"), distributed.process_group("cpu"):
        pass
