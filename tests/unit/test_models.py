"""Model loading helpers that need no model: dtype names and the ``"auto"`` dtype."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),
        # the name elsewhere in the file, or as part of another word, is not the instruction set
        ("model name\t: Imaginary CPU with avx512_bf16 marketing\nflags\t\t: fpu avx2\n", False),
        ("flags\t\t: fpu avx512_bf16x\n", False),
        ("", False),
    ],
)
def test_cpu_flag_reader_reads_whole_flags(cpuinfo: str, native: bool) -> None:
    assert models._cpu_has_native_bf16(cpuinfo) is native
