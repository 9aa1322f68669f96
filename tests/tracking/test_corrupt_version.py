"""A registered version whose weights in the artifact store differ from those registered (a
flipped byte at rest, a truncated copy) is refused by `deploy` in one line, before anything
starts, and by a replica that meets it later."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import register_untrained, small_job

from pipeline.serve.inference import Loaded
from pipeline.tracking.registry import WEIGHTS_TAG, RegistryError


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_version_with_corrupt_weights_is_refused_in_one_line(
    prepared_dataset: Path, workdir: Path, damage
) -> None:
    version = register_untrained(small_job(prepared_dataset, 1), "corrupt")
    assert len(version.tags[WEIGHTS_TAG]) == 64
    (weights,) = workdir.rglob("models/*/artifacts/artifacts/model.safetensors")  # the served copy
    data = weights.read_bytes()
    weights.write_bytes(
        data[:4000] + bytes([data[4000] ^ 0x10]) + data[4001:] if damage == "flipped byte" else data[:-9]
    )

    deploy = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "deploy", f"{version.name}/{version.version}", "--no-compile"],
        capture_output=True, text=True, timeout=300, cwd=workdir,
    )  # fmt: skip
    assert deploy.returncode == 2, deploy.stdout + deploy.stderr
    said = deploy.stderr.strip().splitlines()
    assert len(said) == 1 and "do not match the SHA-256 recorded when it was registered" in said[0], said
    assert said[0].startswith(f"error: {version.name}/{version.version}: its weights")
    with pytest.raises(RegistryError, match="corrupt copy"):  # a replica started later refuses it too
        Loaded.from_registry(version.name, version.version, torch.device("cpu"))
