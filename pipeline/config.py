"""The job schema and its loader.

A job is a tree of frozen dataclasses that holds every default. A job file
(`jobs/<name>.toml`) holds only what it changes; `--set section.key=value` overrides use
the same parser. Unknown keys are errors that name the key. Derived values (global batch,
scaled learning rate) are properties, never written back.

    job = load_job("quickstart", overrides=["optim.lr_per_256=0.2"])
    job.global_batch_size, job.optim.lr_per_256
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal


class JobError(ValueError):
    """A job that cannot be loaded: unknown name, unknown key, or a bad value."""


@dataclass(frozen=True)
class Range:
    """The values a number may take, checked at load (`Annotated[int, Range(1)]`): at least
    `low` (above it, when `open_low`), at most `high` (below it, when `open_high`)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'above' if self.open_low else 'at least'} {self.low:g}"
        if self.low is None:
            return f"{'below' if self.open_high else 'at most'} {self.high:g}"
        left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


# The ranges of the schema, named for what they hold
Count = Annotated[int, Range(1)]  # workers, threads, steps, pixels: one or more
Whole = Annotated[int, Range(0)]  # an epoch, a step, a seed: zero or more
NonNegative = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, open_low=True)]
Probability = Annotated[float, Range(0, 1)]
Fraction = Annotated[float, Range(0, 1, open_high=True)]  # a decay or a smoothing: below 1
Area = Annotated[float, Range(0, 1, open_low=True)]  # a share of the image's area


@dataclass(frozen=True)
class Data:
    root: str = "data/sample"  # dataset folder or s3://... (`data prepare ROOT`, then `data upload`)
    # shards: ROOT/index/shards/*.tar (`prepare --shards`); memory: the images held in memory,
    # from ROOT/index/pixels-*.npy (`data prepare` writes them for CIFAR; pipeline.data.memory)
    source: Literal["files", "shards", "memory"] = "files"
    # each node copies a dataset on an object store here once, and reads it from local disk
    # (docs/benchmarks.md); "": DALI reads the shards from the object store itself
    cache_dir: str = "/tmp/resnet-pipe/datasets"
    crop_px: Count = 224  # training crop, square
    scale: tuple[Area, Area] = (0.08, 1.0)  # random-resized-crop area range (Szegedy et al. 2015)
    ratio: tuple[Positive, Positive] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    hflip_prob: Probability = 0.5
    # source = "memory" (CIFAR): zero padding on each side before the random crop_px crop
    # (He et al. 2015, Section 4.2: 4 px), and the normalisation: "channel" (data.mean, data.std)
    # or "pixel_mean" (the training set's mean image subtracted, as the paper; no std)
    pad_px: Whole = 4
    normalize: Literal["channel", "pixel_mean"] = "channel"
    # source = "memory": train on all but this many training images, drawn once (seed 0), and
    # validate on them (the paper's 45k/5k split of CIFAR-10: 5000); 0: validate on the val split
    holdout: Whole = 0
    # source = "memory": > 0 trains on (evaluates on) a fixed draw of this many of the training
    # (validation) images: a study's quick scale
    train_images: Whole = 0
    val_images: Whole = 0
    # brightness, contrast, saturation (factors in [1 - x, 1 + x]), hue (up to +-h of a turn)
    color_jitter: tuple[NonNegative, NonNegative, NonNegative, Annotated[float, Range(0, 0.5)]] = (0.0,) * 4
    auto_augment: Literal["none", "trivial", "rand"] = "none"  # TrivialAugment Wide or RandAugment
    rand_augment_n: Count = 2  # operations per image (Cubuk et al. 2019)
    rand_augment_m: Annotated[int, Range(0, 30)] = 9  # magnitude, of 30 bins
    random_erasing_prob: Probability = 0.0  # torchvision's recipe uses 0.1 (Zhong et al. 2017)
    mixup_alpha: NonNegative = 0.0  # Beta(alpha, alpha) mixing weight; 0 turns mixup off (recipes: 0.2)
    cutmix_alpha: NonNegative = 0.0  # 0 turns CutMix off (recipes: 1.0)
    cutmix_prob: Probability = 0.5  # with both on, the share of batches that get CutMix
    progressive_px: tuple[tuple[Whole, Count], ...] = ()  # [[epoch, crop_px], ...]: from that epoch on
    val_resize_px: Count = 256  # shorter side before the center crop (224/256 = 0.875, He et al.)
    val_crop_px: Count = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB mean, 0..1 scale
    std: tuple[Positive, Positive, Positive] = (0.229, 0.224, 0.225)
    threads_per_worker: Count = 2  # DALI CPU threads per training worker
    prefetch_batches: Count = 2  # DALI prefetch queue depth

    def __post_init__(self):
        if self.scale[0] > self.scale[1]:
            raise JobError(
                f"'data.scale' is {list(self.scale)}: its first item (the smallest area) must not be "
                "above the second"
            )
        if self.ratio[0] > self.ratio[1]:
            raise JobError(f"'data.ratio' is {list(self.ratio)}: its first item must not be above the second")
        for key in ("holdout", "train_images", "val_images"):
            if getattr(self, key) and self.source != "memory":
                raise JobError(f"'data.{key}' ({getattr(self, key)}) needs data.source = 'memory'")
        if self.normalize == "pixel_mean" and self.source != "memory":
            raise JobError(
                "data.normalize = 'pixel_mean' subtracts the mean of the training images held in memory: "
                "it needs data.source = 'memory'"
            )
        if self.val_crop_px > self.val_resize_px:
            raise JobError(
                f"'data.val_crop_px' ({self.val_crop_px}) is above 'data.val_resize_px' "
                f"({self.val_resize_px}): the center crop must fit in the resized image"
            )


@dataclass(frozen=True)
class Model:
    arch: str = "resnet50"  # any name in timm's registry
    zero_init_last_bn: bool = True  # last BN of each residual branch starts at 0 (Goyal et al. 2017)
    sync_batchnorm: bool = False  # BatchNorm statistics over all GPU workers (CUDA only)


@dataclass(frozen=True)
class Optim:
    name: Literal["sgd", "lamb"] = "sgd"  # LAMB (You et al. 2020) for the "ResNet strikes back" recipes
    loss: Literal["ce", "bce"] = "ce"  # bce: binary cross-entropy per class (Wightman et al. 2021)
    lr_per_256: NonNegative = 0.1  # scaled by global_batch_size / 256 (Goyal et al. 2017)
    momentum: Fraction = 0.9
    nesterov: bool = False
    weight_decay: NonNegative = 1e-4  # not applied to BatchNorm weights and biases
    label_smoothing: Fraction = 0.1
    warmup_epochs: NonNegative = 5.0  # linear from 0, then the decay below
    warmup_iters: Whole = 0  # > 0: the warmup in optimizer steps, in place of warmup_epochs
    # constant: warmup_lr_ratio x the peak for the whole warmup (He et al. 2015 train ResNet-110
    # on CIFAR at 0.01 for about 400 iterations, then 0.1)
    warmup_shape: Literal["linear", "constant"] = "linear"
    warmup_lr_ratio: Probability = 0.1
    # after the warmup: cosine or linear decay to min_lr_ratio x the peak at the run's end, or
    # x0.1 at each of step_epochs / step_iters
    schedule: Literal["cosine", "linear", "step"] = "cosine"
    step_epochs: tuple[Whole, ...] = (30, 60, 80)  # step decay boundaries, x0.1 each (He et al. 2016)
    step_iters: tuple[Whole, ...] = ()  # in optimizer steps, in place of step_epochs (CIFAR: 32000, 48000)
    min_lr_ratio: Probability = 0.0  # cosine or linear floor, as a fraction of the peak
    accumulation_steps: Count = 1  # micro-batches per optimizer step; the global batch includes them
    clip_grad_norm: NonNegative = 0.0  # max global gradient norm; 0: no clipping
    ema_decay: Fraction = 0.0  # per update (torchvision's recipe: 0.99998 per step); 0: no EMA of the weights
    ema_every_steps: Count = 32  # EMA update period in optimizer steps; the decay is raised to this power


@dataclass(frozen=True)
class Scaling:
    num_workers: Count = 1  # Ray Train workers, one DDP rank each; the most, when min_workers is set
    min_workers: Whole = 0  # > 0: elastic, any count from min_workers to num_workers (global batch kept)
    resize_check_s: Positive = 60.0  # elastic: how often Ray looks for room to add workers
    use_gpu: bool = False  # one GPU per worker; NCCL, mixed decoding and autocast follow from it
    cpus_per_worker: Count = 1
    memory_per_worker_gb: NonNegative = 0.0  # memory Ray reserves for each worker; 0: none asked
    # a cluster with an autoscaler: how long to wait for it to add the nodes the job needs, then
    # give up (exit 2); a cluster that cannot grow is refused at once (pipeline.cluster.resources)
    wait_for_room_s: Positive = 600.0
    # whether the cluster may add nodes (an autoscaler): "no" refuses a job it cannot hold now at
    # once; "yes" waits up to wait_for_room_s; "auto" reads Ray's v1 autoscaler report
    cluster_grows: Literal["auto", "yes", "no"] = "no"
    batch_size_per_worker: Count = 32  # at num_workers; fewer workers accumulate more (global batch kept)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self):
        if self.min_workers > self.num_workers:
            raise JobError(
                f"scaling.min_workers ({self.min_workers}) is above scaling.num_workers ({self.num_workers})"
            )

    @property
    def worker_counts(self) -> range:
        """Every worker count the job may run with."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)


@dataclass(frozen=True)
class Run:
    storage_path: str = "runs"  # checkpoints go to <storage_path>/<run name>/
    max_failures: Annotated[int, Range(-1)] = 0  # Ray Train retries from the last checkpoint; -1: no end
    keep_checkpoints: Count = 2  # the best k by val/top1 are kept in storage, plus always the latest
    checkpoint_every_steps: Whole = 0  # also mid-epoch, every N global steps (0: at epoch ends only)
    # how long a checkpoint upload keeps retrying (with backoff) an object store that refuses or
    # does not answer, training on meanwhile; past it the run fails, its last whole checkpoint kept
    storage_outage_s: Annotated[float, Range(1)] = 600.0
    sample_log: bool = False  # each rank appends the sample ids of every batch to <run>/samples/
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # NHWC: faster for tensor cores (about 1.2x for ResNet-50 with AMP) and for oneDNN's CPU
    # convolutions (ResNet-50 on 2 cores: training 1.33x at 224 px, 1.13x at 64 px; forward pass
    # 1.19x; docs/benchmarks.md)
    channels_last: bool = True
    log_every_steps: Count = 10  # progress lines per worker-0 steps
    # evaluation at the end of every N-th epoch; the last epoch is always evaluated. A run that
    # trades evaluations for training time evaluates less often (each costs a pass over val)
    eval_every_epochs: Count = 1
    # > 0, in place of eval_every_epochs: at the end of each epoch in which the optimizer step
    # count passes a multiple of this (a schedule in iterations evaluates on its own axis)
    eval_every_iters: Whole = 0
    max_steps_per_epoch: Whole = 0  # 0: the whole epoch; >0 caps it (smoke tests)
    # torch.compile the model: needs a C++ compiler on a CPU; ResNet-20 on 2 CPU cores 1.20x the eager
    # pipeline's step (bench train), its seed 1 of cifar10-resnet20-fast at the target 9.6 % sooner
    compile: bool = False


@dataclass(frozen=True)
class Job:
    name: str = ""
    description: str = ""
    dataset: str = ""  # human-readable dataset name, for listings
    epochs: Count = 90
    # > 0: train this many optimizer steps in place of `epochs` (the paper's CIFAR schedules:
    # 64000); the last epoch stops where they end, and is evaluated there
    iterations: Whole = 0
    seed: Whole = 0
    target_top1: Probability = 0.0  # the accuracy this job aims at; time to reach it is logged once reached
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    scaling: Scaling = field(default_factory=Scaling)
    run: Run = field(default_factory=Run)

    def __post_init__(self):
        odd = [w for w in self.scaling.worker_counts if self.global_batch_size % w]
        if odd:
            raise JobError(
                f"the global batch ({self.global_batch_size} images) does not split evenly over "
                f"{', '.join(map(str, odd))} workers: choose scaling.min_workers, scaling.num_workers, "
                "batch_size_per_worker and optim.accumulation_steps so that it does for every worker count"
            )

    def epochs_for(self, steps_per_epoch: int) -> int:
        """Epochs the run trains, started or not: `epochs`, or those that hold `iterations`."""
        return -(-self.iterations // steps_per_epoch) if self.iterations else self.epochs

    def steps_in(self, epoch: int, steps_per_epoch: int) -> int:
        """Optimizer steps of `epoch`: all of them, but in the epoch where `iterations` end."""
        if not self.iterations:
            return steps_per_epoch
        return max(0, min(steps_per_epoch, self.iterations - epoch * steps_per_epoch))

    def crop_px_at(self, epoch: int) -> int:
        """The training crop for `epoch`: progressive resizing (Tan and Le 2021), else `data.crop_px`."""
        crop = self.data.crop_px
        for start, size in sorted(self.data.progressive_px):
            if epoch >= start:
                crop = size
        return crop

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step, over all workers and accumulated micro-batches, whatever the
        number of workers of the moment (`at_world`)."""
        return self.scaling.batch_size_per_worker * self.scaling.num_workers * self.optim.accumulation_steps

    def at_world(self, world: int) -> Job:
        """This job as run by `world` workers: the same global batch, in as few micro-batches per
        worker as fit in `batch_size_per_worker` (and divide the worker's share evenly)."""
        share = self.global_batch_size // world
        accumulation = next(
            a for a in range(-(-share // self.scaling.batch_size_per_worker), share + 1) if share % a == 0
        )
        scaling = dataclasses.replace(
            self.scaling, num_workers=world, min_workers=0, batch_size_per_worker=share // accumulation
        )
        optim = dataclasses.replace(self.optim, accumulation_steps=accumulation)
        return dataclasses.replace(self, scaling=scaling, optim=optim)

    @property
    def peak_lr(self) -> float:
        return self.optim.lr_per_256 * self.global_batch_size / 256


def jobs_dir() -> Path:
    """The folder that holds job files: $RESNET_PIPE_JOBS, else ./jobs, else the repo's."""
    if env := os.environ.get("RESNET_PIPE_JOBS"):
        return Path(env)
    local = Path.cwd() / "jobs"
    return local if local.is_dir() else Path(__file__).resolve().parent.parent / "jobs"


def job_names() -> list[str]:
    return sorted(p.stem for p in jobs_dir().glob("*.toml"))


def load_job(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Loads `jobs/<name>.toml` over the defaults, then applies `key=value` overrides.

    Raises:
        JobError: unknown job, unknown key, or a value of the wrong type.
    """
    path = jobs_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(job_names()) or "none"
        raise JobError(f"unknown job '{name}' (known jobs: {known})")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{path}: {e}") from None
    table.setdefault("name", name)
    for item in overrides:
        key, value = parse_override(item)
        _set_path(table, key, value)
    return build(Job, table, prefix="")


def parse_override(item: str) -> tuple[str, Any]:
    """Parses `section.key=value`; the value is read as a TOML value, or as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise JobError(f"--set '{item}' is not key=value (for example optim.lr_per_256=0.2)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _set_path(table: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = table.setdefault(part, {})
        if not isinstance(node, dict):
            raise JobError(f"unknown key '{key}': '{part}' is not a section")
        table = node
    table[leaf] = value


def build(cls: type, table: dict, prefix: str) -> Any:
    """Builds dataclass `cls` from a TOML table, checking every key and value type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise JobError(f"unknown key '{dotted}' (known in this section: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    if typing.get_origin(hint) is Annotated:
        inner, *marks = typing.get_args(hint)
        value = _coerce(inner, value, dotted)
        for mark in marks:
            if isinstance(mark, Range) and not mark.holds(value):
                raise JobError(f"'{dotted}' is {value!r}, out of its range: it must be {mark}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise JobError(f"'{dotted}' is a section; set its keys, for example {dotted}.<key>=...")
        return build(hint, value, prefix=f"{dotted}.")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise JobError(f"'{dotted}' must be one of {', '.join(map(repr, args))}, not {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, dotted)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise JobError(f"'{dotted}' must be a list, not {value!r}")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise JobError(f"'{dotted}' must have {len(item_types)} items, not {len(value)}")
        return tuple(_coerce(t, v, dotted) for t, v in zip(item_types, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise JobError(f"'{dotted}' must be {hint.__name__}, not {value!r}")
    return value


def to_dict(job: Job) -> dict[str, Any]:
    """The resolved job as plain nested dicts (stored in checkpoints and MLflow)."""
    return dataclasses.asdict(job)


def from_dict(table: dict[str, Any]) -> Job:
    """Inverse of `to_dict`."""
    return build(Job, table, prefix="")


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr_per_256": 0.1}}` -> `{"optim.lr_per_256": 0.1}`."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
