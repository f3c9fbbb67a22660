"""The all-gather and shuffle-BN paths with two real gloo processes."""

from __future__ import annotations

import distributed_workers
import pytest
import torch
import torch.multiprocessing as mp


def spawn(worker, tmp_path) -> list[dict]:
    mp.spawn(worker, args=(2, tmp_path / "store", tmp_path), nprocs=2, join=True)
    return sorted(tmp_path.glob("*-[01].pt"))


@pytest.mark.slow
def test_all_gathered_keys_fill_identical_queues_in_rank_order(tmp_path):
    files = spawn(distributed_workers.gather_into_queue, tmp_path)
    results = [torch.load(f) for f in files]
    torch.testing.assert_close(results[0]["keys"], results[1]["keys"])
    # 3 steps × (rank 0: 3 keys, rank 1: 3 keys) = 18 keys into 10 slots; the newest 10 remain.
    written = [100 * step + 10 * rank + i for step in range(3) for rank in range(2) for i in range(3)]
    pointer = int(results[0]["pointer"])
    assert pointer == 18 % 10
    in_age_order = torch.cat([results[0]["keys"][pointer:], results[0]["keys"][:pointer]])[:, 0]
    assert in_age_order.tolist() == [float(v) for v in written[-10:]]


@pytest.mark.slow
def test_shuffle_bn_under_ddp_mixes_ranks_and_keeps_keys_aligned(tmp_path):
    rank0, rank1 = (torch.load(f) for f in spawn(distributed_workers.shuffle_bn_step, tmp_path))
    assert rank0["key_bn"] == rank1["key_bn"] == "shuffle"  # auto picks shuffle-BN under DDP
    assert rank0["roundtrip"] and rank1["roundtrip"]
    assert rank0["foreign"] + rank1["foreign"] > 0  # each rank's key batch holds the other's samples
    assert rank0["keys_match"] and rank1["keys_match"]
    torch.testing.assert_close(rank0["grad"], rank1["grad"])  # DDP averaged the gradients
    torch.testing.assert_close(rank0["queue"], rank1["queue"])
    assert rank0["pointer"] == rank1["pointer"] == 16 % 10
