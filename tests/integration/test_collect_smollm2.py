"""collect() on the packaged SmolLM2-135M with real TruthfulQA texts: batching changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otguard.activations import collect

pytestmark = pytest.mark.slow


def truthfulqa_texts(data_dir: Path, n: int = 32) -> list[str]:
    """The first ``n`` MC2 question/answer texts, "Q: {question} A: {answer}" (lengths vary)."""
    path = data_dir / "truthfulqa" / "mc_task.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    texts = []
    for entry in json.loads(path.read_text()):
        for answer in entry["mc2_targets"]:
            texts.append(f"Q: {entry['question']} A: {answer}")
            if len(texts) == n:
                return texts
    return texts


def test_batch_16_equals_batch_1_on_smollm2(smollm2, data_dir: Path) -> None:
    model, tok = smollm2
    texts = truthfulqa_texts(data_dir)
    lengths = {len(ids) for ids in tok(texts)["input_ids"]}
    assert len(texts) == 32 and len(lengths) > 5  # real padding happens in the batched run
    one = collect(model, tok, texts, batch_size=1, dtype="float32", cache=False, progress=False)
    many = collect(model, tok, texts, batch_size=16, dtype="float32", cache=False, progress=False)
    assert one.acts.shape == (32, 30, 9, 64)
    assert torch.isfinite(many.acts).all()
    torch.testing.assert_close(many.acts, one.acts, rtol=0, atol=1e-4)
