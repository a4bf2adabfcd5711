import pytest
import torch
import torch.distributed as dist

from pfclib.multiproc import run_gloo


def _sum_ranks(rank, world_size, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


@pytest.mark.distributed
def test_run_gloo_two_processes_form_one_group():
    out = run_gloo(_sum_ranks, 2, 10)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 for o in out)
    assert all(o["sum"] == 21.0 for o in out)


@pytest.mark.distributed
def test_run_gloo_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 1.*boom on rank 1"):
        run_gloo(_fail_on_one, 2)


def test_run_gloo_rejects_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_gloo(_sum_ranks, 0, 1)
