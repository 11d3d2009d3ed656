"""Worker for test_zero3_deepspeed.py: the eval hooks on a real DeepSpeed ZeRO-3 engine (2 CPU ranks, gloo).

Run as ``DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 zero3_worker.py``. Checks, on every
rank: the probe through the engine equals the probe of an unsharded copy; DriftTracker after one optimizer step
equals the float64 hand computation on the gathered weights; the sample grid equals the unsharded model's grid.
``stage3_param_persistence_threshold = 0`` keeps even the tiny norm weights partitioned, as large ones are at full size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import deepspeed  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import GatheredParameters  # noqa: E402
from eval_helpers import make_samples, randomize_, reference_drift  # noqa: E402

from anima_ft.eval import DriftTracker, ProbeRunner  # noqa: E402
from anima_ft.eval.eval_sets import collate_condition  # noqa: E402
from anima_ft.eval.sample_grid import SampleGridRunner  # noqa: E402
from anima_ft.model import AnimaConfig, build_anima  # noqa: E402
from anima_ft.model.vae import AnimaVAE, tiny_vae  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    model = randomize_(build_anima(AnimaConfig.tiny(), seed=0), seed=1)
    plain = randomize_(build_anima(AnimaConfig.tiny(), seed=0), seed=1)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=cfg)
    assert all(hasattr(p, "ds_tensor") for p in engine.module.parameters())
    sets = {"target": make_samples("t", 3), "replay": make_samples("r", 2)}
    got = ProbeRunner(sets, sigmas=(0.3, 0.7), num_noises=2).evaluate(engine)  # step 0: before any engine forward
    want = ProbeRunner(sets, sigmas=(0.3, 0.7), num_noises=2).evaluate(plain)
    for name in sets:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)

    tracker = DriftTracker(engine, per_group=True)
    cond = collate_condition(sets["target"][0], "cpu", torch.float32)
    out = engine(torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), *cond.values())
    engine.backward(out.pow(2).mean())
    engine.step()
    measured = tracker.measure()
    with GatheredParameters(list(engine.module.parameters())):
        now = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    for key, value in reference_drift(start, now).items():
        assert abs(measured[key] - value) <= 1e-9 * abs(value) + 1e-12, (key, measured[key], value)

    plain.load_state_dict(now)
    conds = [(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 9, 1]))]
    grid = SampleGridRunner(["p"], conds, [0, 1, 2], AnimaVAE(tiny_vae(base_dim=8)), "unused", num_steps=2,
                            latent_size=(4, 4), log_wandb=False)
    sharded, unsharded = grid.sample_images(engine), grid.sample_images(plain)
    if torch.distributed.get_rank() == 0:
        assert (sharded.int() - unsharded.int()).abs().max() <= 1
    print(f"rank {torch.distributed.get_rank()} OK", flush=True)


if __name__ == "__main__":
    main()
