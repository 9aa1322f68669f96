"""A PyTorch replica (`deploy --runtime torch`) and ONNX Runtime on the same registered version
answer the same photos alike, through tritonclient with its defaults: images and preprocessed
tensors, one and eight at a time. (tests/serve/test_serve_app.py deploys ONNX Runtime, the CPU's
default, against offline evaluation.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from conftest import open_inference_answers, register_untrained, small_job

from pipeline.data.index import load_index
from pipeline.serve.inference import Loaded, Preprocess
from pipeline.serve.settings import Settings
from pipeline.system import free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def torch_replica(ray_session, prepared_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A registered version served by PyTorch (eager: compiling adds nothing to what is tested
    here); yields (url, version)."""
    from ray import serve

    from pipeline.cluster import serving

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("runtimes"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RESNET_PIPE_SERVE_TOKEN", raising=False)
        version = register_untrained(small_job(prepared_dataset, 1), "runtimes", seed=3)
        settings = Settings(
            model=f"{version.name}/{version.version}", cpus_per_replica=1, max_batch_size=8, batch_wait_ms=10,
            runtime="torch", compile=False,
        )  # fmt: skip
        url = serving.start(settings, port=free_port())
        yield url, version
        serve.shutdown()


def test_a_pytorch_replica_answers_as_onnx_runtime_on_the_same_photos(
    torch_replica, prepared_dataset
) -> None:
    url, version = torch_replica
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.get_model_metadata(version.name)["platform"] == "pytorch_libtorch"
    onnx = Loaded.from_registry(
        version.name, str(version.version), torch.device("cpu"), runtime="onnxruntime"
    )
    preprocess = Preprocess(onnx.job, 8, torch.device("cpu"), threads=1)
    index = load_index(prepared_dataset)
    photos = [(prepared_dataset / f).read_bytes() for f in index.files("val")[:8]]
    for count in (1, 8):
        tensors = preprocess(photos[:count])
        expected = onnx.probabilities(tensors).numpy()
        by_image, by_tensor = open_inference_answers(url, version.name, photos[:count], tensors.numpy())
        for answers in (by_image, by_tensor):
            assert answers.argmax(1).tolist() == expected.argmax(1).tolist()
            assert np.allclose(answers, expected, atol=1e-4)
