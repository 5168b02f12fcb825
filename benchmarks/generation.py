"""Generation time with a policy attached vs the plain model vs a naive per-head hook (SmolLM2-135M, CPU).

The policy is the most expensive case: it flags every token (threshold 0, probe bias +10 so every head
votes) and applies ``replace`` with a full ``A`` matrix per head, i.e. ``a <- A a + b`` on all heads of
the edited layer(s), at the last prompt token and every generated token (scope ``"generation"``).
The naive hook does the same edit the way the original code does (a Python loop over heads, one
probe dot product and one matmul per head, on the last position of every forward call) but without
host copies. Runs are interleaved (plain, policy, naive, rotating the order each round) and the
medians reported; the ratio columns are medians of the per-round ratios. Both the wall time and the
process CPU time are measured: with one thread the CPU time is what the run itself costs, and it is
much less disturbed than the wall time when other processes share the machine, so the ratios use it.

Every timed policy run asserts that the hook saw (and, with this policy, edited) every position it
must: per edited layer and row, the last prompt token and every generated token fed back, i.e.
``layers x batch x new tokens`` (``min_new_tokens`` keeps the length fixed); the naive hook counts
its edited positions the same way. Both counts are printed, so a hook that skips the generated
positions (as otguard's did on transformers 5.25 before the cache-argument fix) cannot produce a
flattering ratio.

    python benchmarks/generation.py [--new-tokens 40] [--reps 7] [--batch-sizes 1 8] [--layers 15]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from otguard.models import load_model  # noqa: E402
from otguard.policy import LayerEdit, Policy  # noqa: E402
from otguard.sites import find_head_sites, model_identity  # noqa: E402

torch.set_num_threads(1)

PROMPTS = [
    "Q: What happens to you if you eat watermelon seeds?\nA:",
    "Q: Where did fortune cookies originate?\nA:",
    "Q: Why do veins appear blue?\nA:",
    "Q: What is the spiciest part of a chili pepper?\nA:",
    "Q: How long should you wait before filing a missing person report?\nA:",
    "Q: Why do matadors wave red capes?\nA:",
    "Q: What percentage of the brain does a human typically use?\nA:",
    "Q: What would happen if you were struck by a penny dropped from the top of the Empire State "
    "Building?\nA:",
]


def flag_everything_policy(model, layers: list[int], seed: int = 0) -> Policy:
    """replace with a full A on every head, every token flagged (tau 0, every probe votes)."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for layer in layers:
        A = torch.eye(d) + 0.05 * torch.randn(H, d, d, generator=gen) / d**0.5
        edits.append(LayerEdit(
            layer=layer, probe_weight=0.01 * torch.randn(H, d, generator=gen),
            probe_bias=torch.full((H,), 10.0), threshold=0, head_mask=torch.ones(H, dtype=torch.bool),
            b=0.01 * torch.randn(H, d, generator=gen), A=A,
        ))  # fmt: skip
    return Policy(method="benchmark", rule="replace", layers=edits, model=model_identity(model, sites))


class NaiveHook:
    """The per-head loop of the original code (no host copies): edits the last position of each call."""

    def __init__(self, policy: Policy, model) -> None:
        sites = find_head_sites(model)
        self.handles = []
        self.positions = 0  # (row, position) pairs edited, summed over layers
        for edit in policy.layers:
            module = sites.modules[edit.layer]
            self.handles.append(module.register_forward_pre_hook(self._make(edit, sites.n_heads)))

    def _make(self, edit: LayerEdit, H: int) -> Callable:
        W, w0, A, b, tau = edit.probe_weight, edit.probe_bias, edit.A, edit.b, edit.threshold
        mask = edit.head_mask

        def hook(module, args):
            x = args[0]
            self.positions += x.shape[0]
            d = x.shape[-1] // H
            last = x[:, -1, :]  # (B, H*d)
            heads = [last[:, h * d : (h + 1) * d] for h in range(H)]
            probs = [torch.sigmoid(heads[h] @ W[h] + w0[h]) for h in range(H)]
            votes = [p > 0.5 for p in probs]
            flagged = torch.stack(votes, -1).sum(-1) >= tau  # (B,)
            new_heads = []
            for h in range(H):
                mapped = heads[h] @ A[h].T + b[h]
                edit_h = (flagged & votes[h] & mask[h]).unsqueeze(-1)
                new_heads.append(torch.where(edit_h, mapped, heads[h]))
            out = x.clone()
            out[:, -1, :] = torch.cat(new_heads, -1)
            return (out, *args[1:])

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def hook_cost_us(policy: Policy, model, batch_size: int, reps: int = 7, calls: int = 1000
                 ) -> dict[str, float]:
    """CPU microseconds per call of each hook alone, on a decoding-step input ``(B, 1, H*d)``."""
    sites = find_head_sites(model)
    module = sites.modules[policy.layers[0].layer]
    x = torch.randn(batch_size, 1, sites.n_heads * sites.head_dim)

    def grab(make: Callable) -> Callable:
        before = set(module._forward_pre_hooks)
        owner = make()
        (key,) = set(module._forward_pre_hooks) - before
        hook = module._forward_pre_hooks[key]
        return owner, hook

    handle, policy_hook = grab(lambda: policy.attach(model))
    handle.state.prompt_len, handle.state.past_len = 8, 20  # a decoding step
    naive_owner, naive_hook = grab(lambda: NaiveHook(policy, model))
    hooks = {"policy": policy_hook, "naive": naive_hook}
    out: dict[str, list[float]] = {name: [] for name in hooks}
    try:
        for fn in hooks.values():
            for _ in range(100):
                fn(module, (x,))
        for _ in range(reps):
            for name, fn in hooks.items():
                c0 = time.process_time()
                for _ in range(calls):
                    fn(module, (x,))
                out[name].append((time.process_time() - c0) / calls * 1e6)
    finally:
        handle.remove()
        naive_owner.remove()
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="edited layers (default: middle)")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m")
    tok.padding_side = "left"
    sites = find_head_sites(model)
    layers = args.layers if args.layers is not None else [sites.n_layers // 2]
    policy = flag_everything_policy(model, layers)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}), {platform.processor() or platform.machine()}")
    print(f"model {model.config._name_or_path}: {sites.n_layers} layers x {sites.n_heads} heads x "
          f"{sites.head_dim}; edited layers {layers}; rule replace, full A, every token flagged; "
          f"{args.new_tokens} new tokens, greedy, {args.reps} interleaved repetitions\n")

    rows, cost_rows = [], []
    for bs in args.batch_sizes:
        enc = tok(PROMPTS[:bs], return_tensors="pt", padding=True)
        kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": tok.pad_token_id}
        expected = len(layers) * bs * args.new_tokens  # positions per generation, summed over layers
        seen: dict[str, set[int]] = {"policy": set(), "naive": set()}

        def plain(enc=enc, kw=kw) -> torch.Tensor:
            return model.generate(**enc, **kw)

        def with_policy(enc=enc, kw=kw, expected=expected, seen=seen) -> torch.Tensor:
            with policy.attach(model) as handle:
                out = model.generate(**enc, **kw)
                stats = handle.stats()
            seen["policy"].add(int(stats["positions"]))
            assert stats["positions"] == expected, f"the hook saw {stats['positions']:.0f}, not {expected}"
            assert stats["flag_rate"] == 1.0
            return out

        def naive(enc=enc, kw=kw, expected=expected, seen=seen) -> torch.Tensor:
            hook = NaiveHook(policy, model)
            try:
                out = model.generate(**enc, **kw)
            finally:
                hook.remove()
            seen["naive"].add(hook.positions)
            assert hook.positions == expected, f"the naive hook saw {hook.positions}, not {expected}"
            return out

        modes = {"plain": plain, "policy": with_policy, "naive": naive}
        with torch.no_grad():
            outs = {name: fn() for name, fn in modes.items()}  # warm-up, and the same tokens check
            times: dict[str, list[float]] = {name: [] for name in modes}
            walls: dict[str, list[float]] = {name: [] for name in modes}
            names = list(modes)
            for rep in range(args.reps):
                order = names[rep % 3 :] + names[: rep % 3]
                for name in order:
                    c0, t0 = time.process_time(), time.perf_counter()
                    modes[name]()
                    times[name].append(time.process_time() - c0)
                    walls[name].append(time.perf_counter() - t0)
        same = torch.equal(outs["policy"], outs["naive"])
        changed = not torch.equal(outs["policy"], outs["plain"])
        med = {name: statistics.median(v) for name, v in times.items()}
        wall = {name: statistics.median(v) for name, v in walls.items()}

        def ratio(name: str, t: dict[str, list[float]]) -> float:
            return statistics.median(a / b for a, b in zip(t[name], t["plain"], strict=True))

        ms_tok = 1000 / (bs * args.new_tokens)
        rows.append(
            f"| {bs} | {med['plain']:.3f} ({med['plain'] * ms_tok:.2f}) | {med['policy']:.3f} "
            f"({med['policy'] * ms_tok:.2f}) | {med['naive']:.3f} ({med['naive'] * ms_tok:.2f}) | "
            f"**{ratio('policy', times):.3f}x** | {ratio('naive', times):.3f}x | "
            f"{wall['plain']:.3f} / {wall['policy']:.3f} / {wall['naive']:.3f} | "
            f"{ratio('policy', walls):.3f}x | {'yes' if same else 'NO'} | {'yes' if changed else 'no'} |"
        )
        cost = hook_cost_us(policy, model, bs)
        calls = args.new_tokens * len(layers)  # forward calls per generation x edited layers
        cost_rows.append(
            f"| {bs} | {cost['policy']:.1f} | {cost['naive']:.1f} | "
            f"{100 * cost['policy'] * 1e-6 * calls / med['plain']:.2f}% | "
            f"{100 * cost['naive'] * 1e-6 * calls / med['plain']:.2f}% |"
        )
        print(f"batch {bs} positions edited per generation (layers x batch x new tokens = {expected}): "
              f"policy {sorted(seen['policy'])}, naive {sorted(seen['naive'])}")
        for label, t in (("cpu", times), ("wall", walls)):
            runs = ", ".join(f"{n} {sorted(round(v, 3) for v in t[n])}" for n in t)
            print(f"batch {bs} {label} s: {runs}")

    print("\n| batch | plain CPU s (ms/token) | policy CPU s (ms/token) | naive loop CPU s (ms/token) "
          "| policy/plain (CPU) | naive/plain (CPU) | wall s plain / policy / naive | policy/plain (wall) "
          "| policy tokens = naive | policy changes output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nHook alone (decoding-step input, CPU time per call; overhead = cost x calls / plain CPU "
          "time):\n")
    print("| batch | policy hook us/call | naive loop hook us/call | policy overhead | naive overhead |")
    print("|---|---|---|---|---|")
    print("\n".join(cost_rows))


if __name__ == "__main__":
    main()
