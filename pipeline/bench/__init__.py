"""The benchmarks: `bench data` (DALI against torchvision's DataLoader), `bench train` (the
pipeline against a bare PyTorch loop) and `bench serve` (the Serve app against `mlflow models
serve`), each running the competitor side by side and reporting the ratio."""
