"""Model loading helpers that need no model: dtype names and the ``"auto"`` dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otguard import models


def test_dtype_names_and_errors() -> None:
    assert models._resolve_dtype("bf16") is torch.bfloat16
    assert models._resolve_dtype("float32") is torch.float32
    assert models._resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="'auto'"):
        models._resolve_dtype("float8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cpu_follows_native_bf16_support(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert models.auto_dtype("cpu") is expected
    assert models._resolve_dtype("auto", "cpu") is expected
    assert models.auto_dtype("mps") is torch.float32


def test_cpu_flag_reader_matches_proc_cpuinfo() -> None:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert models._cpu_has_native_bf16() == (" avx512_bf16" in flags or " amx_bf16" in flags)
