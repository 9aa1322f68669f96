"""What each node's machine is doing, sampled by every rank and logged by rank 0 per node:
CPU and memory use of the node, the worker's resident memory, and its GPU's memory and use.

    sample()          # on every rank, at each checkpoint (a collective point of the loop)
    per_node(samples) # on rank 0: {"system/<node ip>/cpu_percent": ..., ...}, one set per node

And how the threads of a process share its cores: `quick_gil_handoffs()` for the process,
`single_threaded_torch()` for a helper thread; `free_port()` for a server on this machine.
"""

from __future__ import annotations

import ctypes
import functools
import socket
import sys
from pathlib import Path

import psutil
import torch

GIL_SWITCH_INTERVAL_S = 0.0005  # Python's default is 0.005

psutil.cpu_percent(interval=None)  # starts the clock: the first sample covers the time since import


def sample() -> dict:
    """This rank's node and device, now. CPU use is since the previous call (the first: 0)."""
    import ray.util  # here: the data loader uses this module too, without Ray

    memory = psutil.virtual_memory()
    values = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": memory.percent,
        "worker_rss_gb": psutil.Process().memory_info().rss / 2**30,
    }
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        values["gpu_memory_gb"] = torch.cuda.memory_allocated(device) / 2**30
        values["gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        try:
            values["gpu_percent"] = float(torch.cuda.utilization(device))
        except (RuntimeError, ModuleNotFoundError):  # needs NVML (pynvml); memory figures still hold
            pass
    return {"node": ray.util.get_node_ip_address(), "values": values}


def per_node(samples: list[dict]) -> dict[str, float]:
    """MLflow metrics from every rank's sample: node-wide figures once per node, the worker and
    GPU figures summed over the node's ranks."""
    metrics: dict[str, float] = {}
    for s in samples:
        prefix = f"system/{s['node']}/"
        for key, value in s["values"].items():
            name = prefix + key
            node_wide = key in ("cpu_percent", "memory_percent")
            metrics[name] = value if node_wide else metrics.get(name, 0.0) + value
    return metrics


def quick_gil_handoffs() -> None:
    """Shortens Python's GIL switch interval for this process. Ray Train runs the training loop,
    and the Serve app its forward pass, on a thread beside others (Ray's, DALI's callbacks, an
    event loop); the PyTorch ops of a step each take the GIL, and a thread that wants it back
    waits up to the interval. Measured with `resnet-pipe bench train`: 0.79-0.82 of the bare
    loop with the default, 0.85-0.86 with 0.5 ms (docs/benchmarks.md)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_threaded_torch() -> None:
    """Runs this thread's PyTorch ops on this thread alone, leaving the process's setting (the
    training step's or the forward pass's threads) as it is. For helper threads that call torch
    (DALI's resize callbacks, the Serve replica's reload thread).

    Why it matters: torch's OpenMP runtime (libgomp) gives every thread that runs a parallel op a
    team of its own, and once the OpenMP threads of all teams outnumber the cores, it stops
    spinning between parallel regions and sleeps on a futex instead, for every team. One helper
    thread with a default team of 2 put the training threads to sleep about 1,200 times a second
    and cost `bench train` about 10 % (docs/benchmarks.md).

    The team size is a per-thread OpenMP setting; torch sets it on a thread's first call into its
    thread settings, so that call comes first and ours after it.
    """
    torch.get_num_threads()
    libgomp, mkl = _runtimes()
    if libgomp is not None:
        libgomp.omp_set_num_threads(1)
    if mkl is not None:  # MKL's matrix products (a ResNet's last layer) keep a team size of their own
        mkl.MKL_Set_Num_Threads_Local(1)


@functools.cache
def _runtimes() -> tuple[ctypes.CDLL | None, ctypes.CDLL | None]:
    """The OpenMP runtime torch's CPU ops run on, and the library that carries MKL's thread
    settings (torch links MKL statically); None for builds without them."""
    lib = Path(torch.__file__).parent / "lib"
    libgomp = next(lib.glob("libgomp*.so*"), None)
    cpu = ctypes.CDLL(str(lib / "libtorch_cpu.so")) if (lib / "libtorch_cpu.so").exists() else None
    return (
        ctypes.CDLL(str(libgomp)) if libgomp is not None else None,
        cpu if cpu is not None and hasattr(cpu, "MKL_Set_Num_Threads_Local") else None,
    )
