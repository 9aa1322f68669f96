"""GPU check: the training step of resnet-pipe on one GPU, with only torch, torchvision and timm.

Measures steady-state training images/s per GPU for ResNet-50/101/152 with bf16 autocast and
channels_last (the job defaults on CUDA), the same step in fp32 and in fp16 with GradScaler, and
optionally torch.compile, over in-memory tensors: the ceiling the full pipeline is compared with.
It also checks that the step learns (loss falls on a fixed batch) in every precision.

    PYTHONPATH=. python scripts/gpu-check.py [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from pipeline.config import load_job
from pipeline.train.optim import build_optimizer
from pipeline.train.step import Stepper, configure_backends, evaluate

WARMUP_STEPS = 15
TIMED_STEPS = 40


def measure(arch: str, batch: int, precision: str, compile_model: bool = False) -> dict:
    device = torch.device("cuda")
    configure_backends(device)  # as the training loop does
    job = load_job(f"imagenet-r{arch.removeprefix('resnet')}", [f"run.precision='{precision}'"])
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, job)
    runnable = torch.compile(model) if compile_model else model
    step = Stepper(runnable, optimizer, job, device, num_classes=1000)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    compile_start = time.perf_counter()
    first = step([(images, labels)], lr=0.01).item()  # compiles, when compiling
    compile_s = time.perf_counter() - compile_start
    for _ in range(WARMUP_STEPS):
        step([(images, labels)], lr=0.01)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        last = step([(images, labels)], lr=0.01)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    scores = evaluate(model, [(images, labels, None)], device, job, 1000)  # autocast eval, same batch
    return {
        "arch": arch,
        "precision": precision,
        "compiled": compile_model,
        "batch": batch,
        "images_per_s": batch * TIMED_STEPS / elapsed,
        "first_loss": first,
        "last_loss": last.item(),
        "train_top1_on_batch": scores.metrics["val/top1"],
        "first_step_s": compile_s,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on ResNet-50")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  timm {timm.__version__}")
    torch.backends.cudnn.benchmark = True
    cases = [
        ("resnet50", 256, "bf16", False),
        ("resnet101", 256, "bf16", False),
        ("resnet152", 256, "bf16", False),
        ("resnet50", 256, "fp16", False),
        ("resnet50", 256, "fp32", False),
    ]
    if args.compile:
        cases.append(("resnet50", 256, "bf16", True))
    results = []
    for case in cases:
        torch.cuda.reset_peak_memory_stats()
        result = measure(*case)
        results.append(result)
        learned = "learns" if result["last_loss"] < result["first_loss"] else "DOES NOT LEARN"
        print(
            f"{result['arch']:<10} {result['precision']:<5} compiled={result['compiled']!s:<5} "
            f"batch {result['batch']}: {result['images_per_s']:8.0f} images/s  "
            f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} ({learned})  "
            f"peak {result['max_memory_gib']:.1f} GiB  first step {result['first_step_s']:.1f} s",
            flush=True,
        )
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
