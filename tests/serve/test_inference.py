"""Serving's forward pass compiled (`Loaded.compile`): the same answers as eager at every batch
size, with batches padded to the compiled sizes rather than compiled anew."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pipeline.config import load_job
from pipeline.serve.inference import Loaded, Preprocess, padded_sizes


def test_padded_sizes_are_the_powers_of_two_below_the_largest_batch_and_the_largest() -> None:
    assert padded_sizes(1) == (1,)
    assert padded_sizes(6) == (1, 2, 4, 6)
    assert padded_sizes(8) == (1, 2, 4, 8)
    assert padded_sizes(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def _tiny_version(version: str, seed: int) -> Loaded:
    """A small conv net with BatchNorm (which inductor's freezing folds), as a loaded version."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    classes = [(f"n{i}", str(i)) for i in range(5)]
    return Loaded("tiny", version, model, classes, load_job("quickstart", []), torch.device("cpu"), True)


def test_a_compiled_forward_pass_answers_as_the_eager_one_and_pads_instead_of_recompiling() -> None:
    eager, compiled = _tiny_version("1", seed=0), _tiny_version("1", seed=0)
    assert compiled.compile(max_batch=4, threads=2)
    assert compiled.sizes == (1, 2, 4) and compiled.forward is not None
    crop = compiled.job.data.val_crop_px
    images = torch.randn(5, 3, crop, crop)
    # every size was compiled by `compile`, for a caller in inference mode (a replica: its
    # batches are inference tensors) or not: a compilation now raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        for count in (1, 2, 3, 4, 5):  # 3 runs padded to 4; 5 is beyond the compiled sizes: eager
            expected = eager.probabilities(images[:count])
            for mode in (torch.inference_mode, contextlib.nullcontext):
                with mode():
                    answer = compiled.probabilities(images[:count].clone())
                assert answer.shape == (count, 5)
                torch.testing.assert_close(answer, expected, atol=1e-5, rtol=1e-4)


def test_a_second_version_compiled_in_the_same_process_answers_with_its_own_weights() -> None:
    """What a hot reload does: the weights frozen into the first version's graph must not answer
    for the second."""
    first, second = _tiny_version("1", seed=1), _tiny_version("2", seed=2)
    assert first.compile(max_batch=2, threads=2) and second.compile(max_batch=2, threads=2)
    crop = first.job.data.val_crop_px
    images = torch.randn(2, 3, crop, crop)
    for version, seed in ((first, 1), (second, 2)):
        eager = _tiny_version(version.version, seed)
        torch.testing.assert_close(
            version.probabilities(images), eager.probabilities(images), atol=1e-5, rtol=1e-4
        )
    assert not torch.allclose(first.probabilities(images), second.probabilities(images))


def _jpegs(count: int) -> list[bytes]:
    import io

    from PIL import Image

    images = []
    for i in range(count):
        out = io.BytesIO()
        Image.new("RGB", (120 + 10 * i, 90), (40 * i, 100, 200 - 30 * i)).save(out, format="JPEG")
        images.append(out.getvalue())
    return images


def test_preprocess_gives_a_batch_of_the_evaluation_crop_on_its_device() -> None:
    job = load_job("quickstart", [])
    crop = job.data.val_crop_px
    batch = Preprocess(job, max_batch=4, device=torch.device("cpu"), threads=1)(_jpegs(3))
    assert batch.shape == (3, 3, crop, crop) and batch.dtype == torch.float32
    # normalized: a flat colour comes out as (value / 255 - mean) / std in every pixel of the crop
    red = torch.tensor(job.data.mean)[0]
    assert abs(float(batch[0, 0].mean()) - (0 / 255 - float(red)) / job.data.std[0]) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_preprocess_keeps_the_batch_on_the_gpu_and_answers_as_the_cpu() -> None:
    # DALI's GPU output goes to torch on the GPU (no copy to the host and back); the images are
    # the CPU pipeline's, up to the two decoders' and resizers' rounding
    job = load_job("quickstart", [])
    images = _jpegs(4)
    on_gpu = Preprocess(job, max_batch=4, device=torch.device("cuda", 0), threads=2)(images)
    on_cpu = Preprocess(job, max_batch=4, device=torch.device("cpu"), threads=2)(images)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 0.05
