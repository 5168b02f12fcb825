"""The ``otguard`` model type of lm-evaluation-harness on the packaged SmolLM2, offline.

A local lm-eval task (YAML over a JSONL file made here from 20 TruthfulQA MC1 questions, context
``"Q: {question}\\nA:"`` and answers ``" {answer}"``) is evaluated

- by lm-eval's own ``hf`` model type, and by ``otguard`` without a policy: the same scores;
- by ``otguard`` with a policy, through the command line (``python -m otguard.integrations.lm_eval``):
  every answer log-likelihood equals otguard's own computation, the policy attached with scope
  ``"answer"`` (only answer tokens edited, as ``score_mc`` does), within 1e-4;
- a small ``generate_until`` task: lm-eval's greedy text equals ``model.generate`` with the policy
  attached (scope ``"generation"``), up to the stop sequence.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from otguard.evaluation.truthfulqa_mc import answer_span
from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip(
    "lm_eval", reason="the lm-eval extra is not installed (pip install otguard[lm-eval])"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
N_MC, N_GEN, GEN_TOKENS = 12, 3, 8
MC_TASK, GEN_TASK = "otguard_tqa_mc1", "otguard_tqa_gen"
# float64 log-softmax (an HFLM option) as otguard's scorer uses: float32 over a 49k vocabulary alone
# moves a 10-token answer score by ~2e-4.
MODEL_ARGS = "dtype=float32,softmax_dtype=float64"


def context_of(question: str) -> str:
    return f"Q: {question}\nA:"


def mild_policy(model: Any, layer: int = 10, seed: int = 0) -> Policy:
    """RADIANT rule, always flagging, every head of ``layer`` replaced by a mild random affine map."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edit = LayerEdit(
        layer=layer,
        probe_weight=torch.zeros(H, d),
        probe_bias=torch.full((H,), 10.0),
        threshold=None,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=0.5 * torch.randn(H, d, generator=gen),
        A=torch.eye(d) + 0.3 / d**0.5 * torch.randn(H, d, d, generator=gen),
    )
    return Policy(method="random", rule="replace", layers=[edit], model=model_identity(model))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, smollm2: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lm_eval")
    items = json.loads((data_dir / "truthfulqa" / "mc_task.json").read_text(encoding="utf-8"))
    mc = []
    for item in items[:N_MC]:
        choices = list(item["mc1_targets"])
        mc.append({"context": context_of(item["question"]), "choices": choices,
                   "label": [item["mc1_targets"][c] for c in choices].index(1)})  # fmt: skip
    gen = [{"context": context_of(item["question"])} for item in items[N_MC : N_MC + N_GEN]]
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in (("mc1.jsonl", mc), ("gen.jsonl", gen)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = 'dataset_path: json\ntest_split: test\ndoc_to_text: "{{context}}"\n'
    (tasks / "mc1.yaml").write_text(
        f"task: {MC_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc1.jsonl'}\n"
        'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        'target_delimiter: " "\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )
    (tasks / "gen.yaml").write_text(
        f"task: {GEN_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        'output_type: generate_until\ndoc_to_target: ""\n'
        f'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )
    model, tok = smollm2
    policy_dir = mild_policy(model).save(root / "policy")
    from otguard.integrations.lm_eval import _model_source

    return {"root": root, "tasks": tasks, "mc": mc, "gen": gen, "policy": policy_dir,
            "folder": _model_source("smollm2-135m")}  # fmt: skip


@pytest.fixture(scope="module")
def plain_scores(setup: dict[str, Any], smollm2: Any) -> dict[tuple[int, int], float]:
    model, tok = smollm2
    return otguard_loglikelihoods(model, tok, setup["mc"], None)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate_in_process(setup: dict[str, Any], model: Any, tasks: list[str]) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(setup["tasks"]))
    return simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0
    )


def mc_loglikelihoods(samples: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """(doc, choice) -> log-likelihood from lm-eval's per-sample log (one request per choice)."""
    out = {}
    for s in samples:
        for j, resp in enumerate(s["resps"]):
            out[(int(s["doc_id"]), j)] = float(resp[0][0])
    return out


@torch.inference_mode()
def otguard_loglikelihoods(model: Any, tok: Any, mc: list[dict[str, Any]], policy: Policy | None) -> dict:
    """otguard's own answer scores: one forward per answer, the policy editing the answer tokens."""
    out = {}
    for i, row in enumerate(mc):
        for j, choice in enumerate(row["choices"]):
            ids, start = answer_span(tok, row["context"], " " + choice)
            x = torch.tensor([ids])
            if policy is None:
                logits = model(input_ids=x).logits[0]
            else:
                with policy.attach(model, scope="answer") as handle:
                    handle.set_answer_start(start)
                    logits = model(input_ids=x).logits[0]
            logp = logits[start - 1 : -1].double().log_softmax(-1)
            out[(i, j)] = float(logp.gather(1, x[0, start:, None]).sum())
    return out


def assert_close(got: dict, want: dict, atol: float = 1e-4) -> float:
    assert got.keys() == want.keys()
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst <= atol, f"largest difference {worst:.2e} > {atol}"
    return worst


def test_unsteered_otguard_equals_hf_and_otguard_scores(setup: dict[str, Any], plain_scores: dict) -> None:
    from lm_eval.models.huggingface import HFLM

    from otguard.integrations.lm_eval import OtguardLM

    args: dict[str, Any] = dict(kv.split("=") for kv in MODEL_ARGS.split(","))
    args.update(batch_size=16, device="cpu")
    hf = evaluate_in_process(setup, HFLM(pretrained=setup["folder"], **args), [MC_TASK])
    ours = evaluate_in_process(setup, OtguardLM(pretrained="smollm2-135m", **args), [MC_TASK])
    ll_hf, ll_ours = mc_loglikelihoods(hf["samples"][MC_TASK]), mc_loglikelihoods(ours["samples"][MC_TASK])
    assert len(ll_hf) == sum(len(r["choices"]) for r in setup["mc"]) > 3 * N_MC
    assert ll_ours == ll_hf  # the same HFLM code path: identical numbers
    assert ours["results"][MC_TASK]["acc,none"] == hf["results"][MC_TASK]["acc,none"]
    worst = assert_close(ll_hf, plain_scores)
    print(f"unsteered log-likelihoods: largest difference to otguard's scorer {worst:.1e}")


def test_steered_through_the_cli_equals_otguard_scorer(
    setup: dict[str, Any], smollm2: Any, plain_scores: dict, tmp_path: Path
) -> None:
    model, tok = smollm2
    policy = Policy.load(setup["policy"], model=model)
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), PYTHONPATH=str(REPO_ROOT))  # fmt: skip
    cmd = [sys.executable, "-m", "otguard.integrations.lm_eval", "--model", "otguard",
           "--model_args", f"pretrained=smollm2-135m,policy={setup['policy']},{MODEL_ARGS}",
           "--tasks", f"{MC_TASK},{GEN_TASK}", "--include_path", str(setup["tasks"]), "--batch_size", "16",
           "--device", "cpu", "--output_path", str(out), "--log_samples"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (mc_file,) = out.rglob(f"samples_{MC_TASK}_*.jsonl")
    (gen_file,) = out.rglob(f"samples_{GEN_TASK}_*.jsonl")
    (results_file,) = out.rglob("results_*.json")
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]  # noqa: E731
    steered = mc_loglikelihoods(read(mc_file))
    want = otguard_loglikelihoods(model, tok, setup["mc"], policy)
    worst = assert_close(steered, want)
    assert max(abs(plain_scores[k] - want[k]) for k in want) > 0.05, "the policy did not change the scores"
    config = json.loads(results_file.read_text())["config"]
    assert config["otguard_policy"] == policy.summary()
    # accuracy as lm-eval computes it (argmax, first index wins a tie) from otguard's own scores
    acc = sum(max(range(len(r["choices"])), key=lambda j, i=i: want[(i, j)]) == r["label"]
              for i, r in enumerate(setup["mc"])) / N_MC  # fmt: skip
    assert json.loads(results_file.read_text())["results"][MC_TASK]["acc,none"] == pytest.approx(acc, abs=0)
    # generate_until: greedy text with the policy in generation scope, cut at the stop sequence
    texts = {int(s["doc_id"]): s["resps"][0][0] for s in read(gen_file)}
    changed = 0
    for i, row in enumerate(setup["gen"]):
        enc = tok(row["context"], return_tensors="pt")
        with policy.attach(model, scope="generation"):
            ids = model.generate(
                **enc, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
            )
        ref = tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert texts[i] == ref, (i, texts[i], ref)
        plain_ids = model.generate(
            **enc, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
        changed += (
            tok.decode(plain_ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).split("\n")[0]
            != ref
        )
    assert changed >= 1, "the policy changed no generated text"
    print(f"steered log-likelihoods: largest difference to otguard's scorer {worst:.1e}")
