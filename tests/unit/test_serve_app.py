"""``otguard serve`` in-process on a tiny Llama: the app (Starlette's TestClient) and the batching engine.

References are independent of the server: greedy tokens from ``model.generate`` (with the policy
attached, or without), seeded samples from a no-cache loop over ``otguard.decoding.top_p_sample``,
per-token flags from the explicit reference hook (tests/reference/explicit_policy.py). Batched rows
must equal the same requests run alone, and the text of monitor mode the plain model's.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch
import transformers
from starlette.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers

from otguard.decoding import top_p_sample
from otguard.serve import Engine, create_app
from otguard.serve.engine import OFF, Job, Result
from otguard.serve.schemas import Sampling
from tests.reference.explicit_policy import ExplicitPolicy
from tests.unit.test_policy import VOCAB, random_policy, tiny_llama

torch.set_num_threads(1)

SERVED = "tiny"
CONTEXT = 128  # tiny_llama's max_position_embeddings
PROMPT = "w1 w2 w3 w4"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w0{% endif %}"
)


def word_tokenizer() -> Any:
    """Words w0..w92 after <pad>, <s>, <unk>: one token per word, decoded joined by spaces."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_llama(0), word_tokenizer()
    policies = {
        "two": random_policy(model),  # layers 0 and 2, gated, replace
        "one": random_policy(model, rule="kappa-p", layers=(1,), thresholds=(2,), with_A=(True,), seed=3),
    }
    return model, tok, policies


@pytest.fixture()
def engine(setup) -> Engine:
    model, tok, policies = setup
    return Engine(model, tok, policies, max_tokens_cap=64)


@pytest.fixture()
def client(engine):
    with TestClient(create_app(engine, SERVED)) as c:
        yield c


def ids_of(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


@torch.no_grad()
def reference(
    model, policy, prompt_ids: list[int], n: int, mode: str = "repair"
) -> tuple[list[int], list[bool]]:
    """Greedy tokens of ``model.generate`` for one prompt (policy attached in ``mode``) and, per generated
    token, whether the explicit reference hook flagged the position that produced it."""
    ids = torch.tensor([prompt_ids])
    kw = {"max_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    if policy is None:
        return model.generate(input_ids=ids, **kw)[0, len(prompt_ids) :].tolist(), []
    with ExplicitPolicy(policy, model, scope="generation", mode=mode) as ref:
        out = model.generate(input_ids=ids, **kw)[0, len(prompt_ids) :].tolist()
    start = len(prompt_ids) - 1
    flags = [
        any(e["flagged"] for (c, r, pos, layer), e in ref.log.items() if pos == start + k) for k in range(n)
    ]
    return out, flags


def post(client, path: str = "/v1/completions", **body) -> Any:
    return client.post(path, json={"model": SERVED, **body})


def sse_events(text: str) -> list[Any]:
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---------------------------------------------------------------- endpoints
def test_models_health_and_unknown_routes(client) -> None:
    got = client.get("/v1/models").json()
    assert [m["id"] for m in got["data"]] == ["tiny", "tiny+one", "tiny+two"]
    assert got["object"] == "list" and {m["object"] for m in got["data"]} == {"model"}
    assert client.get("/v1/models/tiny+one").json()["id"] == "tiny+one"
    missing = client.get("/v1/models/tiny+three")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json() == {
        "status": "ok",
        "model": "tiny",
        "policies": ["one", "two"],
        "queued": 0,
        "running": 0,
    }
    nowhere = client.get("/v2/nothing")
    assert nowhere.status_code == 404 and set(nowhere.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("policy", [None, "two", "one"])
def test_greedy_completion_equals_generate_and_flags_equal_the_reference(
    setup, engine, client, policy
) -> None:
    model, tok, policies = setup
    prompt_ids = ids_of(tok, PROMPT)
    n = 12
    name = SERVED if policy is None else f"{SERVED}+{policy}"
    got = client.post(
        "/v1/completions", json={"model": name, "prompt": prompt_ids, "max_tokens": n, "temperature": 0}
    ).json()
    assert engine.wait_idle(30)  # the references below use the same model object
    want, flags = reference(model, policies.get(policy), prompt_ids, n)
    assert got["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert got["choices"][0]["finish_reason"] == "length"
    assert got["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": n,
        "total_tokens": len(prompt_ids) + n,
    }
    summary = got["otguard"]
    if policy is None:
        assert summary == {"policy": None, "mode": OFF}
        return
    assert (summary["policy"], summary["mode"]) == (policy, "repair")
    assert summary["checked_tokens"] == n and summary["flagged_tokens"] == sum(flags)
    assert summary["flag_rate"] == sum(flags) / n and summary["flagged"] == any(flags)
    assert [i for s in summary["spans"] for i in range(s["start_token"], s["end_token"])] == [
        k for k in range(n) if flags[k]
    ]
    assert 0 < sum(flags) < n, "the policy flags every or no token; the test is vacuous"
    plain = reference(model, None, prompt_ids, n)[0]
    assert want != plain, "the policy does not change the text; the test is vacuous"


@pytest.mark.parametrize("policy", ["two", "one"])
def test_monitor_mode_keeps_the_plain_text_and_reports_the_flags(setup, engine, client, policy) -> None:
    model, tok, policies = setup
    prompt_ids, n = ids_of(tok, PROMPT), 12
    got = client.post(
        "/v1/completions",
        json={
            "model": f"{SERVED}+{policy}",
            "prompt": PROMPT,
            "max_tokens": n,
            "temperature": 0,
            "otguard": {"mode": "monitor"},
        },
    ).json()
    plain = post(client, prompt=PROMPT, max_tokens=n, temperature=0).json()
    assert got["choices"][0]["text"] == plain["choices"][0]["text"]
    assert engine.wait_idle(30)
    want, flags = reference(model, policies[policy], prompt_ids, n, mode="monitor")
    assert got["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
    assert got["otguard"]["mode"] == "monitor"
    assert got["otguard"]["flagged_tokens"] == sum(flags) and got["otguard"]["flagged"] == any(flags)
    spans = got["otguard"]["spans"]
    assert [i for s in spans for i in range(s["start_token"], s["end_token"])] == [
        k for k in range(n) if flags[k]
    ]
    text = got["choices"][0]["text"]
    words = text.split(" ")
    for s in spans:  # character offsets cut the returned text at token boundaries
        assert s["text"] == text[s["start_char"] : s["end_char"]]
        assert s["text"].strip() == " ".join(words[s["start_token"] : s["end_token"]])


def test_chat_uses_the_template_and_streams_the_same_text(setup, client) -> None:
    _, tok, _ = setup
    messages = [{"role": "w7", "content": "w8 w9"}]
    body = {"model": f"{SERVED}+two", "messages": messages, "max_tokens": 9, "temperature": 0}
    full = client.post("/v1/chat/completions", json=body).json()
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full["usage"]["prompt_tokens"] == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert full["object"] == "chat.completion"
    assert full["choices"][0]["message"]["role"] == "assistant"
    stream = client.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    chunks = sse_events(stream.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["otguard"] == full["otguard"]
    assert usage["choices"] == [] and usage["usage"] == full["usage"]


def test_stop_strings_cut_the_text_and_are_never_streamed(setup, client) -> None:
    plain = post(client, prompt=PROMPT, max_tokens=12, temperature=0).json()["choices"][0]["text"]
    words = plain.split(" ")
    stop = " " + words[5]
    cut = plain.index(stop)
    got = post(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never"]).json()
    assert got["choices"][0] == {"index": 0, "text": plain[:cut], "logprobs": None, "finish_reason": "stop"}
    assert got["usage"]["completion_tokens"] == plain[: cut + len(stop)].count(" ") + 1  # up to the stop word
    stream = post(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True)
    chunks = sse_events(stream.text)
    pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == plain[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len([p for p in pieces if p]) >= 3  # streamed token by token, not all at the end


def _hooked(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_an_answer_can_arrive_before_the_policy_is_detached_and_wait_idle_covers_that(
    setup, engine, client, monkeypatch
) -> None:
    model = setup[0]
    attach = engine._attach

    def slow_to_detach(policy: Any, mode: str) -> Any:
        handle = attach(policy, mode)
        remove = handle.remove

        def later() -> None:
            time.sleep(0.3)
            remove()

        handle.remove = later
        return handle

    monkeypatch.setattr(engine, "_attach", slow_to_detach)
    got = post(client, prompt=PROMPT, max_tokens=3, temperature=0, model=f"{SERVED}+one")
    assert got.status_code == 200
    assert _hooked(model)  # answered, but the batch has not detached its policy yet
    assert engine.wait_idle(30) and not _hooked(model)


def test_eos_ends_a_row(setup, engine) -> None:
    model, tok, _ = setup
    prompt_ids = ids_of(tok, PROMPT)
    want, _ = reference(model, None, prompt_ids, 6)
    engine.eos = {want[3]}
    result = run_jobs(engine, [job(prompt_ids, max_tokens=20)])[0]
    assert (result.finish_reason, result.completion_tokens) == ("stop", 4)
    assert result.text == tok.decode(want[:4], skip_special_tokens=True)


def test_seeded_sampling_equals_a_no_cache_reference_and_ignores_the_batch(setup, engine) -> None:
    model, tok, _ = setup
    prompt_ids, n = ids_of(tok, PROMPT), 10
    gen = torch.Generator().manual_seed(123)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[:, -1] / 0.7
            ids = torch.cat([ids, top_p_sample(logits, 0.8, gen)[:, None]], 1)
    want = ids[0, len(prompt_ids) :].tolist()
    alone = run_jobs(engine, [job(prompt_ids, max_tokens=n, temperature=0.7, top_p=0.8, seed=123)])[0]
    assert alone.text == tok.decode(want, skip_special_tokens=True)
    others = [
        job(ids_of(tok, "w5 w6 w7 w8 w9 w10 w11"), max_tokens=4, temperature=1.0, seed=1),
        job(prompt_ids, max_tokens=n, temperature=0.7, top_p=0.8, seed=123),
        job(ids_of(tok, "w20"), max_tokens=n, temperature=0),
    ]
    batched = run_jobs(engine, others)
    assert batched[1].text == alone.text
    assert batched[0].completion_tokens == 4
    again = run_jobs(engine, [job(prompt_ids, max_tokens=n, temperature=0.7, top_p=0.8, seed=124)])[0]
    assert again.text != alone.text


# ---------------------------------------------------------------- batching
def job(
    prompt_ids: list[int],
    *,
    policy: str | None = None,
    mode: str = OFF,
    max_tokens: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop=(),
    sink: list | None = None,
) -> Job:
    events = [] if sink is None else sink
    return Job(
        list(prompt_ids),
        policy,
        mode,
        Sampling(max_tokens, temperature, top_p, tuple(stop), seed),
        events.append,
    )


def run_jobs(engine: Engine, jobs: list[Job], joiners: list[Job] = ()) -> list[Result]:
    """Run ``jobs`` as one batch (``joiners`` queued first, to join it); the results of both, in order."""
    results: list[Result] = []
    for j in [*jobs, *joiners]:
        j.emit = lambda ev, _j=j: results.append((_j, ev)) if isinstance(ev, Result) else None  # type: ignore[func-returns-value]
    for j in joiners:
        engine.submit(j)
    engine.run_batch(jobs)
    by_job = {id(j): ev for j, ev in results}
    return [by_job[id(j)] for j in [*jobs, *joiners]]


@pytest.mark.parametrize(("policy", "mode"), [(None, OFF), ("two", "repair"), ("two", "monitor")])
def test_batched_rows_equal_the_same_requests_alone(setup, engine, policy, mode) -> None:
    _, tok, _ = setup
    prompts = ["w1 w2 w3 w4", "w9", "w30 w31 w32 w33 w34 w35 w36 w37", "w50 w51"]
    lengths = [12, 3, 7, 12]  # rows leave the batch at different steps
    jobs = [
        job(ids_of(tok, p), policy=policy, mode=mode, max_tokens=k)
        for p, k in zip(prompts, lengths, strict=True)
    ]
    batched = run_jobs(engine, jobs)
    alone = [
        run_jobs(engine, [job(j.prompt_ids, policy=policy, mode=mode, max_tokens=j.sampling.max_tokens)])[0]
        for j in jobs
    ]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.flags for r in batched] == [r.flags for r in alone]
    assert [r.completion_tokens for r in batched] == lengths
    assert {r.batch_size for r in batched} == {4}
    if policy is not None:
        assert any(any(r.flags) for r in batched)


@pytest.mark.parametrize(("policy", "mode"), [(None, OFF), ("two", "repair"), ("one", "monitor")])
def test_waiting_requests_join_a_running_batch_and_compute_what_they_would_alone(setup, engine, policy, mode):
    _, tok, _ = setup
    first = job(ids_of(tok, "w40 w41 w42"), policy=policy, mode=mode, max_tokens=10)
    # Joiners: a longer prompt than the running rows, a shorter one, one that ends at its first token.
    joiners = [
        job(
            ids_of(tok, "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15"),
            policy=policy,
            mode=mode,
            max_tokens=12,
        ),
        job(ids_of(tok, "w60"), policy=policy, mode=mode, max_tokens=6),
        job(ids_of(tok, "w70 w71"), policy=policy, mode=mode, max_tokens=1),
    ]
    results = run_jobs(engine, [first], joiners)
    assert engine.queued == 0
    assert [r.batch_size for r in results] == [1, 4, 4, 4]  # all three joined after the first step
    alone = [
        run_jobs(engine, [job(j.prompt_ids, policy=policy, mode=mode, max_tokens=j.sampling.max_tokens)])[0]
        for j in [first, *joiners]
    ]
    assert [r.text for r in results] == [r.text for r in alone]
    assert [r.flags for r in results] == [r.flags for r in alone]
    assert [r.completion_tokens for r in results] == [10, 12, 6, 1]
    if policy is not None:
        assert any(any(r.flags) for r in results)


def test_no_one_joins_while_another_policy_waits(setup, engine) -> None:
    _, tok, _ = setup
    waiting = [job([5, 6], policy="two", mode="repair"), job([7, 8], max_tokens=3)]
    for j in waiting:
        engine.submit(j)
    result = run_jobs(engine, [job(ids_of(tok, PROMPT), max_tokens=5)])[0]
    assert result.batch_size == 1 and engine.queued == 2
    assert [j for j in engine._pending] == waiting


def test_take_batch_groups_by_policy_and_mode_in_arrival_order(setup) -> None:
    model, tok, policies = setup
    engine = Engine(model, tok, policies, max_batch_size=2, batch_window_s=0.0)
    keys = [(None, OFF), ("two", "repair"), (None, OFF), ("two", "monitor"), (None, OFF), ("two", "repair")]
    jobs = [job([5, 6], policy=p, mode=m) for p, m in keys]
    jobs[2].cancelled = True  # a client that left before its batch: skipped
    for j in jobs:
        engine.submit(j)
    order = []
    while engine.queued:
        batch = engine._take_batch()
        assert batch is not None
        order.append([jobs.index(j) for j in batch])
    assert order == [[0, 4], [1, 5], [3]]


def test_concurrent_requests_share_a_batch(setup) -> None:
    model, tok, policies = setup
    engine = Engine(model, tok, policies, batch_window_s=0.5)
    sizes: list[tuple[int, str | None, str]] = []
    engine.on_batch = lambda size, policy, mode: sizes.append((size, policy, mode))
    done = threading.Semaphore(0)
    results: list[Any] = []

    def sink(ev: Any) -> None:
        if isinstance(ev, Result):
            results.append(ev)
            done.release()

    engine.start()
    try:
        for p, m in [(None, OFF), ("two", "repair"), (None, OFF), (None, OFF)]:
            j = job([5, 6, 7], policy=p, mode=m, max_tokens=3)
            j.emit = sink
            engine.submit(j)
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert sizes == [(3, None, OFF), (1, "two", "repair")]
    assert sorted(r.batch_size for r in results) == [1, 3, 3, 3]


def test_a_cancelled_request_leaves_the_running_batch(setup, engine) -> None:
    _, tok, _ = setup
    first, second = job(ids_of(tok, PROMPT), max_tokens=30), job(ids_of(tok, PROMPT), max_tokens=30)
    seen = []

    def cancel_after_three(ev: Any) -> None:
        seen.append(ev)
        if len(seen) == 3:
            first.cancelled = True

    first.stream, first.emit = True, cancel_after_three
    results = run_jobs_keep(engine, [first, second])
    assert results[1].completion_tokens == 30
    assert seen[-1].completion_tokens < 30


def run_jobs_keep(engine: Engine, jobs: list[Job]) -> list[Result]:
    """Like run_jobs, but keeps each job's own callback (called too)."""
    results: dict[int, Result] = {}
    for j in jobs:
        own = j.emit

        def emit(ev: Any, _j=j, _own=own) -> None:
            if isinstance(ev, Result):
                results[id(_j)] = ev
            _own(ev)

        j.emit = emit
    engine.run_batch(jobs)
    return [results[id(j)] for j in jobs]


# ---------------------------------------------------------------- errors and metrics
@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "tiny+nope", "prompt": PROMPT}, 404, "model", "model_not_found"),
        ({"model": "gpt-4o", "prompt": PROMPT}, 404, "model", "model_not_found"),
        ({"model": SERVED, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": SERVED, "prompt": PROMPT, "max_tokens": 65}, 400, "max_tokens", None),  # over the cap
        ({"model": SERVED, "prompt": " ".join(["w4"] * CONTEXT)}, 400, "messages", "context_length_exceeded"),
        (
            {"model": SERVED, "prompt": " ".join(["w4"] * 100), "max_tokens": 29},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        ({"model": SERVED, "prompt": PROMPT, "temperature": 3}, 400, "temperature", None),
        ({"model": SERVED, "prompt": PROMPT, "top_p": 0}, 400, "top_p", None),
        ({"model": SERVED, "prompt": PROMPT, "otguard": {"mode": "monitor"}}, 400, "otguard.mode", None),
        ({"model": SERVED, "prompt": [5, VOCAB]}, 400, "prompt", None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(client, body, status, param, code) -> None:
    got = client.post("/v1/completions", json=body)
    assert got.status_code == status
    error = got.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert isinstance(error["message"], str) and error["message"]
    assert post(client, prompt=PROMPT, max_tokens=2, temperature=0).status_code == 200


def test_malformed_json_and_wrong_methods(client) -> None:
    got = client.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert got.status_code == 400 and got.json()["error"]["message"].startswith(
        "The request body is not valid JSON"
    )
    assert client.post("/v1/completions", content=b"\xff\xfe").status_code == 400
    assert client.post("/v1/completions", json=[1]).status_code == 400
    assert client.get("/v1/completions").status_code == 405


def test_a_failing_batch_is_a_500_and_the_next_request_works(engine, client, monkeypatch) -> None:
    original = engine._decode
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return original(*args)

    monkeypatch.setattr(engine, "_decode", broken)
    failed = post(client, prompt=PROMPT, max_tokens=2)
    assert failed.status_code == 500
    assert (
        failed.json()["error"]["type"] == "server_error"
        and "device lost" in failed.json()["error"]["message"]
    )
    assert post(client, prompt=PROMPT, max_tokens=2).status_code == 200


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} not exported exactly once"
    return values[0]


def test_metrics_count_requests_tokens_latency_and_flags(client) -> None:
    a = client.post(
        "/v1/completions", json={"model": "tiny+two", "prompt": PROMPT, "max_tokens": 7, "temperature": 0}
    ).json()
    b = client.post(
        "/v1/completions",
        json={
            "model": "tiny+two",
            "prompt": "w3 w9",
            "max_tokens": 5,
            "temperature": 0,
            "otguard": {"mode": "monitor"},
        },
    ).json()
    post(client, prompt=PROMPT, max_tokens=3)
    post(client, prompt=PROMPT, max_tokens=0)
    page = client.get("/metrics")
    assert page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert metric(text, 'otguard_requests_total{endpoint="/v1/completions",status="200"}') == 3
    assert metric(text, 'otguard_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert metric(text, 'otguard_completion_tokens_total{policy="two"}') == 12
    assert metric(text, 'otguard_completion_tokens_total{policy="none"}') == 3
    assert metric(text, 'otguard_prompt_tokens_total{policy="none"}') == 4
    assert metric(text, 'otguard_request_latency_seconds_count{endpoint="/v1/completions",policy="two"}') == 2
    flagged = a["otguard"]["flagged_tokens"] + b["otguard"]["flagged_tokens"]
    assert (
        metric(text, 'otguard_flagged_tokens_total{mode="repair",policy="two"}')
        == a["otguard"]["flagged_tokens"]
    )
    assert metric(text, 'otguard_checked_tokens_total{mode="monitor",policy="two"}') == 5
    assert metric(text, 'otguard_flag_rate{policy="two"}') == pytest.approx(flagged / 12, abs=1e-12)
    assert metric(text, 'otguard_batch_size_count{mode="off",policy="none"}') == 1
