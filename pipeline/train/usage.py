"""What each node's machine is doing, sampled by every rank and logged by rank 0 per node:
CPU and memory use of the node, the worker's resident memory, and its GPU's memory and use.

    sample()          # on every rank, at each checkpoint (a collective point of the loop)
    per_node(samples) # on rank 0: {"system/<node ip>/cpu_percent": ..., ...}, one set per node
"""

from __future__ import annotations

import psutil
import ray.util
import torch

psutil.cpu_percent(interval=None)  # starts the clock: the first sample covers the time since import


def sample() -> dict:
    """This rank's node and device, now. CPU use is since the previous call (the first: 0)."""
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
