"""`otguard compare` end to end on a tiny random model with the real tokenizer and data (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from otguard.compare import CompareConfig, run_compare

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_model(smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = "tiny-random-llama"
    return model, tok


def test_compare_writes_results_answers_and_report(tiny_model, data_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.txt"
    docs.write_text("The cat sat on the mat.\n\nRain fell on the quiet town all night long.\n\nA third text.")
    model, tok = tiny_model
    config = CompareConfig(
        data_dir=str(data_dir), methods=("none", "iti", "mean-shift", "radiant", "slim"), folds=2, limit=10,
        batch_size=8, max_new_tokens=6, transfer_questions=3, drift_source=str(docs), drift_docs=2,
        drift_tokens=16, stage3_questions=2, kappa_grid=(5.0, 20.0),
        method_params={m: {"epochs": 20} for m in ("iti", "mean-shift", "radiant", "slim")},
    )  # fmt: skip
    results = run_compare(model, tok, config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "answers.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["methods"] == list(config.methods)
    assert set(saved["methods"]) == set(config.methods)
    for method in config.methods:
        summary = saved["methods"][method]["summary"]
        for metric in ("mc1", "mc2", "true", "info", "true_x_info_product", "true_x_info_joint", "ce", "kl",
                       "nq_true"):  # fmt: skip
            assert len(summary[metric]["folds"]) == 2, (method, metric)
        assert len(saved["methods"][method]["folds"]) == 2
    assert saved["methods"]["none"]["summary"]["kl"]["mean"] == 0.0
    assert "flag_rate" in saved["methods"]["radiant"]["summary"]
    assert saved["methods"]["slim"]["folds"][0]["policy"]["kappa"] in (5.0, 20.0)
    assert saved["methods"]["radiant"]["folds"][0]["detector"]["per_layer"]["fpr"]
    rows = (out / "answers.csv").read_text().splitlines()
    assert rows[0] == "fold,method,question,answer,true" and len(rows) == 1 + 5 * 10
    assert results["metrics"]["mc1"]["group"] == "mc"
    assert "<html" in (out / "report.html").read_text().lower()
