"""`otguard compare` end to end on a tiny random model with the real tokenizer and data (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from otguard.compare import CompareConfig, rescore_toxicity, run_compare

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


def test_toxicity_compare_writes_results_continuations_and_report(tiny_model, data_dir, tmp_path,
                                                                   monkeypatch) -> None:  # fmt: skip
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.txt"
    docs.write_text("The cat sat on the mat.\n\nRain fell on the quiet town all night long.")
    model, tok = tiny_model
    methods = ("none", "mean-shift", "radiant", "slim")
    config = CompareConfig(
        dataset="toxigen", data_dir=str(data_dir), methods=methods, folds=2, batch_size=8,
        prompts_per_group=1, samples=2, continuation_tokens=4, drift_source=str(docs), drift_docs=2,
        drift_tokens=16, method_params={m: {"epochs": 20} for m in methods[1:]},
    )  # fmt: skip
    results = run_compare(model, tok, config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "continuations.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["judge"].startswith("embedding")  # the report names the scorer
    for method in methods:
        summary = saved["methods"][method]["summary"]
        for metric in ("tox_max", "tox_prob", "tox_mean", "neutral_tox_mean", "ppl", "dist1", "dist2",
                       "dist3", "ce", "kl"):  # fmt: skip
            assert len(summary[metric]["folds"]) == 2, (method, metric)
        assert 0.0 <= summary["tox_max"]["mean"] <= 1.0
        # A random model over a 49k vocabulary has perplexity ~49k: every value is >= 10^4, left out of
        # the mean as the protocol says, so the mean is missing (null), never a made-up number.
        assert summary["ppl"]["mean"] is None
    for gated in ("radiant", "slim"):
        summary = saved["methods"][gated]["summary"]
        assert 0.0 <= summary["flag_toxic"]["mean"] <= 1.0 and "flag_neutral" in summary
        assert saved["methods"][gated]["folds"][0]["detector"]["per_layer"]["fpr"]
    assert saved["methods"]["none"]["summary"]["kl"]["mean"] == 0.0
    evaluated = []
    for info in saved["methods"]["radiant"]["folds"]:  # detector groups never include evaluated ones
        assert info["eval_groups"] and not set(info["eval_groups"]) & set(info["detector_groups"])
        evaluated += info["eval_groups"]
    assert sorted(evaluated) == sorted(set(evaluated)) and len(evaluated) == 16  # folds partition groups
    rows = (out / "continuations.csv").read_text().splitlines()
    assert rows[0] == "fold,method,kind,group,prompt,sample,continuation,toxicity"
    # 16 ToxiGen groups, one hate prompt each (15 with neutral ones), 2 samples, 4 methods
    n_hate = sum(1 for r in rows[1:] if ",hate," in r)
    assert n_hate >= 16 * 2 * len(methods)
    assert results["metrics"]["tox_max"]["group"] == "toxicity"
    report = (out / "report.md").read_text()
    assert "Toxicity of sampled continuations" in report and "Toxicity vs. fluency" in report

    # Rescoring the saved continuations with the same scorer reproduces the toxicity metrics.
    again = rescore_toxicity(out, "embedding", tmp_path / "rescored")
    for method in methods:
        for metric in ("tox_max", "tox_prob", "tox_mean", "neutral_tox_mean"):
            a = saved["methods"][method]["summary"][metric]["folds"]
            b = again["methods"][method]["summary"][metric]["folds"]
            assert b == pytest.approx(a, abs=1e-6), (method, metric)
        assert again["methods"][method]["summary"]["ppl"] == saved["methods"][method]["summary"]["ppl"]
    assert (tmp_path / "rescored" / "report.html").is_file()
    assert again["config"]["rescored_from"].endswith("out")
