"""Inference and serving: a registered version loaded for inference, the checks an image passes
before it joins a batch, and batches preprocessed with the evaluation transform (`inference`);
the Serve app's settings (`settings`); its HTTP client (`client`). The app itself is
deploy/serve_app.py; `pipeline.cluster.serving` starts it on Ray."""
