"""How the threads of a process share its cores, for every package that runs torch beside other
threads: `quick_gil_handoffs()` for the process, `single_threaded_torch()` for a helper thread;
`free_port()` for a server on this machine; and `bf16_units()`, whether a device computes in bf16
at speed."""

from __future__ import annotations

import ctypes
import functools
import socket
import sys
from pathlib import Path

import torch

GIL_SWITCH_INTERVAL_S = 0.0005  # Python's default is 0.005


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


def bf16_units(device: torch.device) -> bool:
    """Whether `device` runs bf16 autocast on units made for it: a GPU that supports bf16, or a
    CPU with AVX-512's BF16 extension or AMX.

    oneDNN has bf16 kernels for any AVX-512 CPU, but without those units it converts each operand
    to fp32 and back, and PyTorch's reference path is slower still: the paper's ResNet-20 training
    step at batch 128 on 2 cores ran in bf16 at 212 images/s against 642 in fp32 on an Intel Xeon
    with AVX-512 and VNNI but no BF16 (2026-12-06), and at 38.6 against 483 on an AMD EPYC with
    AVX2 alone (2026-12-05); with AVX-512 BF16, at 1.4-1.6 times fp32 (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def no_bf16_units(where: str, device: torch.device) -> str:
    """Why bf16 is refused on `device` (`bf16_units` said no), for a message that begins with
    the setting and ends with what to set instead."""
    units = "AVX-512 BF16 or AMX" if device.type == "cpu" else "compute capability 8.0 or later"
    has = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else "an older GPU"
    return (
        f"{where} has no bf16 units ({units}; it has {has}), so bf16 would run on emulated or "
        "reference kernels, 3 to 12 times slower than fp32"
    )


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
