"""Two gloo ranks on CPU: the probe table is bitwise the world-size-1 table; sharded drift equals the local one.

Condition of the bitwise claim (tests/conftest.py): both sides run with the same intra-op thread count
(``RANK_THREADS``), and the probe computes each sample on its own, so the world size only changes which rank runs it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from eval_helpers import make_samples, perturb_, randomize_

from anima_ft.eval.drift_tracker import DriftTracker
from anima_ft.eval.probe import evaluate_sets

SIGMAS = (0.3, 0.7)
K = 2


def _tiny(dtype=torch.float32):
    from anima_ft.model import AnimaConfig, build_anima

    return randomize_(build_anima(AnimaConfig.tiny(), dtype=dtype, seed=0), seed=1)


def _eval_sets():
    return {"target": make_samples("t", 3, seed=1), "replay": make_samples("r", 2, seed=2)}


def _measure_all():
    """Probe tables, replicated-parameter drift, and ZeRO-3-style partition drift, on the current process group."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    model = _tiny()
    tables = evaluate_sets(model, _eval_sets(), SIGMAS, K)
    replicated = DriftTracker(model, per_group=True)
    z3_model = _tiny()
    for p in z3_model.parameters():  # this rank's contiguous slice of the flat tensor, as ZeRO-3 would hold it
        flat = p.data.view(-1)
        chunk = -(-flat.numel() // world)
        p.ds_tensor = flat[rank * chunk:(rank + 1) * chunk]
    zero3 = DriftTracker(z3_model, per_group=True)
    perturb_(model, seed=7)
    perturb_(z3_model, seed=7)
    # under ZeRO-3 the probe runs equal forward counts on all ranks (3 target samples on 2 ranks)
    z3_tables = evaluate_sets(z3_model, _eval_sets(), SIGMAS, K)
    return {"tables": tables, "drift": replicated.measure(), "drift_z3": zero3.measure(), "z3_tables": z3_tables,
            "n_tracked": len(replicated._tracked)}


def _worker(rank: int, world: int, init_file: str, out_dir: str, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_measure_all(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_match_one(tmp_path, rank_threads):
    assert torch.get_num_threads() == rank_threads  # the same thread count on both sides of the bitwise comparison
    single = _measure_all()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), rank_threads), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    n_params = len(list(_tiny().parameters()))
    assert ranks[0]["n_tracked"] + ranks[1]["n_tracked"] == n_params
    for res in ranks:
        for name, table in single["tables"].items():
            assert torch.equal(res["tables"][name], table), name  # bitwise, not just close
            assert torch.equal(res["z3_tables"][name], single["z3_tables"][name])
        for key, value in single["drift"].items():
            assert res["drift"][key] == pytest.approx(value, rel=1e-10), key
            assert res["drift_z3"][key] == pytest.approx(value, rel=1e-10), key
