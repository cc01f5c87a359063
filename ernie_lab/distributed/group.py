"""The process group and device mesh of a multi-process run, and a launcher for tests and benches.

Under ``torchrun`` the environment names this process's rank; :func:`mesh` joins the default process
group (nccl on CUDA, gloo on the CPU) if nobody has yet and returns the 1-D device mesh of all
processes. :func:`spawn` starts such a group on this machine without torchrun (gloo, a free port,
one thread per process), runs a function in every process and returns each rank's result.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

LAUNCH_HINT = "start the script with `torchrun --nproc_per_node N script.py`"


def mesh(device: str | torch.device | None = None) -> DeviceMesh:
    """The 1-D device mesh of every process, joining the default process group if needed.

    The backend is nccl when CUDA is available and ``device`` is not the CPU (each process then
    uses ``cuda:LOCAL_RANK``), else gloo.
    """
    if not dist.is_available():
        raise RuntimeError("tp_plan needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(f"tp_plan needs several processes in a process group: {LAUNCH_HINT}")
        cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),))


def mesh_device(device_mesh: DeviceMesh) -> torch.device:
    """Where this process's parameters live: its current GPU under nccl, else the CPU."""
    if device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_first(x: torch.Tensor, device_mesh: DeviceMesh | None) -> torch.Tensor:
    """``x`` as the mesh's first rank has it (in place; ``x`` unchanged without a mesh)."""
    if device_mesh is None:
        return x
    group = device_mesh.get_group()
    x = x.contiguous()
    dist.broadcast(x, src=dist.get_global_rank(group, 0), group=group)
    return x


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, nprocs: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=nprocs)
    try:
        torch.save(fn(*args), Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn, nprocs: int, *args) -> list:
    """Run ``fn(*args)`` in ``nprocs`` new processes joined in a gloo group on this machine.

    ``fn`` must be importable (a module-level function); each process uses one thread. Returns the
    return values (saved with ``torch.save``) in rank order; a failing rank raises here with its
    traceback.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry, args=(fn, nprocs, free_port(), out, args), nprocs=nprocs, join=True, start_method="spawn"
        )
        return [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(nprocs)]
