"""Reference Stage-1 probe training: one probe at a time, autograd, as the original code did.

Deliberately plain: a (d,) weight and a scalar bias per (layer, head), the loss written out from
docs/method.md §2.2 (or torch's BCE with ``pos_weight``), ``loss.backward()`` and one ``torch.optim.Adam``
per probe, then the hard validation loss FPR + bl*FNR after every epoch and a *copy* of the best
parameters. otguard's batched trainer must give the same numbers (same init: the same float32
Xavier-uniform draw of all (L, H, d) weights from ``torch.Generator().manual_seed(seed)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def xavier_draw(n_layers: int, n_heads: int, dim: int, seed: int) -> Tensor:
    """The (L, H, d) float32 init: U(-b, b), b = sqrt(6 / (d + 1)) (Xavier, fan_in d, fan_out 1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bound = math.sqrt(6.0 / (dim + 1))
    return torch.empty((n_layers, n_heads, dim), dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def _probe_loss(z: Tensor, y: Tensor, kind: str, bl: float) -> Tensor:
    if kind == "risk":
        p = torch.sigmoid(z)
        n0 = (1 - y).sum()
        n1 = y.sum()
        return (p * (1 - y)).sum() / n0 + bl * ((1 - p) * y).sum() / n1
    pos_weight = torch.tensor(bl, dtype=z.dtype, device=z.device)
    return F.binary_cross_entropy_with_logits(z, y, pos_weight=pos_weight)


def _hard_val_loss(z: Tensor, y: Tensor, bl: float) -> float:
    votes = z > 0
    pos = y > 0.5
    fpr = (votes & ~pos).sum().item() / (~pos).sum().item()
    fnr = (~votes & pos).sum().item() / pos.sum().item()
    return fpr + bl * fnr


def train_probes_loop(
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    fnr_weight: float = 1.0,
    loss: str = "risk",
    lr: float = 2e-3,
    epochs: int = 1000,
    seed: int = 0,
    checkpoint: str = "best",
    dtype: torch.dtype = torch.float64,
    probes: Iterable[tuple[int, int]] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Train the probes of x (N, L, H, d) one by one: weight (L, H, d), bias (L, H), best_epoch (L, H).

    ``probes`` restricts training to some (layer, head) pairs (the others stay at their init / 0);
    the benchmark uses it to time a subset. ``device``: where each probe is trained (results on CPU).
    """
    _, n_layers, n_heads, dim = x.shape
    init = xavier_draw(n_layers, n_heads, dim, seed).to(dtype)
    weight = init.clone()
    bias = torch.zeros((n_layers, n_heads), dtype=dtype)
    best_epoch = torch.full((n_layers, n_heads), epochs, dtype=torch.int64)
    yf = y.to(device=device, dtype=dtype)
    yvf = y_val.to(device=device, dtype=dtype)
    pairs = probes if probes is not None else [(i, j) for i in range(n_layers) for j in range(n_heads)]
    for layer, head in pairs:
        a = x[:, layer, head, :].to(device=device, dtype=dtype).contiguous()
        a_val = x_val[:, layer, head, :].to(device=device, dtype=dtype).contiguous()
        w = init[layer, head].to(device, copy=True).requires_grad_(True)
        b = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        best = math.inf
        best_w, best_b, best_e = w.detach().clone(), b.detach().clone(), epochs
        for epoch in range(1, epochs + 1):
            opt.zero_grad()
            value = _probe_loss(a @ w + b, yf, loss, fnr_weight)
            value.backward()
            opt.step()
            if checkpoint == "best":
                with torch.no_grad():
                    val = _hard_val_loss(a_val @ w + b, yvf, fnr_weight)
                if val < best - 1e-12:  # equal losses from different counts are ties: keep the earlier
                    best = val
                    best_w, best_b, best_e = w.detach().clone(), b.detach().clone(), epoch
        if checkpoint == "last":
            best_w, best_b = w.detach().clone(), b.detach().clone()
        weight[layer, head] = best_w.cpu()
        bias[layer, head] = best_b.cpu()
        best_epoch[layer, head] = best_e
    return weight, bias, best_epoch
