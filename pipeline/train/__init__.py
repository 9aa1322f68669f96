"""Training: the per-worker loop Ray Train runs on every rank (`loop`), the step and `evaluate`
(`step`, pure PyTorch), optimizer and learning-rate schedule (`optim`), the weight EMA (`ema`),
the checkpoint schema (`checkpoint`), rank 0's progress (`progress`) and node usage (`usage`)."""
