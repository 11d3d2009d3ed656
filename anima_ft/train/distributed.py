"""A rank's life in the job, the same under ``deepspeed``, ``torchrun`` and Slurm ``srun``: process-group setup from
the environment, stop signals before training (exit 75), the peer watchdog (a dead, stopped or failed peer ends every
rank within ``dist.timeout_s``) and the per-environment build directory of DeepSpeed's CPU ops."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

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
    """Initialise the default process group (gloo on CPU, nccl on GPU unless ``backend`` says otherwise) and, for a
    world of two or more, this rank's :class:`PeerWatchdog` (a dead or failed peer ends it within ``timeout_s``)."""
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
    start_watchdog(rank, world, timeout_s)
    return DistEnv(rank, world, local_rank, device)


# -- stop signals, dead peers, failed peers ------------------------------------------------------------------------
EXIT_PREEMPTED = 75
EXIT_FAILED = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_watchdog: PeerWatchdog | None = None  # the running watchdog of this process (one per rank)


def _say(msg: str) -> None:
    """One line to stderr without the logging module (callable from a signal handler or a thread, lock-free)."""
    os.write(2, f"[rank{os.environ.get('RANK', '0')}] anima_ft: {msg}\n".encode())


def _exit_before_training(signum: int, frame) -> None:
    """SIGTERM/SIGUSR1 before the training loop runs: nothing new to save, so exit 75 and let the job be requeued;
    exit 1 instead when a peer already failed (the signal is then the launcher tearing the job down)."""
    name = signal.Signals(signum).name
    if _watchdog is not None and _watchdog.peer_failed():
        _say(f"{name} during start-up after a peer failed: exiting {EXIT_FAILED}")
        os._exit(EXIT_FAILED)
    _say(f"{name} during start-up (before the first training step): nothing to save yet, exiting {EXIT_PREEMPTED}")
    os._exit(EXIT_PREEMPTED)


def _signal_pipe_reader(fd: int) -> None:
    """Acts on stop signals while the main thread is blocked in C++ (a collective, a rendezvous, a large load), where
    Python handlers do not run: the interpreter writes each signal number to the wakeup fd as it arrives."""
    while True:
        for signum in os.read(fd, 64):
            if signum in STOP_SIGNALS and signal.getsignal(signum) is _exit_before_training:
                _exit_before_training(signum, None)


def install_stop_handlers() -> None:
    """From process start until the trainer installs its own: SIGTERM/SIGUSR1 end the process with exit code 75.

    Call first thing in the entry point (main thread). ``Trainer.train()`` then replaces the handlers with one that
    saves a checkpoint at the end of the current step.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_before_training)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_signal_pipe_reader, args=(read_fd,), name="anima_ft-signals", daemon=True).start()


def _launcher_chain() -> list[tuple[int, int]]:
    """``(pid, its parent pid)`` for this process and, under ``deepspeed``, for its per-node launcher: when a parent
    changes, the process above it has gone (the deepspeed runner, a torchrun agent, the calling shell)."""
    import psutil

    chain = [(os.getpid(), os.getppid())]
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            chain.append((parent.pid, parent.ppid()))
    except psutil.Error:
        pass
    return chain


class PeerWatchdog:
    """Ends this rank within ``timeout_s`` of a peer going silent (dead, SIGSTOPped, hung), at once when a peer reports
    a failure, and with a stop signal to itself when the launcher process above it is gone.

    Every rank bumps a counter in the rendezvous store (its own client of ``MASTER_ADDR:MASTER_PORT``) every
    ``poll_s`` and reads the others'. A peer whose counter has not moved for ``silence_s = timeout_s - 4 poll_s``, or a
    store that has not answered for that long, ends this rank with exit code 1: from the moment a peer stops, at most
    ``silence_s + 2 poll_s`` pass (its last beat may be seen up to one poll late, and judged one poll late), plus the
    exit; the bound ``timeout_s`` keeps one more poll of headroom for that, whatever the step time. Collectives keep their own ``timeout_s`` for hung-but-alive ranks.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float, addr: str, port: int):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.poll_s = min(2.0, max(0.1, timeout_s / 20))
        self.silence_s = timeout_s - 4 * self.poll_s
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"anima_ft_watchdog/{attempt}/"
        self._store = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(1.0, self.poll_s)))
        self._chain = _launcher_chain()
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in range(world_size) if r != rank}  # rank -> (counter, when it last moved)
        self._done: set[int] = set()
        self._store_ok = now
        self._peer_error = ""
        self._launcher_gone = False
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll_loop, name="anima_ft-heartbeat", daemon=True),
                         threading.Thread(target=self._judge_loop, name="anima_ft-watchdog", daemon=True)]
        for t in self._threads:
            t.start()

    def _key(self, kind: str, rank: int | None = None) -> str:
        return f"{self._prefix}{kind}" + ("" if rank is None else f"/{rank}")

    def _poll_once(self) -> None:
        self._store.add(self._key("beat", self.rank), 1)
        if self._store.check([self._key("error")]):
            self._peer_error = self._store.get(self._key("error")).decode(errors="replace")
        now = time.monotonic()
        for r, (count, _) in list(self._seen.items()):
            if r in self._done:
                continue
            if self._store.check([self._key("done", r)]):
                self._done.add(r)
                continue
            new = self._store.add(self._key("beat", r), 0)
            if new != count:
                self._seen[r] = (new, now)
        self._store_ok = now

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll_once()
            except Exception:  # noqa: BLE001 - an unreachable store is judged by its silence, in _judge_loop
                pass
            self._stop.wait(self.poll_s)

    def _launcher_alive(self) -> bool:
        import psutil

        for pid, ppid in self._chain:
            try:
                if psutil.Process(pid).ppid() != ppid:
                    return False
            except psutil.Error:
                return False
        return True

    def _judge_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if self._peer_error:
                self._fail(f"a peer failed ({self._peer_error}); ending this rank too")
            silent = [r for r, (_, moved) in self._seen.items() if r not in self._done and now - moved > self.silence_s]
            if silent:
                self._fail(f"rank(s) {silent} sent no heartbeat for more than {self.silence_s:.1f} s (dead, stopped or "
                           f"hung; dist.timeout_s={self.timeout_s:g}); ending this rank")
            if now - self._store_ok > self.silence_s:
                self._fail(f"the rendezvous store {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} (rank "
                           f"0 or the launcher hosts it) did not answer for {now - self._store_ok:.1f} s "
                           f"(dist.timeout_s={self.timeout_s:g}); ending this rank")
            if not self._launcher_gone and not self._launcher_alive():
                self._launcher_gone = True
                _say("the launcher process above this rank is gone: stopping as on SIGTERM")
                os.kill(os.getpid(), signal.SIGTERM)

    def _fail(self, msg: str) -> None:
        _say(msg)
        os._exit(EXIT_FAILED)

    def peer_failed(self) -> bool:
        """Whether a peer reported a failure or the store is gone (asked now, not at the last poll)."""
        try:
            return bool(self._peer_error) or self._store.check([self._key("error")])
        except Exception:  # noqa: BLE001 - the store host (rank 0 or the launcher) is gone: a failure
            return True

    def report_error(self, msg: str) -> str:
        """Tell every peer that this rank failed, so that none waits at a collective (best effort, bounded). The
        first failure reported is the one every rank sees (a later one, often a peer's broken connection to the
        rank that failed first, does not replace it); returns it: ``msg`` itself, or an earlier peer's."""
        mine = f"rank {self.rank}: {msg}"[:2000]
        try:
            return self._store.compare_set(self._key("error"), "", mine).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store is gone: the peers see that as silence
            return mine

    def stop(self) -> None:
        """This rank is done (finished or preempted): stop watching, and tell the peers not to wait for its beat."""
        if self._stop.is_set():
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * self.poll_s + 1)
        try:
            self._store.set(self._key("done", self.rank), "1")
        except Exception:  # noqa: BLE001 - the peers are done as well, or already failed
            pass


def start_watchdog(rank: int, world_size: int, timeout_s: float) -> PeerWatchdog | None:
    """Start this rank's :class:`PeerWatchdog` (none for a world of one); :func:`stop_watchdog` ends it."""
    global _watchdog
    if world_size < 2:
        return None
    _watchdog = PeerWatchdog(rank, world_size, timeout_s, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return _watchdog


def stop_watchdog() -> None:
    """Mark this rank done for its peers and stop watching them (call before leaving after success or preemption)."""
    if _watchdog is not None:
        _watchdog.stop()


def fail_rank(exc: BaseException) -> NoReturn:
    """End this rank for ``exc``: tell the peers (they exit 1 within one watchdog poll instead of waiting at a
    collective; the first failure reported is kept, and a rank whose error followed a peer's names that peer's
    first), print the traceback, exit 1 at once. ``os._exit``: interpreter shutdown with a live process group
    and store threads aborts in C++ destructors (SIGABRT) instead of exiting 1."""
    if _watchdog is not None:
        first = _watchdog.report_error(f"{type(exc).__name__}: {exc}")
        if not first.startswith(f"rank {_watchdog.rank}: "):  # this rank's error follows from a peer's
            _say(f"a peer failed ({first}); ending this rank too. This rank's own error, which followed:")
    sys.stderr.write("".join(traceback.format_exception(exc)))
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(EXIT_FAILED)


# -- where PyTorch builds DeepSpeed's CPU ops ----------------------------------------------------------------------
STALE_LOCK_AGE_S = 30 * 60  # a CPU op builds in about a minute on 2 cores; a lock this old belongs to no live build
LOCK_GRACE_S = 10  # a lock younger than this may be between its holder's close() and remove()


def use_env_extensions_dir() -> Path:
    """Build PyTorch/DeepSpeed JIT ops into ``<venv>/torch_extensions`` (``TORCH_EXTENSIONS_DIR``, unless set).

    The default, ``~/.cache/torch_extensions``, is shared by every environment of the user: one build killed there
    leaves a lock on which every later start of every environment waits forever. Call before deepspeed is imported.
    """
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def _lock_holders(lock: Path) -> tuple[list[int], bool]:
    """Pids that hold ``lock`` open (PyTorch's build keeps it open while it builds), and whether every process that
    could hold it (a Python process: the build runs inside one) could be inspected."""
    holders, complete = [], True
    target = os.path.realpath(lock)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == target:
                    holders.append(int(entry.name))
                    break
        except PermissionError:  # another user's process, or a protected one (a sandbox's init)
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    complete = complete and b"python" not in f.read()
            except OSError:
                complete = False
        except OSError:  # the process ended while we looked
            pass
    return holders, complete


def check_extension_locks(root: str | os.PathLike, max_age_s: float = STALE_LOCK_AGE_S) -> None:
    """Raise ``RuntimeError`` for a stale build lock under ``root`` (``root/<op>/lock``): one that no process holds
    open, or older than ``max_age_s``. PyTorch would wait on it forever; the message names the file and the fix."""
    for lock in sorted(Path(root).glob("*/lock")):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            continue
        holders, complete = _lock_holders(lock)
        if not lock.exists():
            continue
        if age > max_age_s:
            why = f"it is {age / 60:.0f} min old (limit {max_age_s / 60:.0f} min), held by pids {holders or 'none'}"
        elif not holders and complete and age > LOCK_GRACE_S:
            why = f"no process holds it open (it is {age:.0f} s old): the build that created it was killed"
        else:
            continue
        raise RuntimeError(f"stale PyTorch extension build lock {lock}: {why}. Every start would wait on it forever. "
                           f"Fix: check that no build of {lock.parent.name} is running (`fuser {lock}`), then "
                           f"`rm {lock}` and start again")
