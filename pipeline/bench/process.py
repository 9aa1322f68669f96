"""Measuring in a fresh process set up as the pipeline's workers are, so that a bare loop and
the pipeline differ by the pipeline alone."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def in_worker_process(function: Callable, *args):
    """`function(*args)` in a new process that starts with the malloc settings of Ray Train
    workers and Serve replicas (`pipeline.cluster.launch.WORKER_ENV`), so that a bare loop and the
    pipeline differ by the pipeline alone. With glibc's defaults ResNet-50's forward pass on
    2 cores gave 25 images/s, against 35 with them (docs/benchmarks.md)."""
    from pipeline.cluster.launch import WORKER_ENV

    saved = {key: os.environ.get(key) for key in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # a spawned child reads them when it starts
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(function, *args).result()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
