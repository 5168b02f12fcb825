"""``otguard serve`` as a real process on 127.0.0.1, driven by the official ``openai`` client.

One server (the packaged SmolLM2 and a gated random policy that certainly edits) for the whole
module; the last test sends it SIGTERM in the middle of a streamed answer, which must still arrive
whole before the process exits (by the signal, which uvicorn re-raises after draining).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.test_policy_reload import smollm2_policy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "Q: What happens if you crack your knuckles a lot?\nA:"
START_TIMEOUT = 150.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    model, tok = smollm2
    folder = tmp_path_factory.mktemp("serve") / "policy"
    smollm2_policy(model, tok).save(folder)
    port = free_port()
    log = (folder.parent / "server.log").open("w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "otguard.cli",
            "serve",
            "--model",
            MODEL,
            "--policy",
            f"rand={folder}",
            "--port",
            str(port),
            "--threads",
            "1",
            "--batch-window-ms",
            "5",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"otguard serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"otguard serve did not answer /health within {START_TIMEOUT:.0f} s")
        time.sleep(0.5)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield proc, client, base, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def complete(client, model: str, **kw):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0, **kw)


def test_models_and_health(server) -> None:
    _, client, base, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL, f"{MODEL}+rand"]
    assert httpx.get(base + "/health").json()["policies"] == ["rand"]


def test_policy_changes_the_text_and_monitor_keeps_it(server) -> None:
    _, client, _, _ = server
    plain = complete(client, MODEL)
    repaired = complete(client, f"{MODEL}+rand")
    monitored = complete(client, f"{MODEL}+rand", extra_body={"otguard": {"mode": "monitor"}})
    text = plain.choices[0].text
    assert plain.usage.completion_tokens == 16 and text.strip()
    assert repaired.choices[0].text != text, "the policy does not change the text"
    assert monitored.choices[0].text == text
    assert plain.model_extra["otguard"] == {"policy": None, "mode": "off"}
    for response, mode in ((repaired, "repair"), (monitored, "monitor")):
        summary = response.model_extra["otguard"]
        assert (summary["policy"], summary["mode"], summary["checked_tokens"]) == ("rand", mode, 16)
        assert summary["flag_rate"] == summary["flagged_tokens"] / 16
        assert summary["flagged"] is True  # about half of the heads vote with this calibration
        assert sum(s["end_token"] - s["start_token"] for s in summary["spans"]) == summary["flagged_tokens"]
        answer = response.choices[0].text
        assert all(s["text"] == answer[s["start_char"] : s["end_char"]] for s in summary["spans"])


def test_chat_streaming_and_seeds(server) -> None:
    _, client, _, _ = server
    messages = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(
        model=f"{MODEL}+rand", messages=messages, max_tokens=12, temperature=0
    )
    content = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and content
    stream = client.chat.completions.create(
        model=f"{MODEL}+rand", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].model_extra["otguard"] == full.model_extra["otguard"]
    kw = {"temperature": 0.9, "top_p": 0.9, "max_tokens": 12}
    a, b = (client.completions.create(model=MODEL, prompt=PROMPT, seed=7, **kw).choices[0].text for _ in "ab")
    assert a == b
    stops = client.completions.create(model=MODEL, prompt=PROMPT, seed=7, stop=[a[3:6]], **kw)
    assert stops.choices[0].text == a[: a.index(a[3:6])] and stops.choices[0].finish_reason == "stop"


def test_errors_are_openai_errors(server) -> None:
    _, client, base, _ = server
    with pytest.raises(openai.NotFoundError) as missing:
        complete(client, f"{MODEL}+nope")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as zero:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert zero.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert long.value.code == "context_length_exceeded"
    bad = httpx.post(
        base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert complete(client, MODEL).choices[0].text  # still serving


def test_metrics_page(server) -> None:
    _, _, base, _ = server
    text = httpx.get(base + "/metrics").text
    assert 'otguard_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "otguard_request_latency_seconds_bucket" in text and 'otguard_flag_rate{policy="rand"}' in text


def test_sigterm_drains_the_request_in_flight_and_exits(server) -> None:
    """Last in this module: it stops the server."""
    proc, client, base, log = server
    first = threading.Event()
    got: dict[str, object] = {}

    def stream() -> None:
        pieces, finish, summary = [], None, None
        for chunk in client.completions.create(
            model=f"{MODEL}+rand", prompt=PROMPT, max_tokens=60, temperature=0, stream=True
        ):
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            summary = (chunk.model_extra or {}).get("otguard", summary)
            first.set()
        got.update(text="".join(pieces), finish=finish, summary=summary)

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(60), "no streamed text within 60 s"
    proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert not worker.is_alive()
    assert got["finish"] == "length" and got["summary"]["checked_tokens"] == 60  # type: ignore[index]
    # uvicorn re-raises the signal once it has drained, so the status says "terminated by SIGTERM".
    assert proc.wait(60) == -signal.SIGTERM
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=2)
    log.seek(0)
    output = log.read()
    assert output.index("Stopping: finishing") < output.index("Stopped: every request answered")
