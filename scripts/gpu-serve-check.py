"""GPU check of serving's forward pass: `pipeline.serve.inference.Loaded` on one GPU, eager and compiled
(`Loaded.compile`, batches padded to the compiled sizes), over batches already preprocessed on
the GPU (as DALI's mixed decoder leaves them), with only torch and timm: what batching buys on
a GPU, where the replica's images/s is set by its batch size.

    PYTHONPATH=. python scripts/gpu-serve-check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from pipeline.config import load_job
from pipeline.serve.inference import Loaded

SECONDS = 2.0  # timed per batch size, after warm-up
BATCHES = (1, 8, 32, 64, 128, 256)
COMPILED_MAX_BATCH = 64


def images_per_s(loaded: Loaded, batch: torch.Tensor) -> float:
    for _ in range(3):
        loaded.probabilities(batch)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < SECONDS:
        loaded.probabilities(batch)  # ends with a copy to the CPU: synchronized
        done += len(batch)
    return done / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda", 0)
    job = load_job("imagenet-r50", [])
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=1000).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    classes = [(f"n{i:08d}", str(i)) for i in range(1000)]
    crop = job.data.val_crop_px
    inputs = torch.randn(max(BATCHES), 3, crop, crop, device=device)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  timm {timm.__version__}", flush=True)

    eager = Loaded("resnet50", "0", model, classes, job, device, channels_last=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results |= {"eager": {}, "compiled": {}}
    for size in BATCHES:
        results["eager"][size] = images_per_s(eager, inputs[:size])
        print(f"eager     batch {size:>3}: {results['eager'][size]:8.0f} images/s", flush=True)

    compiled = Loaded("resnet50", "0", model, classes, job, device, channels_last=True)
    began = time.perf_counter()
    assert compiled.compile(COMPILED_MAX_BATCH, threads=1), "torch.compile failed"
    results["compile_s"] = time.perf_counter() - began
    results["compiled_sizes"] = compiled.sizes
    print(f"compiled for batches {compiled.sizes} in {results['compile_s']:.1f} s", flush=True)
    for size in (1, 3, 8, 32, 64):  # 3: padded to 4
        results["compiled"][size] = images_per_s(compiled, inputs[:size])
        print(f"compiled  batch {size:>3}: {results['compiled'][size]:8.0f} images/s", flush=True)

    # the compiled pass answers as the eager one: bf16 autocast in both, padding cut off
    for size in (3, 64):
        a, b = eager.probabilities(inputs[:size]), compiled.probabilities(inputs[:size])
        agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
        results[f"top1_agreement_batch_{size}"] = agree
        results[f"max_probability_difference_batch_{size}"] = (a - b).abs().max().item()
        print(f"batch {size}: top-1 agreement {agree:.3f}, max |p - p'| {(a - b).abs().max().item():.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
