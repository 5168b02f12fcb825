"""``otguard serve`` under N concurrent clients: throughput and p50/p95 latency, with a policy and without.

Starts the real server (``otguard serve``, a subprocess on 127.0.0.1) on the packaged SmolLM2 with
one policy (the gated one-layer RADIANT-style policy with a full per-head map that the tests use:
the cost of a real RADIANT policy, which edits about as many positions), and sends the same
workload to it as ``--model smollm2-135m`` (no policy), ``+rand`` (repair) and ``+rand`` with
``"otguard": {"mode": "monitor"}``, interleaved over ``--rounds``. Then the same workload:

- on servers started with ``--no-join`` (static batches: a running batch takes no newcomer) and with
  ``--max-batch-size 1`` (no batching): what batching gives;
- in this process as a plain one-request-at-a-time ``model.generate`` loop (no server, no policy).

Workload: ``--requests`` TruthfulQA questions (``"Q: <question>\nA:"``, no primer: decoding-heavy),
greedy, ``--max-tokens`` each, sent by ``--clients`` concurrent clients
(each sends its next request when the previous one is answered).
Latency = send to last byte of the response. Threads pinned (``--threads``, default 1) for the
server and the plain loop. All traffic stays on 127.0.0.1; every loop is bounded.

    python benchmarks/serve.py [--clients 8] [--requests 32] [--max-tokens 32] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import os
import sys

_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
os.environ["OMP_NUM_THREADS"] = _threads  # before torch is imported
os.environ["MKL_NUM_THREADS"] = _threads

import argparse  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx2 as httpx  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.integration.test_policy_reload import smollm2_policy  # noqa: E402

from otguard.data import truthfulqa_items  # noqa: E402
from otguard.models import load_model  # noqa: E402

MODEL = "smollm2-135m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(policy_dir: Path, threads: int, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "otguard.cli",
        "serve",
        "--model",
        MODEL,
        "--policy",
        f"rand={policy_dir}",
        "--port",
        str(port),
        "--threads",
        str(threads),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start within 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_clients(
    base: str, model: str, prompts: list[str], clients: int, max_tokens: int, options: dict[str, Any] | None
) -> dict[str, Any]:
    """Send every prompt once from ``clients`` threads; latencies and the wall time of the whole set."""
    lock = threading.Lock()
    todo = list(range(len(prompts)))
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                body: dict[str, Any] = {
                    "model": model,
                    "prompt": prompts[i],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                if options:
                    body["otguard"] = options
                t0 = time.perf_counter()
                response = http.post(base + "/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if response.status_code != 200:
                        errors.append(response.text)
                        continue
                    latencies.append(dt)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0][:300]}")
    return {"latencies": latencies, "tokens": tokens[0], "wall": wall}


@torch.no_grad()
def plain_loop(prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """One request at a time through ``model.generate`` (greedy), in this process."""
    model, tok = load_model(MODEL)
    latencies, tokens = [], 0
    t_all = time.perf_counter()
    for prompt in prompts:
        t0 = time.perf_counter()
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        latencies.append(time.perf_counter() - t0)
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    return {"latencies": latencies, "tokens": tokens, "wall": time.perf_counter() - t_all}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def row(name: str, runs: list[dict[str, Any]]) -> tuple[str, float, float]:
    lat = [x for r in runs for x in r["latencies"]]
    wall = sum(r["wall"] for r in runs)
    n = sum(len(r["latencies"]) for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    p50, p95 = pct(lat, 0.5), pct(lat, 0.95)
    print(
        f"| {name} | {n} | {n / wall:.2f} | {tokens / wall:.1f} | {p50:.2f} | {p95:.2f} | "
        f"{1000 * sum(lat) / tokens:.1f} |"
    )
    return name, p50, p95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [f"Q: {it.question}\nA:" for it in truthfulqa_items(args.data_dir)[: args.requests]]
    print(
        f"torch {torch.__version__}, threads {args.threads} "
        f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}) per process, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"SmolLM2-135M-Instruct float32; {len(prompts)} TruthfulQA questions per run, greedy, max_tokens "
        f"{args.max_tokens}, {args.clients} concurrent clients; server runs interleaved over {args.rounds} "
        "rounds\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        model, tok = load_model(MODEL)
        smollm2_policy(model, tok).save(folder)
        del model
        configs = {
            "server, no policy": (MODEL, None),
            "server, policy (repair)": (f"{MODEL}+rand", None),
            "server, policy (monitor)": (f"{MODEL}+rand", {"mode": "monitor"}),
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        proc, base = start_server(folder, args.threads, [], Path(tmp) / "server.log")
        try:
            run_clients(base, MODEL, prompts[: args.clients], args.clients, 4, None)  # warm-up
            for r in range(args.rounds):
                names = list(configs)
                names = names[r % len(names) :] + names[: r % len(names)]
                for name in names:
                    model_name, options = configs[name]
                    results[name].append(
                        run_clients(base, model_name, prompts, args.clients, args.max_tokens, options)
                    )
            metrics = httpx.get(base + "/metrics").text
        finally:
            stop_server(proc)
        batches = [
            line
            for line in metrics.splitlines()
            if line.startswith(("otguard_batch_size_sum", "otguard_joined_requests_total"))
            or line.startswith("otguard_batch_size_count")
        ]
        others = {
            "server, no policy, static batches (--no-join)": ["--no-join"],
            "server, no policy, --max-batch-size 1": ["--max-batch-size", "1"],
        }
        single: dict[str, list[dict[str, Any]]] = {}
        for k, (name, extra) in enumerate(others.items()):
            proc, base = start_server(folder, args.threads, extra, Path(tmp) / f"server{k}.log")
            try:
                run_clients(base, MODEL, prompts[:2], 2, 4, None)
                single[name] = [run_clients(base, MODEL, prompts, args.clients, args.max_tokens, None)]
            finally:
                stop_server(proc)
    plain = [plain_loop(prompts, args.max_tokens)]

    print(
        "| configuration | requests | req/s | tokens/s | p50 latency s | p95 latency s "
        "| ms per token (latency) |"
    )
    print("|---|---|---|---|---|---|---|")
    stats = {name: row(name, runs) for name, runs in results.items()}
    for name, runs in single.items():
        row(name, runs)
    row("plain model.generate loop, one at a time (service time only)", plain)
    print()
    base_p50, base_p95 = stats["server, no policy"][1:]
    for name in ("server, policy (repair)", "server, policy (monitor)"):
        p50, p95 = stats[name][1:]
        print(f"{name} / no policy: p50 {p50 / base_p50:.3f}x, p95 {p95 / base_p95:.3f}x")
    tput = lambda runs: sum(len(r["latencies"]) for r in runs) / sum(r["wall"] for r in runs)  # noqa: E731
    best = tput(results["server, no policy"])
    unbatched = tput(single["server, no policy, --max-batch-size 1"])
    static = tput(single["server, no policy, static batches (--no-join)"])
    print(
        f"batching (joining): throughput {best / unbatched:.2f}x that of --max-batch-size 1, "
        f"{best / static:.2f}x static batches, {best / tput(plain):.2f}x the plain loop"
    )
    print("batches of the joining server (all configurations, warm-up included): " + "; ".join(batches))


if __name__ == "__main__":
    main()
