from __future__ import annotations

import re
import shlex

import pytest

from pipeline.config import JobError, from_dict, job_names, jobs_dir, load_job, parse_override, to_dict


@pytest.mark.parametrize("name", job_names())
def test_every_shipped_job_resolves(name: str) -> None:
    job = load_job(name)
    assert job.name == name
    assert job.description and job.dataset
    assert from_dict(to_dict(job)) == job  # what checkpoints and MLflow store reads back the same


def test_shipped_jobs_are_the_promised_ones() -> None:
    assert {"quickstart", "imagenet-r50", "imagenet-r101", "imagenet-r152"} <= set(job_names())


@pytest.mark.parametrize("depth", [50, 101, 152])
def test_imagenet_jobs_carry_the_90_epoch_recipe(depth: int) -> None:
    job = load_job(f"imagenet-r{depth}")
    assert job.model.arch == f"resnet{depth}"
    assert job.epochs == 90
    assert (job.data.crop_px, job.data.val_resize_px, job.data.val_crop_px) == (224, 256, 224)
    assert job.scaling.use_gpu
    assert job.optim.lr_per_256 == 0.1


def test_quickstart_is_two_cpu_workers() -> None:
    job = load_job("quickstart")
    assert job.model.arch == "resnet50"
    assert (job.scaling.num_workers, job.scaling.use_gpu) == (2, False)


def test_unknown_key_is_named() -> None:
    with pytest.raises(JobError, match="unknown key 'optim.learning_rate'"):
        load_job("quickstart", ["optim.learning_rate=0.1"])
    with pytest.raises(JobError, match="unknown key 'nosuchsection'"):
        load_job("quickstart", ["nosuchsection.x=1"])


def test_unknown_key_in_a_job_file_is_named(tmp_path, monkeypatch) -> None:
    (tmp_path / "typo.toml").write_text("[data]\ncrop = 128\n")
    monkeypatch.setenv("RESNET_PIPE_JOBS", str(tmp_path))
    with pytest.raises(JobError, match="unknown key 'data.crop'"):
        load_job("typo")


def test_unknown_job_lists_the_known_ones() -> None:
    with pytest.raises(JobError, match="unknown job 'nope'.*quickstart"):
        load_job("nope")


def test_overrides_are_typed_and_derived_values_follow() -> None:
    job = load_job(
        "quickstart", ["optim.lr_per_256=0.2", "scaling.batch_size_per_worker=64", "data.scale=[0.5, 1]"]
    )
    assert job.optim.lr_per_256 == 0.2
    assert job.data.scale == (0.5, 1.0)
    assert job.global_batch_size == 128  # 64 x 2 workers
    assert job.peak_lr == pytest.approx(0.2 * 128 / 256)


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=ten", "'epochs' must be int"),
        ("scaling.use_gpu=1", "'scaling.use_gpu' must be bool"),
        ("optim.schedule='exponential'", "must be one of"),
        ("data.scale=[0.5]", "must have 2 items"),
        ("optim", "not key=value"),
        ("data=3", "'data' is a section"),
    ],
)
def test_bad_values_are_errors(override: str, message: str) -> None:
    with pytest.raises(JobError, match=message):
        load_job("quickstart", [override])


def test_override_values_parse_as_toml_else_string() -> None:
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("data.root=/datasets/imagenet") == ("data.root", "/datasets/imagenet")


@pytest.mark.parametrize(
    "override, message",
    [
        ("scaling.num_workers=0", "'scaling.num_workers' is 0, out of its range: it must be at least 1"),
        ("optim.lr_per_256=-0.1", "'optim.lr_per_256' is -0.1, out of its range: it must be at least 0"),
        ("data.hflip_prob=5", r"'data.hflip_prob' is 5.0, out of its range: it must be in \[0, 1\]"),
        ("data.cutmix_prob=1.5", r"'data.cutmix_prob' is 1.5, .* in \[0, 1\]"),
        ("data.scale=[0, 1]", r"'data.scale' is 0.0, .* in \(0, 1\]"),
        ("data.scale=[0.9, 0.1]", "smallest area"),
        ("data.color_jitter=[0.4, 0.4, 0.4, 0.7]", r"'data.color_jitter' is 0.7, .* in \[0, 0.5\]"),
        ("data.rand_augment_m=31", r"'data.rand_augment_m' is 31, .* in \[0, 30\]"),
        ("data.val_crop_px=300", "must fit in the resized image"),
        ("data.std=[0.2, 0, 0.2]", "'data.std' is 0.0, .* above 0"),
        ("optim.momentum=1", r"'optim.momentum' is 1.0, .* in \[0, 1\)"),
        ("optim.ema_decay=1.0", r"'optim.ema_decay' is 1.0, .* in \[0, 1\)"),
        ("optim.accumulation_steps=0", "'optim.accumulation_steps' is 0"),
        ("scaling.batch_size_per_worker=-8", "'scaling.batch_size_per_worker' is -8"),
        ("scaling.resize_check_s=0", "'scaling.resize_check_s' is 0.0, .* above 0"),
        ("run.keep_checkpoints=0", "'run.keep_checkpoints' is 0"),
        ("run.max_failures=-2", "'run.max_failures' is -2, .* at least -1"),
        ("epochs=0", "'epochs' is 0"),
        ("target_top1=80", r"'target_top1' is 80.0, .* in \[0, 1\]"),
    ],
)
def test_numbers_out_of_their_range_are_refused_at_load(override: str, message: str) -> None:
    with pytest.raises(JobError, match=message):
        load_job("quickstart", [override])


def test_the_edges_of_each_range_load() -> None:
    edges = ["optim.lr_per_256=0", "data.hflip_prob=1", "run.max_failures=-1", "data.scale=[1, 1]",
             "data.val_crop_px=73", "optim.momentum=0", "scaling.min_workers=0"]  # fmt: skip
    job = load_job("quickstart", edges)
    assert (job.optim.lr_per_256, job.data.hflip_prob, job.run.max_failures) == (0.0, 1.0, -1)


def test_progressive_resizing_picks_the_crop_by_epoch() -> None:
    job = load_job("quickstart", ["data.progressive_px=[[0, 128], [3, 160], [6, 224]]"])
    assert [job.crop_px_at(e) for e in (0, 2, 3, 5, 6, 89)] == [128, 128, 160, 160, 224, 224]
    assert load_job("quickstart").crop_px_at(5) == 64  # no schedule: data.crop_px


@pytest.mark.parametrize("depth, aim", [(50, 0.8086), (101, 0.8189), (152, 0.8228)])
def test_strong_recipe_jobs_carry_torchvisions_v2_recipe(depth: int, aim: float) -> None:
    job = load_job(f"imagenet-r{depth}-strong")
    assert job.target_top1 == aim and job.epochs == 600
    assert job.global_batch_size == 1024 and job.peak_lr == pytest.approx(0.5)
    assert (job.data.crop_px, job.data.val_resize_px, job.data.val_crop_px) == (176, 232, 224)
    assert job.data.auto_augment == "trivial" and job.optim.ema_decay > 0


def test_an_elastic_job_keeps_its_global_batch_at_every_worker_count() -> None:
    elastic = ["scaling.num_workers=4", "scaling.min_workers=1", "scaling.batch_size_per_worker=192"]
    job = load_job("imagenet-r50", elastic)
    assert list(job.scaling.worker_counts) == [1, 2, 3, 4] and job.global_batch_size == 768
    plans = {}
    for world in job.scaling.worker_counts:
        at = job.at_world(world)
        assert at.global_batch_size == 768 and at.peak_lr == job.peak_lr
        assert at.scaling.batch_size_per_worker <= 192
        plans[world] = (at.scaling.batch_size_per_worker, at.optim.accumulation_steps)
    assert plans == {1: (192, 4), 2: (192, 2), 3: (128, 2), 4: (192, 1)}
    fixed = load_job("quickstart")
    assert fixed.at_world(2) == fixed  # a fixed-size job runs as written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scaling.num_workers=4", "scaling.min_workers=1"], "does not split evenly over 3 workers"),
        (["scaling.num_workers=2", "scaling.min_workers=3"], "min_workers \\(3\\) is above"),
    ],
)
def test_elastic_ranges_that_cannot_keep_the_global_batch_are_refused(overrides, message) -> None:
    with pytest.raises(JobError, match=message):
        load_job("imagenet-r50", overrides)


PAPER_CIFAR = [f"cifar10-resnet{d}" for d in (20, 32, 44, 56, 110, 1202)] + [
    f"cifar10-plain{d}" for d in (20, 32, 44, 56, 110)
] + [f"cifar{c}-preact-resnet{d}" for c in (10, 100) for d in (164, 1001)]  # fmt: skip


@pytest.mark.parametrize("name", PAPER_CIFAR)
def test_the_paper_cifar_recipes_are_the_papers(name: str) -> None:
    import timm

    import pipeline.models  # noqa: F401  (registers the paper's nets)

    job = load_job(name)
    assert job.global_batch_size == 128 and job.peak_lr == pytest.approx(0.1)
    assert (job.optim.momentum, job.optim.weight_decay, job.optim.label_smoothing) == (0.9, 1e-4, 0.0)
    assert (job.iterations, job.optim.schedule, job.optim.step_iters) == (64000, "step", (32000, 48000))
    assert not job.model.zero_init_last_bn and job.model.arch in timm.list_models()
    assert (job.data.source, job.data.crop_px, job.data.pad_px, job.data.normalize) == (
        "memory",
        32,
        4,
        "pixel_mean",
    )
    deep = any(d in name for d in ("110", "1202", "164", "1001"))
    assert (job.optim.warmup_iters, job.optim.warmup_shape) == ((400, "constant") if deep else (0, "linear"))
    header = (jobs_dir() / f"{name}.toml").read_text().split("description =")[0]
    assert "Aim:" in header and "Launch:" in header and "Result:" in header


@pytest.mark.parametrize(
    "name, arch",
    [("imagenet-plain18", "plain18"), ("imagenet-plain34", "plain34"), ("imagenet-r18", "resnet18_a"),
     ("imagenet-r34", "resnet34_a"), ("imagenet-r34-a", "resnet34_a"), ("imagenet-r34-b", "resnet34_b"),
     ("imagenet-r34-c", "resnet34_c")],
)  # fmt: skip
def test_the_paper_imagenet_recipes_train_tables_2_and_3s_nets(name: str, arch: str) -> None:
    job = load_job(name)
    assert job.model.arch == arch and job.global_batch_size == 256 and job.peak_lr == pytest.approx(0.1)
    assert (job.epochs, job.optim.step_epochs, job.optim.label_smoothing) == (120, (30, 60, 90), 0.0)
    assert "Table" in (jobs_dir() / f"{name}.toml").read_text().split("description =")[0]


def test_a_run_of_iterations_ends_inside_the_epoch_that_holds_them() -> None:
    job = load_job("cifar10-resnet20")
    assert job.epochs_for(390) == 165  # 64000 / 390 = 164.1: the 165th epoch is cut short
    assert [job.steps_in(e, 390) for e in (0, 163, 164)] == [390, 390, 64000 - 164 * 390]
    plain = load_job("quickstart")
    assert (plain.epochs_for(7), plain.steps_in(11, 7)) == (12, 7)


def test_a_holdout_and_the_mean_image_need_the_memory_source() -> None:
    with pytest.raises(JobError, match="'data.holdout' .* needs data.source = 'memory'"):
        load_job("quickstart", ["data.holdout=10"])
    with pytest.raises(
        JobError, match="'pixel_mean' subtracts the mean of the training images held in memory"
    ):
        load_job("cifar10-resnet20", ["data.source='files'"])


@pytest.mark.parametrize("name", [*PAPER_CIFAR, "cifar10-resnet20-fast"])
def test_each_cifar_header_gives_a_cpu_command_that_fits_on_two_cores(name: str) -> None:
    # the command a user copies from the header: it loads, trains on the CPU and fits 2 cores
    from pipeline.cluster.resources import shortfall

    header = (jobs_dir() / f"{name}.toml").read_text().split("description =")[0]
    (line,) = [
        line for line in header.splitlines() if "resnet-pipe submit" in line and "On a CPU" in line
    ] or [line for line in header.splitlines() if line.startswith("#           resnet-pipe submit")]
    words = shlex.split(line.split("resnet-pipe submit ", 1)[1].split(" #")[0])
    assert words[0] == name
    job = load_job(name, [words[i + 1] for i, word in enumerate(words) if word == "--set"])
    assert not job.scaling.use_gpu
    assert shortfall([job], [{"CPU": 2.0, "GPU": 0.0, "memory": 8 * 2**30}]) is None
    # the paper's batch of 128 either way; the 1001- and 1202-layer nets in micro-batches of 64 (as
    # the paper's two GPUs), since 128 at once took more than a 24 GB machine has (killed by Ray)
    assert job.global_batch_size == load_job(name).global_batch_size
    assert job.scaling.batch_size_per_worker == (64 if name.endswith(("1001", "1202")) else 128)
    assert re.search(r"^# CPU rate: ", header, re.M), "the header gives the CPU command's measured rate"
