"""The Ray Serve application: a registered model behind HTTP, with dynamic batching, the
training job's own evaluation transform, hot reload when its alias moves, and hardened input.

    resnet-pipe deploy resnet50@champion         # builds `app(settings)` and runs it
    serve run deploy/serve-config.yaml           # the same app on a cluster

Endpoints (OpenAPI description at /openapi.json, browsable at /docs):

    GET  /health            the model and version serving, and the replica that answers
    POST /predict           one image: its bytes with an image content type, or a multipart form
    POST /predict/batch     several images as a multipart form (one file field each)

    The Open Inference Protocol (KServe v2, as tritonclient speaks it; pipeline.serve.protocols):
    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}[/versions/{v}], /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer   "image" (BYTES: encoded images) or "input"
                            (FP32 N x 3 x H x W, preprocessed); JSON or the binary extension;
                            output "probabilities", or top-k with the classification extension

    MLflow's scoring protocol, as `mlflow models serve` answers it:
    GET  /ping;  POST /invocations   {"dataframe_split" | "dataframe_records" | "instances" | "inputs": ...}

Each image is checked (`pipeline.serve.inference.check_image`: body size, format, pixel count, a full
decode at reduced scale) before it joins a batch, so a bad request gets a 4xx JSON error and
never fails anyone else's.
Preprocessing is `pipeline.data.loader.serve_pipeline`: the same DALI graph as validation.
"""

import asyncio
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import ray
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline import system
from pipeline.serve import protocols
from pipeline.serve.client import TOKEN_ENV
from pipeline.serve.inference import (
    BadImage,
    Loaded,
    Preprocess,
    check_image,
    prediction,
    scoring_row,
    warmup_image,
)  # fmt: skip
from pipeline.serve.runtimes import choose
from pipeline.serve.settings import Settings, replica_resources
from pipeline.tracking import registry
from pipeline.train.step import configure_backends

log = logging.getLogger("ray.serve")


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
        configure_backends(self.device)  # batches come in a few padded sizes: cuDNN tunes each once
        self.threads = max(1, int(self.settings.cpus_per_replica))
        self.runtime, self.precision = choose(self.settings.runtime, self.settings.precision, self.device)
        torch.set_num_threads(self.threads)
        system.quick_gil_handoffs()  # the forward pass runs on a thread beside the event loop
        # One thread runs every batch (and the first load), so batches use a version's DALI
        # pipeline one at a time; and torch's OpenMP runtime gives each thread that runs a
        # parallel op a team of its own: more OpenMP threads than cores make every team sleep
        # between ops (pipeline.system.single_threaded_torch).
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="resnet-pipe-forward")
        # Each image's checks (a full decode at 1/8 scale, about 1 ms a photo) run beside the event
        # loop, which only routes requests and forms batches (PIL releases the GIL as it decodes)
        self._checks = ThreadPoolExecutor(2, thread_name_prefix="resnet-pipe-checks")
        version, self.alias = registry.serving_version(self.settings.model)
        self.current = self._forward.submit(self._load, version.name, str(version.version)).result()
        self.token = os.environ.get(TOKEN_ENV) or None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.classify.set_max_batch_size(self.settings.max_batch_size)
        self.classify.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        if self.alias:
            threading.Thread(target=self._follow_alias, daemon=True, name="resnet-pipe-reload").start()

    def _load(self, name: str, version: str) -> tuple[Loaded, Preprocess]:
        loaded = Loaded.from_registry(
            name, version, self.device, runtime=self.runtime, precision=self.precision, threads=self.threads
        )
        preprocess = Preprocess(
            loaded.job, self.settings.max_batch_size, self.device, self.threads, loaded.mean_image
        )
        compiled = self.settings.compile and loaded.compile(self.settings.max_batch_size, self.threads)
        with torch.inference_mode():  # the first calls pay for allocation, not a request
            loaded.probabilities(preprocess([warmup_image()] * self.settings.max_batch_size))
        how = f"{self.runtime}, {self.precision}{', compiled' if compiled else ''}"
        log.info(f"serving {name} version {version} ({how})")
        return loaded, preprocess

    def _follow_alias(self) -> None:
        from mlflow.tracking import MlflowClient

        system.single_threaded_torch()  # loads a new version beside the serving thread, not on its cores
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
        return {
            "status": "ok", "model": loaded.name, "version": loaded.version, "alias": self.alias,
            "replica": self.replica, "runtime": self.runtime, "precision": self.precision,
        }  # fmt: skip

    # Two batches at once: while one runs on the forward thread, the next is formed and queued
    # behind it, so the thread starts it without waiting on the event loop (which took 5 ms of
    # each 117 ms batch of 4 on 2 cores).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=2)
    async def classify(self, images: list[bytes]) -> list[tuple[Loaded, torch.Tensor] | BadImage]:
        return await asyncio.get_running_loop().run_in_executor(self._forward, self._classify, images)

    def _classify(self, images: list[bytes]) -> list[tuple[Loaded, torch.Tensor] | BadImage]:
        """Each image's class probabilities, with the version that gave them."""
        loaded, preprocess = self.current  # the whole batch answers with one version
        with torch.inference_mode():
            try:
                batch = preprocess(images)
            except Exception:  # DALI failed on one of them: find it, answer the others
                return [self._one(loaded, preprocess, image) for image in images]
            probabilities = loaded.probabilities(batch)
        return [(loaded, row) for row in probabilities]

    def _one(
        self, loaded: Loaded, preprocess: Preprocess, image: bytes
    ) -> tuple[Loaded, torch.Tensor] | BadImage:
        try:
            batch = preprocess([image])
        except Exception as e:
            return BadImage(400, f"the image could not be decoded: {str(e).splitlines()[0]}")
        return loaded, loaded.probabilities(batch)[0]

    def _rows(self, tensor) -> tuple[Loaded, torch.Tensor]:
        """A preprocessed tensor's probabilities, `max_batch_size` rows a forward pass."""
        loaded, _ = self.current
        batch = torch.from_numpy(tensor).to(self.device)
        size = self.settings.max_batch_size
        with torch.inference_mode():
            rows = [loaded.probabilities(batch[i : i + size]) for i in range(0, len(batch), size)]
        return loaded, torch.cat(rows)

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
        loaded, row = await self._probabilities(body)
        return prediction(loaded, row, self.settings.top_k)

    async def _probabilities(self, body: bytes) -> tuple[Loaded, torch.Tensor]:
        """One image's class probabilities, after its checks; HTTPException for a bad image."""
        resize_px = self.current[0].job.data.val_resize_px  # the evaluation transform's
        limits = (self.settings.max_body_bytes, self.settings.max_pixels, resize_px)
        try:
            await asyncio.get_running_loop().run_in_executor(self._checks, check_image, body, *limits)
        except BadImage as e:
            raise HTTPException(e.status, str(e)) from None
        answer = await self.classify(body)
        if isinstance(answer, BadImage):
            raise HTTPException(answer.status, str(answer))
        return answer

    async def _many(self, images: list[bytes] | None, tensor) -> tuple[Loaded, torch.Tensor]:
        """The probabilities of a request's images (each checked, then batched with everyone's) or
        of its preprocessed tensor; the first bad image fails the request, naming its place."""
        if tensor is not None:
            return await asyncio.get_running_loop().run_in_executor(self._forward, self._rows, tensor)
        answers = await asyncio.gather(*(self._probabilities(i) for i in images), return_exceptions=True)
        for place, answer in enumerate(answers):
            if isinstance(answer, HTTPException):
                raise HTTPException(answer.status_code, f"image {place}: {answer.detail}")
            if isinstance(answer, BaseException):
                raise answer
        versions = {loaded.version for loaded, _ in answers}
        if len(versions) > 1:  # a reload between batches: one version answers the whole request
            return await self._many(images, None)
        return answers[0][0], torch.stack([row for _, row in answers])

    def _limits(self) -> protocols.Limits:
        crop = self.current[0].job.data.val_crop_px
        return protocols.Limits(crop, self.settings.max_items, self.settings.max_body_bytes)

    def _authorize(self, request: Request) -> None:
        if self.token and not hmac.compare_digest(
            request.headers.get("authorization", ""), f"Bearer {self.token}"
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        """The request's body, after the token; 413 past the limit, declared or not."""
        self._authorize(request)
        limit = self.settings.max_body_bytes * 8
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise HTTPException(413, f"request of {length} bytes is over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"request of over {limit} bytes is over the limit")
        return bytes(body)

    def _model(self, name: str, version: str | None) -> Loaded:
        loaded, _ = self.current
        if name != loaded.name:
            raise HTTPException(404, f"unknown model '{name}': this deployment serves '{loaded.name}'")
        if version is not None and version != loaded.version:
            raise HTTPException(
                404, f"unknown version '{version}' of {name}: this deployment serves version {loaded.version}"
            )  # fmt: skip
        return loaded

    # ---- the Open Inference Protocol (v2) ----

    @api.get("/v2")
    async def v2_server(self) -> dict:
        from importlib.metadata import version

        return {"name": "resnet-pipe", "version": version("resnet-pipe"), "extensions": protocols.EXTENSIONS}

    @api.get("/v2/health/live")
    @api.get("/v2/health/ready")
    async def v2_health(self) -> dict:
        return {}  # answered: the replica is up, and has loaded its model before it takes requests

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def v2_model(self, name: str, version: str | None = None) -> dict:
        loaded = self._model(name, version)
        platform = "onnxruntime_onnx" if self.runtime == "onnxruntime" else "pytorch_libtorch"
        crop = loaded.job.data.val_crop_px
        return protocols.model_metadata(loaded.name, loaded.version, platform, crop, len(loaded.classes))

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(self, name: str, version: str | None = None) -> dict:
        self._model(name, version)
        return {}

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(self, request: Request, name: str, version: str | None = None) -> Response:
        """Class probabilities for encoded images ("image", BYTES) or a preprocessed tensor
        ("input", FP32 N x 3 x H x W), as JSON or in the binary tensor extension."""
        self._model(name, version)
        body = await self._body(request)
        header_length = request.headers.get(protocols.HEADER_LENGTH)
        try:
            parsed = protocols.parse_infer(body, header_length, self._limits())
        except protocols.ProtocolError as e:
            raise HTTPException(e.status, str(e)) from None
        loaded, rows = await self._many(parsed.images, parsed.tensor)
        content, headers = protocols.infer_response(
            parsed, rows.numpy(), loaded.classes, loaded.name, loaded.version
        )
        return Response(content, headers=headers)

    # ---- MLflow's scoring protocol ----

    @api.get("/ping")
    async def ping(self) -> Response:
        return Response("\n", media_type="application/json")

    @api.post("/invocations")
    async def invocations(self, request: Request) -> dict:
        """What `mlflow models serve` answers for the registered model: a row per image with its
        top class and the top-k as JSON (deploy/mlflow_model.py)."""
        body = await self._body(request)
        kind = request.headers.get("content-type", "")
        if not kind.startswith("application/json"):
            raise HTTPException(
                415, f"content type '{kind or 'none'}' is not accepted: send application/json"
            )
        try:
            images, tensor = protocols.parse_invocations(body, self._limits())
        except protocols.ProtocolError as e:
            raise HTTPException(e.status, str(e)) from None
        loaded, rows = await self._many(images, tensor)
        return {"predictions": [scoring_row(loaded, row, self.settings.top_k) for row in rows]}

    async def _images(self, request: Request) -> list[tuple[str, bytes]]:
        """(file name, bytes) of each image in the request; checks the token and the size."""
        self._authorize(request)
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
    if settings["cpus_per_replica"] is None or settings["gpus_per_replica"] is None:
        settings["cpus_per_replica"], settings["gpus_per_replica"] = replica_resources(
            ray.nodes(), settings["cpus_per_replica"], settings["gpus_per_replica"]
        )  # the cluster's nodes, not those of the machine that deploys
    token = os.environ.get(TOKEN_ENV)  # into the replicas' environment, never into the config
    if settings["require_token"] and not token:
        raise ValueError(
            f"require_token is set and {TOKEN_ENV} is not in the environment: set it where the app is "
            "built (the Ray head's environment, from a Kubernetes Secret on KubeRay), or set "
            "require_token: false to serve without authentication"
        )
    scale = {"num_replicas": settings["replicas"]}
    if settings["replicas"] == "auto":
        scale = {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": settings["max_replicas"],
                "target_ongoing_requests": settings["max_batch_size"],
            }
        }
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
