"""The training step and evaluation: pure PyTorch, no Ray and no DALI.

The Ray Train loop (`pipeline.train`) calls these on each rank; `scripts/gpu-check.py` calls the
same code on a bare GPU. Precision and memory format follow the device unless the job says:
bf16 autocast and channels_last on CUDA, fp32 and contiguous on the CPU.

    step = Stepper(ddp_model, optimizer, job, device)
    loss = step(images, labels, lr)                 # one optimizer step
    metrics = evaluate(model, val_batches, device)  # {"val/top1", "val/top5", "val/loss"}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Job
from pipeline.mix import mix_batch
from pipeline.optim import set_lr


def autocast_dtype(job: Job, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `job.run.precision` on `device`; None means fp32 throughout."""
    precision = job.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def uses_channels_last(job: Job, device: torch.device) -> bool:
    """NHWC helps tensor cores (about 1.2x for ResNet-50 with AMP); on the CPU it does not pay."""
    return job.run.channels_last if job.run.channels_last is not None else device.type == "cuda"


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Stepper:
    """One optimizer step: learning rate, mixup/CutMix, autocast forward, loss, backward, update."""

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
        self.channels_last = uses_channels_last(job, device)
        self.autocast_dtype = autocast_dtype(job, device)
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=job.optim.label_smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        data = self.job.data
        images, targets = mix_batch(
            images, labels, self.num_classes, data.mixup_alpha, data.cutmix_alpha, data.cutmix_prob
        )
        with autocast(self.device, self.autocast_dtype):
            loss = self.loss_fn(self.model(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, job: Job) -> dict[str, float]:
    """Top-1, top-5 and loss over every validation sample of every rank (each counted once).

    Args:
        model: the bare model, not DDP: ranks may run different numbers of batches here.
        batches: (images, labels, ids) batches, as `pipeline.loader.Loader` yields them.
    """
    model.eval()
    channels_last, dtype = uses_channels_last(job, device), autocast_dtype(job, device)
    totals = torch.zeros(4, device=device)  # top-1 hits, top-5 hits, loss sum, samples
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
    top1, top5, loss, count = all_reduce_sum(totals).tolist()
    return {"val/top1": top1 / count, "val/top5": top5 / count, "val/loss": loss / count}


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
