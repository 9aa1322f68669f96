"""The registered model as MLflow loads it: a pyfunc model defined from code, over plain
artifacts (never a pickled object): the weights as safetensors, the resolved job as JSON, and
the class list of the dataset it was trained on.

Input: a DataFrame with a column "image" of encoded images (JPEG, PNG, ... bytes). Output: one
row per image with the top class (class_index, wnid, name, probability) and "top_k", the best
`TOP_K` as JSON. Preprocessing is the job's evaluation transform: shorter side to
data.val_resize_px, center crop data.val_crop_px, normalize with data.mean and data.std, or, for
a model trained with data.normalize = "pixel_mean" (the paper's CIFAR recipes), subtract the
training images' mean image (the artifact "mean_image") and scale 0..255 to 0..1.

Each image first passes serving's own checks (`pipeline.serve.inference.check_image`, with the
Serve app's default limits): what `resnet-pipe deploy` refuses, this model refuses too, with an
MlflowException that `mlflow models serve` answers as 400 Bad Request.

`pipeline.tracking.registry` logs it with `mlflow.pyfunc.log_model(python_model=<this file>, ...)`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import v2 as T

from pipeline.config import from_dict
from pipeline.models import create_model
from pipeline.serve.inference import BadImage, check_image
from pipeline.serve.settings import Settings

TOP_K = 5


class ResNetClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        job = from_dict(json.loads(Path(context.artifacts["job"]).read_text()))
        rows = Path(context.artifacts["classes"]).read_text().splitlines()
        self.classes = [row.split("\t") for row in rows]  # index, wnid, name
        self.model = create_model(job.model.arch, num_classes=len(self.classes))
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        data = job.data
        self.resize_px = data.val_resize_px
        if data.normalize == "pixel_mean":  # (pixels - mean image) / 255 in _decode, as training evaluated
            self.mean_image = torch.from_numpy(np.load(context.artifacts["mean_image"])).permute(2, 0, 1)
            normalize = [T.ToDtype(torch.float32)]
        else:
            normalize = [T.ToDtype(torch.float32, scale=True), T.Normalize(data.mean, data.std)]
            self.mean_image = None
        self.transform = T.Compose([
            T.PILToTensor(),
            T.Resize(data.val_resize_px, antialias=True),
            T.CenterCrop(data.val_crop_px),
            *normalize,
        ])  # fmt: skip

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        limits = Settings()  # the Serve app's defaults: body bytes, pixels before and after resizing
        for row, encoded in enumerate(model_input["image"]):
            try:
                check_image(encoded, limits.max_body_bytes, limits.max_pixels, self.resize_px)
            except BadImage as e:
                raise MlflowException(f"image {row}: {e}", error_code=INVALID_PARAMETER_VALUE) from None
        batch = torch.stack([self._decode(b) for b in model_input["image"]])
        with torch.inference_mode():
            probabilities = self.model(batch.to(self.device)).softmax(dim=1).cpu()
        top = probabilities.topk(min(TOP_K, probabilities.shape[1]), dim=1)
        rows = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            best = [self._describe(i, p) for i, p in zip(indices, values)]
            rows.append(best[0] | {"top_k": json.dumps(best)})
        return pd.DataFrame(rows)

    def _decode(self, encoded: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(encoded)) as image:
            tensor = self.transform(image.convert("RGB"))
        return tensor if self.mean_image is None else (tensor - self.mean_image) / 255.0

    def _describe(self, index: int, probability: float) -> dict:
        _, wnid, name = self.classes[index]
        return {"class_index": index, "wnid": wnid, "name": name, "probability": probability}


mlflow.models.set_model(ResNetClassifier())
