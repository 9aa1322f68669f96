"""resnet-pipe: train ResNets with DALI and Ray Train, track them in MLflow, serve them with Ray Serve.

One package per concern; data flows one way, and a package imports only those below it
(tests/test_layering.py holds the order and checks it):

    cli        the `resnet-pipe` commands: parse, call, print
    bench      `resnet-pipe bench data | train | serve`
    cluster    the only package that starts Ray, calls `fit` or talks to a Ray cluster
    serve      a registered version loaded for inference, image checks, the Serve app's settings, its client
    train      the per-worker loop, the step and `evaluate`, optimizer and schedule, EMA, checkpoints
    tracking   MLflow: runs, metrics, the model registry (the only package that imports mlflow)
    data       layouts, index and `data prepare`, DALI pipelines, augmentations, shards
    models     the models we build, registered into timm's registry
    config     the job schema and its loader; system: how threads share the cores
"""

import os

# ONNX Runtime's official builds (1.30 on) send usage telemetry to Microsoft on Linux too, and
# leave a session file (/tmp/.ses) behind, unless this is set before it starts: a serving node
# sends nothing anywhere but to its clients. Set it to 0 to let ONNX Runtime report.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
