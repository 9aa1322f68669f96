"""The training step and evaluation: pure PyTorch, no Ray and no DALI.

The Ray Train loop (`pipeline.train.loop`) calls these on each rank; `scripts/gpu-check.py` calls the
same code on a bare GPU. Precision follows the device unless the job says: bf16 autocast on
CUDA, fp32 on the CPU; the memory format is channels_last on both.

    step = Stepper(ddp_model, optimizer, job, device, num_classes=1000)
    loss = step([(images, labels)], lr)             # one optimizer step (more batches: accumulation)
    scores = evaluate(model, val_batches, device, job, num_classes=1000)
    scores.metrics    # {"val/top1", "val/top5", "val/loss"}
    scores.per_class  # samples and top-1 errors of each class
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Job
from pipeline.data.mix import mix_batch
from pipeline.system import bf16_units, no_bf16_units
from pipeline.train.optim import set_lr


def configure_backends(device: torch.device) -> None:
    """The GPU settings of the published figures (NVIDIA DeepLearningExamples, torchvision's
    reference): cuDNN benchmarks the convolution algorithms for each input shape once and keeps
    the fastest. A ResNet's shapes are fixed within a run (one training crop, one evaluation
    crop), so the first steps pay and every later one gains. Nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class PrecisionError(ValueError):
    """A precision the device cannot run at speed, with the setting to use instead."""


def check_precision(job: Job, device: torch.device) -> None:
    """Raises PrecisionError for bf16 on a device without bf16 units (`pipeline.system.bf16_units`):
    it would train slower than fp32, not faster."""
    if job.run.precision == "bf16" and not bf16_units(device):
        where = f"{socket.gethostname()}'s {device.type.upper()}"
        raise PrecisionError(f"run.precision = bf16: {no_bf16_units(where, device)}; set run.precision=fp32")


def autocast_dtype(job: Job, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `job.run.precision` on `device`; None means fp32 throughout.

    Raises:
        PrecisionError: bf16 on a CPU without bf16 units (`check_precision`).
    """
    check_precision(job, device)
    precision = job.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stepper:
    """One optimizer step over one or more micro-batches (gradient accumulation): learning rate,
    mixup/CutMix, autocast forward, loss, backward, gradient clipping, update."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        job: Job,
        device: torch.device,
        num_classes: int,
    ):
        self.model, self.optimizer, self.job, self.device = model, optimizer, job, device
        self.num_classes = num_classes
        self.channels_last = job.run.channels_last
        self.autocast_dtype = autocast_dtype(job, device)
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.misses = torch.zeros(2, device=device)  # top-1 misses and images since `take_misses`

    def take_misses(self) -> torch.Tensor:
        """The training batches' top-1 misses and images since the last call (the paper's
        "training error", He et al. 2015 Figure 6: on the augmented batches, as trained)."""
        taken, self.misses = self.misses, torch.zeros(2, device=self.device)
        return taken

    def __call__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> torch.Tensor:
        """Accumulates the gradients of `batches` (gradients sync across ranks once, on the
        last), then takes one optimizer step; returns the mean loss."""
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (images, labels) in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss = self.loss(images, labels) / len(batches)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.job.optim.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.job.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        data = self.job.data
        images, targets = mix_batch(
            images, labels, self.num_classes, data.mixup_alpha, data.cutmix_alpha, data.cutmix_prob
        )
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(images)
        with torch.no_grad():  # against the batch's own labels, also when mixup blends them
            self.misses[0] += (logits.argmax(dim=1) != labels).sum()  # on the device: no sync
            self.misses[1] += len(labels)
        return classification_loss(logits.float(), targets, self.job)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, job: Job) -> torch.Tensor:
    """Cross-entropy, or binary cross-entropy per class as in "ResNet strikes back" (Wightman et
    al. 2021), over class-probability targets, with label smoothing."""
    smoothing = job.optim.label_smoothing
    if job.optim.loss == "bce":
        smoothed = targets * (1 - smoothing) + smoothing / targets.shape[1]
        return nn.functional.binary_cross_entropy_with_logits(logits, smoothed, reduction="sum") / len(logits)
    return nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # val/top1, val/top5, val/loss, val/images (every rank's, each once)
    per_class: torch.Tensor  # [classes, 2] int64 on the CPU: each class's samples and top-1 errors


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable, device: torch.device, job: Job, num_classes: int
) -> Evaluation:
    """Top-1, top-5 and loss over every validation sample of every rank (each counted once), and
    per class, its samples and top-1 errors.

    Args:
        model: the bare model, not DDP: ranks may run different numbers of batches here.
        batches: (images, labels, ids) batches, as `pipeline.data.loader.Loader` yields them.
    """
    model.eval()
    channels_last, dtype = job.run.channels_last, autocast_dtype(job, device)
    totals = torch.zeros(4, device=device)  # top-1 hits, top-5 hits, loss sum, samples
    per_class = torch.zeros(num_classes, 2, dtype=torch.int64, device=device)
    for images, labels, _ids in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        count = torch.tensor(len(labels), device=device)
        totals += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), loss, count]).float()
        per_class[:, 0] += torch.bincount(labels, minlength=num_classes)
        per_class[:, 1] += torch.bincount(labels[~hits[:, 0]], minlength=num_classes)
    top1, top5, loss, count = all_reduce_sum(totals).tolist()
    metrics = {"val/top1": top1 / count, "val/top5": top5 / count, "val/loss": loss / count,
               "val/images": count}  # fmt: skip
    return Evaluation(metrics, all_reduce_sum(per_class).cpu())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over the ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
