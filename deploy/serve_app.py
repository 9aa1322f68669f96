"""The Ray Serve application: a registered model behind HTTP, with dynamic batching, the
training job's own evaluation transform, hot reload when its alias moves, and hardened input.

    resnet-pipe deploy resnet50@champion         # builds `app(settings)` and runs it
    serve run deploy/serve-config.yaml           # the same app on a cluster

Endpoints (OpenAPI description at /openapi.json, browsable at /docs):

    GET  /health            the model and version serving
    POST /predict           one image: its bytes with an image content type, or a multipart form
    POST /predict/batch     several images as a multipart form (one file field each)

Each image is checked here (body size, format, pixel count, a full decode at reduced scale)
before it joins a batch, so a bad request gets a 4xx JSON error and never fails anyone else's.
Preprocessing is `pipeline.loader.serve_pipeline`: the same DALI graph as validation.
"""

import asyncio
import hmac
import io
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import system
from pipeline.step import autocast, autocast_dtype, uses_channels_last

log = logging.getLogger("ray.serve")
FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # what both PIL (the checks) and DALI (the decode) read
TOKEN_ENV = "RESNET_PIPE_SERVE_TOKEN"  # set: requests need "Authorization: Bearer <token>"


@dataclass(frozen=True)
class Settings:
    """How the app serves; `resnet-pipe deploy` flags and deploy/serve-config.yaml set them."""

    model: str | None = None  # MODEL@ALIAS, MODEL, MODEL/VERSION or a run; None: newest champion
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db
    tracking_env: dict = field(default_factory=dict)  # MLflow credentials for the replicas
    replicas: int | str = 1  # a number, or "auto": autoscaling between min and max_replicas
    max_replicas: int = 4
    cpus_per_replica: float = 2.0  # also the replica's torch threads
    gpus_per_replica: float = 0.0
    max_batch_size: int = 8
    batch_wait_ms: float = 20.0  # how long a batch waits to fill
    max_ongoing_requests: int = 32  # per replica; beyond it requests queue ...
    max_queued_requests: int = 64  # ... and beyond this the proxy answers 503 at once
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    top_k: int = 5
    reload_check_s: float = 2.0  # how often the followed alias is looked up


class BadImage(Exception):
    """An image this app will not classify, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


def check_image(body: bytes, settings: Settings) -> None:
    """Raises BadImage (with its HTTP status) unless `body` is a whole image this app accepts."""
    if not body:
        raise BadImage(400, "empty body: send the image's bytes")
    if len(body) > settings.max_body_bytes:
        raise BadImage(413, f"image of {len(body)} bytes is over the limit of {settings.max_body_bytes}")
    try:
        with Image.open(io.BytesIO(body)) as image:
            if image.format not in FORMATS:
                raise BadImage(
                    415, f"image format {image.format} is not accepted; send one of {', '.join(FORMATS)}"
                )
            pixels = image.width * image.height
            if pixels > settings.max_pixels:
                raise BadImage(
                    413,
                    f"image of {image.width} x {image.height} pixels is over the limit of "
                    f"{settings.max_pixels}",
                )
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, every byte still read
            image.load()
    except UnidentifiedImageError:
        raise BadImage(415, f"not an image: send one of {', '.join(FORMATS)}") from None
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"image rejected as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(400, f"truncated or corrupt image: {e}") from None


@dataclass
class Loaded:
    """One model version, ready to answer."""

    name: str
    version: str
    model: torch.nn.Module
    classes: list[tuple[str, str]]  # (wnid, name) per class index
    job: object  # pipeline.config.Job: its data settings give the evaluation transform
    device: torch.device

    @classmethod
    def from_registry(cls, name: str, version: str, device: torch.device) -> "Loaded":
        import json

        import mlflow
        import timm
        from safetensors.torch import load_file

        from pipeline.config import from_dict

        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}")) / "artifacts"
        job = from_dict(json.loads((folder / "job.json").read_text()))
        rows = [row.split("\t") for row in (folder / "classes.tsv").read_text(encoding="utf-8").splitlines()]
        model = timm.create_model(job.model.arch, num_classes=len(rows))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        model = model.to(device).eval()
        if uses_channels_last(job, device):
            model = model.to(memory_format=torch.channels_last)
        return cls(name, str(version), model, [(wnid, label) for _, wnid, label in rows], job, device)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities on the CPU, with validation's precision and memory format (bf16
        autocast and channels_last on a GPU unless the job says otherwise; fp32 on the CPU)."""
        if uses_channels_last(self.job, self.device):
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, autocast_dtype(self.job, self.device)):
            return self.model(batch).float().softmax(dim=1).cpu()


class Preprocess:
    """`pipeline.loader.serve_pipeline` for batches of up to `max_batch` encoded images."""

    def __init__(self, job, max_batch: int, device: torch.device, threads: int):
        from pipeline.loader import serve_pipeline

        self.device = device
        gpu = device.type == "cuda"
        self.pipe = serve_pipeline(
            data=job.data,
            gpu=gpu,
            threads=threads,
            batch_size=max_batch,
            num_threads=threads,
            device_id=device.index or 0 if gpu else None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        self.pipe.build()

    def __call__(self, encoded: list[bytes]) -> torch.Tensor:
        from pipeline.loader import SERVE_INPUT

        self.pipe.feed_input(SERVE_INPUT, [np.frombuffer(b, dtype=np.uint8) for b in encoded])
        (images,) = self.pipe.run()
        return torch.from_numpy(np.array(images.as_cpu().as_tensor())).to(self.device)


def _answer(loaded: Loaded, probabilities: torch.Tensor, top_k: int) -> dict:
    top = probabilities.topk(min(top_k, len(probabilities)))
    predictions = [
        {"class_index": i, "wnid": loaded.classes[i][0], "name": loaded.classes[i][1], "probability": p}
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    return {"model": loaded.name, "version": loaded.version, "predictions": predictions}


def _warmup_image() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (120, 90, 60)).save(out, format="JPEG")
    return out.getvalue()


def _serving_version(target: str | None):
    from pipeline.tracking import registry

    return registry.serving_version(target)


# HTTP: FastAPI for routing, JSON errors and the OpenAPI description
api = FastAPI(
    title="resnet-pipe",
    description="Image classification with a ResNet from the resnet-pipe model registry.",
)
IMAGE_BODY = {
    "requestBody": {
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}
            },
        },
        "required": True,
    }
}
BATCH_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
        "required": True,
    }
}


@api.exception_handler(HTTPException)
async def _json_error(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


@api.exception_handler(StarletteHTTPException)  # unknown paths and methods: JSON as well
async def _json_route_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code)


# (everything Classifier uses is defined above it: Serve may pickle the class by value when it
# is decorated, before the rest of this module exists)
@serve.deployment
@serve.ingress(api)
class Classifier:
    """Answers batches of images with the version its alias points at (checked every
    `reload_check_s`); a new version loads beside the old one and takes over between batches."""

    def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        os.environ.update(self.settings.tracking_env)
        if self.settings.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.settings.tracking_uri
        gpu = torch.cuda.is_available() and self.settings.gpus_per_replica > 0
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        self.threads = max(1, int(self.settings.cpus_per_replica))
        torch.set_num_threads(self.threads)
        system.quick_gil_handoffs()  # the forward pass runs on a thread beside the event loop
        version, self.alias = _serving_version(self.settings.model)
        self.current = self._load(version.name, str(version.version))
        self._lock = threading.Lock()  # one DALI pipeline: batches preprocess one at a time
        self.token = os.environ.get(TOKEN_ENV) or None
        self.classify.set_max_batch_size(self.settings.max_batch_size)
        self.classify.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        if self.alias:
            threading.Thread(target=self._follow_alias, daemon=True, name="resnet-pipe-reload").start()

    def _load(self, name: str, version: str) -> tuple[Loaded, Preprocess]:
        loaded = Loaded.from_registry(name, version, self.device)
        preprocess = Preprocess(loaded.job, self.settings.max_batch_size, self.device, self.threads)
        with torch.inference_mode():  # the first calls pay for allocation, not a request
            loaded.probabilities(preprocess([_warmup_image()] * self.settings.max_batch_size))
        log.info(f"serving {name} version {version}")
        return loaded, preprocess

    def _follow_alias(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        loaded, _ = self.current
        while True:
            time.sleep(self.settings.reload_check_s)
            try:
                version = str(client.get_model_version_by_alias(loaded.name, self.alias).version)
                if version != self.current[0].version:
                    self.current = self._load(loaded.name, version)  # one assignment: atomic
            except Exception as e:  # the registry is away or the version broken: keep serving
                log.warning(f"alias {loaded.name}@{self.alias} not reloaded: {e}")

    @api.get("/health")
    async def health(self) -> dict:
        loaded, _ = self.current
        return {"status": "ok", "model": loaded.name, "version": loaded.version, "alias": self.alias}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def classify(self, images: list[bytes]) -> list[dict | BadImage]:
        return await asyncio.get_running_loop().run_in_executor(None, self._classify, images)

    def _classify(self, images: list[bytes]) -> list[dict | BadImage]:
        loaded, preprocess = self.current  # the whole batch answers with one version
        with self._lock, torch.inference_mode():
            try:
                batch = preprocess(images)
            except Exception:  # DALI failed on one of them: find it, answer the others
                return [self._one(loaded, preprocess, image) for image in images]
            probabilities = loaded.probabilities(batch)
        return [_answer(loaded, row, self.settings.top_k) for row in probabilities]

    def _one(self, loaded: Loaded, preprocess: Preprocess, image: bytes) -> dict | BadImage:
        try:
            batch = preprocess([image])
        except Exception as e:
            return BadImage(400, f"the image could not be decoded: {str(e).splitlines()[0]}")
        probabilities = loaded.probabilities(batch)
        return _answer(loaded, probabilities[0], self.settings.top_k)

    @api.post("/predict", openapi_extra=IMAGE_BODY)
    async def predict(self, request: Request) -> dict:
        """The top-k classes of one image, and the model version that answered."""
        images = await self._images(request)
        if len(images) != 1:
            raise HTTPException(400, f"/predict takes one image, got {len(images)}: use /predict/batch")
        return await self._answer_one(images[0][1])

    @api.post("/predict/batch", openapi_extra=BATCH_BODY)
    async def predict_batch(self, request: Request) -> dict:
        """The top-k classes of each image of a multipart form, in order; a bad image gets its
        error in its place."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(
                415, "/predict/batch takes a multipart/form-data body with one file per image"
            )
        images = await self._images(request)
        answers = await asyncio.gather(
            *(self._answer_one(body) for _, body in images), return_exceptions=True
        )
        results = []
        for (filename, _), answer in zip(images, answers):
            if isinstance(answer, HTTPException):
                results.append({"file": filename, "error": answer.detail, "status": answer.status_code})
            elif isinstance(answer, BaseException):
                raise answer
            else:
                results.append({"file": filename} | answer)
        return {"results": results}

    async def _answer_one(self, body: bytes) -> dict:
        try:
            check_image(body, self.settings)
        except BadImage as e:
            raise HTTPException(e.status, str(e)) from None
        answer = await self.classify(body)
        if isinstance(answer, BadImage):
            raise HTTPException(answer.status, str(answer))
        return answer

    async def _images(self, request: Request) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each image in the request; checks the token and the size."""
        if self.token and not hmac.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {self.token}"
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes * 8:
            raise HTTPException(413, f"request of {length} bytes is over the limit")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=64, max_fields=64)
            except Exception as e:
                raise HTTPException(400, f"unreadable multipart form: {e}") from None
            files = [
                (getattr(v, "filename", key), await v.read())
                for key, v in form.multi_items()
                if hasattr(v, "read")
            ]
            if not files:
                raise HTTPException(400, "the form holds no file: send each image as a file field")
            return files
        if not kind.startswith("image/"):
            raise HTTPException(
                415,
                f"content type '{kind or 'none'}' is not accepted: send image/jpeg (or png, bmp, "
                "webp) or a multipart form",
            )
        return [("body", await request.body())]


def app(settings: dict | None = None):
    """The application, configured by `Settings` (as a dict, the way `serve run` config files
    pass arguments)."""
    settings = asdict(Settings(**(settings or {})))
    scale = {"num_replicas": settings["replicas"]}
    if settings["replicas"] == "auto":
        scale = {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": settings["max_replicas"],
                "target_ongoing_requests": settings["max_batch_size"],
            }
        }
    token = os.environ.get(TOKEN_ENV)  # into the replicas' environment, never into the config
    return Classifier.options(
        **scale,
        max_ongoing_requests=settings["max_ongoing_requests"],
        max_queued_requests=settings["max_queued_requests"],  # beyond: the proxy answers 503
        ray_actor_options={
            "num_cpus": settings["cpus_per_replica"],
            "num_gpus": settings["gpus_per_replica"],
            "runtime_env": {"env_vars": {TOKEN_ENV: token}} if token else {},
        },
    ).bind(settings)
