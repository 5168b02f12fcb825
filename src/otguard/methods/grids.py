"""Default hyper-parameter grids that scale with the model, and each method's published settings.

A method's strength decides where it sits between "does nothing" and "breaks the model", so
``otguard compare`` sweeps a small grid per method (:func:`default_grid`, at most 6 points each; every
point is a dict of constructor parameters, fitted with :meth:`otguard.methods.base.Method.fit_grid`)
and keeps the point that the validation rule picks. ``NAME@paper`` rows (:func:`parse_variant`) run a
method with its published settings instead (:data:`PAPER_PARAMS`).

Why these values:

- **ITI**: K as a share of all L·H heads (``head_share`` 5 %: the paper's K = 48 is 4.7 % of LLaMA-7B's
  1,024 heads, but 18 % of SmolLM2-135M's 270) times α ∈ {2, 8}. α is in standard deviations of each
  head's projection; the paper's α = 15 on 18 % of SmolLM2's heads raised the cross-entropy from 3.50
  to 7.63 nats (issue 12), so the grid starts well below it (α = 2: KL 0.065 on SmolLM2, within the
  default budget) and stops at 8 (KL 0.86: past it), so the frontier spans the budget. A 2 % share was
  in the grid until the full run showed it never chosen and never on the frontier's better side.
- **mean shift**: strength 0.5 or 2 times the class-mean difference (1 = move the undesirable mean onto
  the desirable one).
- **RADIANT**: the margin α puts the transported mean about α desirable-class standard deviations past
  the probe's boundary (docs/method.md §9.5), an ITI-like strength; 4 is a gentle repair, 15 the
  paper's LLaMA-7B value, 40 beyond it: the full run chose 15, the largest point then, at KL 0.034,
  a third of the budget, so the grid reaches further (margin 1 was never chosen there).
- **SLIM**: κ ∈ {5, 20, 40} from the Stage-3 grid (κ only rescales the edit: one fit, see
  ``Policy.with_kappa``).

Each grid has two or three points: every point costs a validation pass and a frontier pass of
``otguard compare`` (10 points in all; see the README's budget figures).

This module imports no torch, so the CLI can check grids and method ids quickly.
"""

from __future__ import annotations

import math
from typing import Any

from otguard.errors import ConfigError

__all__ = [
    "ITI_HEAD_SHARES",
    "ITI_STRENGTHS",
    "KAPPA_GRID",
    "MEAN_SHIFT_STRENGTHS",
    "PAPER",
    "PAPER_PARAMS",
    "RADIANT_MARGINS",
    "SLIM_KAPPAS",
    "default_grid",
    "heads_from_share",
    "parse_variant",
]

ITI_HEAD_SHARES: tuple[float, ...] = (0.05,)
ITI_STRENGTHS: tuple[float, ...] = (2.0, 8.0)
MEAN_SHIFT_STRENGTHS: tuple[float, ...] = (0.5, 2.0)
RADIANT_MARGINS: tuple[float, ...] = (4.0, 15.0, 40.0)
#: SLIM's swept κ (three points of the Stage-3 grid, from its gentlest to its strongest).
SLIM_KAPPAS: tuple[float, ...] = (5.0, 20.0, 40.0)
#: SLIM's κ grid, also Stage 3's default (:mod:`otguard.methods.stage3`).
KAPPA_GRID: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)

PAPER = "paper"
#: Published settings per method id, for the ``NAME@paper`` rows (docs/method.md §6-§7). ITI: K = 48
#: heads, α = 15 (ITI and the reference code). RADIANT: its own vote-threshold rule, margin 15 (the
#: LLaMA-7B runs) and the layer sweep over the 2 best layers by mean head loss (§2.5); otguard's OAS
#: covariance shrinkage stays on (a numerical fix, §3.1). SLIM: γ = 0.1, κ chosen by Stage 3.
#: mean shift is no published method: its row is otguard's documented default, strength 1.
PAPER_PARAMS: dict[str, dict[str, Any]] = {
    "iti": {"top_k": 48, "strength": 15.0},
    "mean-shift": {"strength": 1.0},
    "radiant": {"threshold_rule": "radiant", "margin": 15.0, "layer_sweep": 2},
    "slim": {"gamma": 0.1},
}


def _method_ids() -> tuple[str, ...]:
    from otguard.methods import METHOD_IDS

    return METHOD_IDS


def heads_from_share(share: float, n_layers: int, n_heads: int) -> int:
    """ITI's K for a share of all heads: ``max(1, round(share * L * H))``, rounded half up, at most L·H."""
    total = int(n_layers) * int(n_heads)
    return min(total, max(1, math.floor(float(share) * total + 0.5)))


def parse_variant(method: str) -> tuple[str, str | None]:
    """``"iti@paper"`` -> ``("iti", "paper")``; ``"iti"`` -> ``("iti", None)``; unknown: ConfigError."""
    base, sep, variant = str(method).partition("@")
    ids = _method_ids()
    if base not in ids:
        raise ConfigError(f"Unknown method {base!r} in {method!r}; choose one of {', '.join(ids)}.")
    if not sep:
        return base, None
    if variant != PAPER or base not in PAPER_PARAMS:
        with_paper = ", ".join(f"{m}@{PAPER}" for m in PAPER_PARAMS)
        raise ConfigError(f"Unknown method variant {method!r}; the variants are {with_paper}.")
    return base, variant


def default_grid(method_id: str, n_layers: int, n_heads: int) -> list[dict[str, Any]]:
    """The default grid of ``method_id`` for a model with ``n_layers`` x ``n_heads`` heads.

    Fresh dicts, at most 6 points, weak to strong. ``"none"`` gives ``[{}]``; ``"NAME@paper"`` the one
    published point. ITI's points name ``head_share`` (K follows the model); shares that round to the
    same K on this model are kept once.
    """
    base, variant = parse_variant(method_id)
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"default_grid needs {name} as an integer >= 1; got {value!r}.")
    if variant == PAPER:
        return [dict(PAPER_PARAMS[base])]
    if base == "iti":
        grid: list[dict[str, Any]] = []
        seen: set[int] = set()
        for share in ITI_HEAD_SHARES:
            k = heads_from_share(share, n_layers, n_heads)
            if k in seen:
                continue
            seen.add(k)
            grid += [{"head_share": share, "strength": a} for a in ITI_STRENGTHS]
        return grid
    if base == "mean-shift":
        return [{"strength": s} for s in MEAN_SHIFT_STRENGTHS]
    if base == "radiant":
        return [{"margin": m} for m in RADIANT_MARGINS]
    if base == "slim":
        return [{"kappa": k} for k in SLIM_KAPPAS]
    return [{}]
