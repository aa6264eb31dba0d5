"""The process world of a driver started by ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address) in
each process's environment; a plain ``python`` start sets none and is a world of one. A process
group (gloo on the CPU, nccl on CUDA) is started only when there is more than one process, so a
single-process run never touches ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch


def _env_int(name, default):
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes. Without a process group (a world of one, or
    a rank simulated in a test) the collectives return this process's own values."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        return self.rank == 0

    @staticmethod
    def _group():
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def _reduce(self, value, op):
        if not self._group():
            return int(value)
        dist = torch.distributed
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def sum(self, value: int) -> int:
        return self._reduce(value, torch.distributed.ReduceOp.SUM if self._group() else None)

    def max(self, value: int) -> int:
        return self._reduce(value, torch.distributed.ReduceOp.MAX if self._group() else None)

    def barrier(self):
        if self._group():
            torch.distributed.barrier()

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) when there are several processes."""
        if self.size > 1 and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


def init_world(device: str = "cpu") -> World:
    """The world from the launcher's environment; joins the process group when ``WORLD_SIZE > 1``.

    Each process then gets an even share of this machine's CPU cores for its intra-op threads:
    two processes each running the default (every core) would fight over the same cores."""
    world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if world.size <= 1:
        return world
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cpus // _env_int("LOCAL_WORLD_SIZE", world.size)))
    return world


def leave_process_group(code: int) -> None:
    """Under a launcher (``WORLD_SIZE > 1``): end the process without the interpreter's teardown.

    At interpreter exit gloo's worker threads can still release the last tensor of a finished
    collective while Python finalises; the tensor's Python object then needs the GIL and the
    process aborts ("terminate called without an active exception", SIGABRT, in
    ``c10::TensorImpl::decref_pyobject`` with the main thread in ``Py_FinalizeEx``: about one
    two-process ``prsl-finetune`` run in ten on this project's CPU VM, after the run had completed
    and been written). So a finished process waits for the others when the group is still up
    (rank 0 evaluates and writes meanwhile), destroys it, flushes its streams and leaves with
    ``os._exit``. A world of one returns and exits normally. Used by ``prsl-finetune`` and
    ``prsl-attack``."""
    if _env_int("WORLD_SIZE", 1) <= 1:
        return
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
