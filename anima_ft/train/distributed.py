"""Process-group setup from the environment: the same code under ``deepspeed``, ``torchrun`` and Slurm ``srun``."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from anima_ft.runtime import free_port


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def env_world_size() -> int:
    """World size from the launcher's environment (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def fill_env_from_slurm() -> None:
    """Under ``srun`` (no RANK set), derive RANK / WORLD_SIZE / LOCAL_RANK from the Slurm variables.

    MASTER_ADDR / MASTER_PORT must be exported by the sbatch script (first host of the allocation).
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun without MASTER_ADDR; export MASTER_ADDR/MASTER_PORT in the sbatch "
                           "script (see launch/slurm/)")


SHM_DIR = "/dev/shm"


def release_cpu_shm_segment(rank: int) -> None:
    """Unlink the name of this rank's DeepSpeed CPU shared-memory allreduce segment once every rank has mapped it.

    DeepSpeed's CPU communication op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (tens of MB) and never unlinks it, so every CPU run leaks that memory until reboot. Peers open the segment only
    while initialising; after a barrier the name can go: the mapping stays valid and is freed when the process exits.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:  # the shm op is not built on this machine, or a launcher set other names
        pass


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Initialise the default process group (gloo on CPU, nccl on GPU unless ``backend`` says otherwise)."""
    import deepspeed

    fill_env_from_slurm()
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               rank=rank, world_size=world)
    if not cuda:
        release_cpu_shm_segment(rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(rank, world, local_rank, device)
