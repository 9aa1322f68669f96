"""Table 6 at full scale on one GPU: ResNet-20, 32, 44, 56 and 110 on CIFAR-10, each on the
paper's whole schedule (batch 128, SGD 0.1 with momentum 0.9, weight decay 1e-4, divided by 10
at 32k and 48k iterations, 64k iterations; ResNet-110 at 0.01 for its first 400), with the
paper's augmentation (4-pixel zero padding, random 32 x 32 crops, flips, the per-pixel mean
subtracted). It needs only torch, torchvision, timm, the project's models and a CIFAR-10 folder
of `train/<class>/*` and `test/<class>/*` images, which fit a device machine that has no DALI,
Ray or MLflow:

    python scripts/gpu-paper.py --data data/cifar10 --out gpu-paper.json
    python scripts/gpu-paper.py --data data/cifar10 --device cpu --iterations 20   # a check, anywhere

The images are decoded once and held on the GPU; each batch is padded, cropped and flipped
there. The nets train at once, one process each, so that one net's kernel launches fill the
GPU while another's wait (small CIFAR nets leave most of an H200 idle); each uses channels_last
and bf16 autocast, with `torch.compile` unless `--no-compile`. Every 4,000 iterations and at
the end a net's test error is measured on the 10,000 test images; the results go to `--out` as
JSON and to the terminal as Table 6's rows beside the paper's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's models, without installing it

from pipeline.models import create_model  # noqa: E402
from pipeline.models.measure import parameters  # noqa: E402

TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}  # test error, % (He et al. 2015)
BATCH, LR, BOUNDARIES, ITERATIONS = 128, 0.1, (32000, 48000), 64000
EVAL_EVERY = 4000


def load_split(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image under folder/<class>/ as N x 32 x 32 x 3 uint8, and its label (sorted classes)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, label) for label, c in enumerate(classes) for f in sorted((folder / c).iterdir())]

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    with ThreadPoolExecutor(16) as pool:
        images = np.stack(list(pool.map(decode, [f for f, _ in files])))
    return images, np.array([label for _, label in files])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's augmentation of a batch already mean-subtracted (N x 3 x 32 x 32 float): zero
    padding of 4, a random 32 x 32 crop, a horizontal flip with probability 1/2."""
    n = images.shape[0]
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 9, (n,), device=images.device, generator=generator)
    base = torch.arange(32, device=images.device)
    rows = (dy[:, None] + base)[:, None, :, None].expand(n, 3, 32, 40)
    crops = padded.gather(2, rows)  # N x 3 x 32 x 40: the rows of each crop
    cols = (dx[:, None] + base)[:, None, None, :].expand(n, 3, 32, 32)
    crops = crops.gather(3, cols)
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def lr_at(step: int, depth: int) -> float:
    if depth >= 110 and step < 400:
        return LR / 10  # "0.01 ... until the training error is below 80 % (about 400 iterations)"
    return LR * 0.1 ** sum(step >= b for b in BOUNDARIES)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    wrong = 0
    with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16, enabled=images.is_cuda):
        for i in range(0, len(images), 1000):
            batch = images[i : i + 1000].contiguous(memory_format=torch.channels_last)
            wrong += (model(batch).argmax(1) != labels[i : i + 1000]).sum().item()
    model.train()
    return wrong / len(images)


def train(depth: int, args: argparse.Namespace, results: dict) -> None:
    """One net, its whole schedule; writes its row into `results`."""
    device = torch.device(args.device)
    torch.manual_seed(depth)
    data = torch.load(args.cache, weights_only=True)
    train_x = data["train_x"].to(device).float()
    mean = train_x.mean(0, keepdim=True)  # the per-pixel mean of the training images
    train_x = (train_x - mean) / 255
    train_y = data["train_y"].to(device)
    test_x = ((data["test_x"].to(device).float() - mean) / 255).contiguous()
    test_y = data["test_y"].to(device)
    model = create_model(f"cifar_resnet{depth}", num_classes=10).to(device, memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases, as the project's recipes
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        momentum=0.9,
    )
    step_model = model if args.no_compile or device.type != "cuda" else torch.compile(model)
    generator = torch.Generator(device=device).manual_seed(depth)
    curve, started, step = [], time.perf_counter(), 0
    per_epoch = len(train_x) // BATCH
    while step < args.iterations:
        order = torch.randperm(len(train_x), device=device, generator=generator)
        for k in range(per_epoch):
            if step == args.iterations:
                break
            rows = order[k * BATCH : (k + 1) * BATCH]
            images = augment(train_x[rows], generator).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, depth)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(step_model(images).float(), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % EVAL_EVERY == 0 or step == args.iterations:
                curve.append((step, evaluate(model, test_x, test_y)))
                print(f"ResNet-{depth}: iteration {step}, test error {100 * curve[-1][1]:.2f} %", flush=True)
    results[depth] = {
        "parameters": parameters(model),
        "test_error": curve[-1][1],
        "curve": curve,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 as train/<class>/, test/<class>/")
    parser.add_argument("--out", type=Path, default=Path("gpu-paper.json"))
    parser.add_argument("--depths", type=int, nargs="+", default=sorted(TABLE6))
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    train_x, train_y = load_split(args.data / "train")
    test_x, test_y = load_split(args.data / "test")
    args.cache = args.out.with_suffix(".data.pt")  # the decoded images, read by every process
    to_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    torch.save(
        {"train_x": to_tensor(train_x), "train_y": torch.from_numpy(train_y),
         "test_x": to_tensor(test_x), "test_y": torch.from_numpy(test_y)}, args.cache,
    )  # fmt: skip
    took = time.perf_counter() - started
    print(f"{len(train_x)} training and {len(test_x)} test images decoded in {took:.0f} s")
    with mp.Manager() as manager:
        results = manager.dict()
        processes = [
            mp.get_context("spawn").Process(target=train, args=(d, args, results)) for d in args.depths
        ]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        rows = dict(results)
    args.cache.unlink()
    total = time.perf_counter() - started
    args.out.write_text(json.dumps({"seconds": total, "iterations": args.iterations, "nets": rows}, indent=1))
    print(f"| net | parameters | test error (%) | paper (%) | minutes |  ({total / 60:.1f} min in all)")
    for depth in args.depths:
        if depth in rows:
            r = rows[depth]
            print(f"| ResNet-{depth} | {r['parameters'] / 1e6:.2f}M | {100 * r['test_error']:.2f} | "
                  f"{TABLE6[depth]} | {r['seconds'] / 60:.1f} |")  # fmt: skip
        else:
            print(f"| ResNet-{depth} | failed: see its process's output above |")


if __name__ == "__main__":
    main()
