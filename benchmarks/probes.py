"""Benchmark: batched Stage-1 probe training vs the one-probe-at-a-time loop.

A: ``otguard.probes.train_probes`` on all L*H probes at once.
B: ``tests/reference/probe_loop.py`` (autograd + one Adam per probe, as the original code), in the
   same dtype (float32), on the same device, same epochs, same best-on-validation checkpointing
   (a validation pass every epoch), on a *subset* of probes
   (``--loop-probes``, default 9 = one SmolLM2 layer); its per-probe time is extrapolated to L*H.
A and B repetitions are interleaved; medians are reported. Threads are pinned to 1 unless
``--threads`` says otherwise.

    python benchmarks/probes.py                      # SmolLM2 shape, synthetic, 200 epochs
    python benchmarks/probes.py --epochs 1000 --reps 3
    python benchmarks/probes.py --acts /path/to/activation_folder   # real activations (ActivationSet)
    python benchmarks/probes.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="training examples (synthetic)")
    p.add_argument("--n-val", type=int, default=1000, help="validation examples (synthetic)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loop-probes", type=int, default=9, help="probes the loop trains (timed, extrapolated)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--acts", type=Path, default=None, help="ActivationSet folder or .safetensors file")
    return p.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reference.probe_loop import train_probes_loop  # noqa: E402

from otguard.probes import train_probes  # noqa: E402


def synthetic(n: int, n_val: int, shape: tuple[int, int, int], seed: int = 0):
    """float16 activations (as stored on disk); a random third of the heads carry a weak class signal."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_heads, dim = shape
    signal = (
        (torch.rand((n_layers, n_heads, 1), generator=gen) < 1 / 3)
        * torch.randn((n_layers, n_heads, dim), generator=gen)
        * (0.6 / dim**0.5)
    )

    def draw(m: int):
        y = (torch.rand(m, generator=gen) < 0.55).long()
        x = torch.randn((m, n_layers, n_heads, dim), generator=gen) + y.view(-1, 1, 1, 1) * signal
        return x.half(), y

    return (*draw(n), *draw(n_val))


def real(path: Path, seed: int = 0):
    """Activations and labels from an ActivationSet folder; a seeded 80/20 split (timing only)."""
    from safetensors.torch import load_file

    file = path / "activations.safetensors" if path.is_dir() else path
    tensors = load_file(str(file))
    x, y = tensors["acts"], tensors["labels"].long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def main() -> None:
    if ARGS.acts is not None:
        x, y, xv, yv = real(ARGS.acts)
        source = f"real activations from {ARGS.acts}"
    else:
        x, y, xv, yv = synthetic(ARGS.n, ARGS.n_val, (ARGS.layers, ARGS.heads, ARGS.dim))
        source = "synthetic float16 activations"
    n, n_layers, n_heads, dim = x.shape
    n_probes = n_layers * n_heads
    k = min(ARGS.loop_probes, n_probes)
    subset = [(i // n_heads, i % n_heads) for i in range(k)]
    kw = dict(fnr_weight=1.0, loss="risk", epochs=ARGS.epochs, seed=0, checkpoint="best")

    print(
        f"torch {torch.__version__}, device {ARGS.device}, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print(f"{source}: train N={n}, val N={len(yv)}, L={n_layers}, H={n_heads}, d={dim}, dtype {x.dtype}")
    print(
        f"epochs={ARGS.epochs} for both; A = batched, all {n_probes} probes; B = loop, {k} probes "
        f"(per-probe time extrapolated to {n_probes}); {ARGS.reps} interleaved repetitions, medians"
    )

    def run_a():
        bank = train_probes(x, y, xv, yv, device=ARGS.device, progress=False, **kw)
        if bank.weight.is_cuda:
            torch.cuda.synchronize()
        return bank

    def run_b():
        out = train_probes_loop(x, y, xv, yv, dtype=torch.float32, probes=subset, device=ARGS.device, **kw)
        if ARGS.device != "cpu":
            torch.cuda.synchronize()
        return out

    if ARGS.device != "cpu":  # CUDA context, kernels
        train_probes(x[:64], y[:64], xv[:64], yv[:64], device=ARGS.device, epochs=2, progress=False)
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(ARGS.reps):
        t0 = time.perf_counter()
        bank = run_a()
        times_a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        w_ref, b_ref, e_ref = run_b()
        times_b.append(time.perf_counter() - t0)

    a = statistics.median(times_a)
    b = statistics.median(times_b)
    per_a = a / n_probes
    per_b = b / k
    rows = [i for i, _ in subset], [j for _, j in subset]
    diff = (bank.weight.cpu()[rows] - w_ref[rows]).abs().max().item()
    same_epoch = (bank.best_epoch.cpu()[rows] == e_ref[rows]).float().mean().item()
    print(
        f"A batched : {a:8.3f} s total ({', '.join(f'{t:.2f}' for t in times_a)}), "
        f"{1e3 * a / ARGS.epochs:.2f} ms/epoch, {1e3 * per_a:.3f} ms/probe"
    )
    print(
        f"B loop    : {b:8.3f} s for {k} probes ({', '.join(f'{t:.2f}' for t in times_b)}), "
        f"{1e3 * per_b:.3f} ms/probe -> {per_b * n_probes:.1f} s extrapolated to {n_probes} probes"
    )
    print(f"speed-up per probe (B / A): {per_b / per_a:.1f}x")
    print(
        f"check on the {k} shared probes: max |w_A - w_B| = {diff:.2e}, same best epoch for "
        f"{100 * same_epoch:.0f}%"
    )
    if ARGS.epochs != 1000:
        print(
            f"projected to 1000 epochs: A {a * 1000 / ARGS.epochs:.1f} s, "
            f"B {per_b * n_probes * 1000 / ARGS.epochs:.1f} s (all {n_probes} probes)"
        )


if __name__ == "__main__":
    main()
