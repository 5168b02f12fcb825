"""Sweeps: every method at its best validated strength, and the frontier of all the strengths tried.

A method's strength decides where it sits between "does nothing" and "breaks the model", so a table
of methods at fixed defaults says little about which one is better. For every swept method and fold
``otguard compare`` therefore

1. fits one policy per grid point (:func:`method_grid`; ``Method.fit_grid`` shares the expensive part,
   e.g. the probes, between the points);
2. measures each point on the training fold's **validation** questions (MC2, or the judged True×Info
   for RADIANT's published layer sweep) and its KL on **validation documents**, disjoint from the test
   documents (:func:`validation_documents`);
3. keeps the point with the best validation score among those within every budget: validation KL
   within ``kl_budget`` and, where the task measures it (toxicity), the perplexity of the point's
   validation continuations within ``ppl_budget`` times the unsteered model's (``ppl_ratio``; ties:
   the lower KL, then grid order); when no point is within the budgets, the gentlest, marked
   ``within_budget: false`` (:func:`select_point`);
4. evaluates the kept point fully on the test questions (the method's row), and every point of the grid,
   the kept one included, alike on a seeded sample of test questions (MC1/MC2 and judged answers) and
   on a few test documents (KL, ``sweep_tokens`` each), for the frontier (``results.json`` ``sweep``;
   the report's trade-off plot and Pareto table). The samples bound the cost of a point.

The same rule selects every method, baselines included; nothing about the selection reads the test
split. ``NAME@paper`` rows run a method with its published settings, unswept, so both are visible.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from otguard.errors import ConfigError

if TYPE_CHECKING:
    from otguard.activations import ActivationSet
    from otguard.data.splits import Split
    from otguard.harness.config import CompareConfig
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

__all__ = [
    "PAPER",
    "PPL_RATIO",
    "SELECTION_METRICS",
    "FoldSweep",
    "expand_grid",
    "method_grid",
    "parse_grid_option",
    "parse_param_option",
    "budget_flags",
    "budget_text",
    "extra_budgets",
    "select_point",
    "selection_record",
    "split_variant",
    "task_selection_metrics",
    "validation_documents",
]

PAPER = "paper"
#: TruthfulQA's validation scores (the first is its default).
TRUTHFULQA_SELECTION = ("mc2", "true", "true_x_info")
#: Validation scores the rule can maximise (all "higher is better"); ``nontoxic`` is the toxicity task's
#: (1 − mean toxicity of sampled continuations, :mod:`otguard.harness.toxicity_sweep`).
SELECTION_METRICS = (*TRUTHFULQA_SELECTION, "nontoxic")


def task_selection_metrics(dataset: str) -> tuple[str, ...]:
    """The validation scores ``dataset``'s task computes (its ``selection_metrics``; TruthfulQA's for a
    task without one); the first is ``select_by="auto"``'s choice."""
    from otguard.harness.registry import TASKS, task_class

    if dataset not in TASKS:
        return TRUTHFULQA_SELECTION
    return tuple(getattr(task_class(dataset), "selection_metrics", TRUTHFULQA_SELECTION))


_TIE = 1e-12
#: The validation figure of the perplexity budget: the perplexity of a grid point's validation
#: continuations over the unsteered model's on the same prompts and seed (toxicity task only).
PPL_RATIO = "ppl_ratio"


def extra_budgets(config: CompareConfig) -> dict[str, float]:
    """The run's budgets besides KL, by validation figure: ``{"ppl_ratio": ppl_budget}`` when it is set
    (the toxicity task; TruthfulQA's rows carry no ``ppl_ratio``, so none applies there)."""
    budget = config.ppl_budget
    return {PPL_RATIO: float(budget)} if isinstance(budget, int | float) else {}


def split_variant(method_id: str) -> tuple[str, str | None]:
    """``"iti@paper"`` -> ``("iti", "paper")``; ``"iti"`` -> ``("iti", None)``."""
    base, sep, variant = method_id.partition("@")
    return base, (variant if sep else None)


def expand_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``{param: values}`` as a list of points, in axis order."""
    if not axes:
        return [{}]
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(axes[n] for n in names))]


def _value(text: str) -> Any:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() in ("none", "null"):
        return None
    return text


def parse_grid_option(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``--grid METHOD:PARAM=V1,V2[:PARAM=V1,V2...]`` -> (method, grid points: the product of the axes).

    ``--grid iti:head_share=0.02,0.05:strength=2,5`` gives four points; ``--grid radiant:margin=5``
    pins one value (a one-point grid is not swept).
    """
    method, sep, rest = text.partition(":")
    if not sep or not method.strip() or not rest.strip():
        raise ConfigError(
            f"--grid {text!r}: use METHOD:PARAM=V1,V2[:PARAM=...], "
            "e.g. --grid iti:head_share=0.02,0.05:strength=2,5."
        )
    axes: dict[str, list[Any]] = {}
    for part in rest.split(":"):
        name, eq, values = part.partition("=")
        if not eq or not name.strip() or not values.strip():
            raise ConfigError(f"--grid {text!r}: {part!r} is not PARAM=V1,V2.")
        axes[name.strip()] = [_value(v) for v in values.split(",") if v.strip()]
    return method.strip(), expand_grid(axes)


def parse_param_option(text: str) -> tuple[str, str, Any]:
    """``--param METHOD:PARAM=VALUE`` -> (method, param, value); the value is parsed like a grid value."""
    method, sep, rest = text.partition(":")
    name, eq, value = rest.partition("=")
    if not sep or not eq or not method.strip() or not name.strip() or not value.strip():
        raise ConfigError(f"--param {text!r}: use METHOD:PARAM=VALUE, e.g. --param radiant:fnr_weight=2.5.")
    return method.strip(), name.strip(), _value(value)


def method_grid(
    config: CompareConfig, method_id: str, n_layers: int, n_heads: int, *, sweep: bool | None = None
) -> list[dict[str, Any]]:
    """The grid points of ``method_id`` in this run (a single ``{}`` point means: not swept).

    ``NAME@paper``: one point, the published settings. Otherwise ``config.grids[method_id]`` when given,
    else the method's default grid (:func:`otguard.methods.grids.default_grid`), unless sweeps are off
    (``sweep``: overrides ``config.sweep``, e.g. for a task without sweeps).
    Parameters fixed in ``config.method_params`` override every point (a point that then repeats an
    earlier one is dropped).
    """
    from otguard.methods.grids import PAPER_PARAMS, default_grid

    base, variant = split_variant(method_id)
    if variant == PAPER:
        grid = [dict(PAPER_PARAMS.get(base, {}))]
    elif method_id in config.grids:
        grid = [dict(p) for p in config.grids[method_id]]
    elif config.sweep if sweep is None else sweep:
        grid = default_grid(base, n_layers, n_heads)
    else:
        grid = [{}]
    fixed = config.method_params.get(method_id, {})
    out: list[dict[str, Any]] = []
    for point in grid:
        merged = {**point, **fixed}
        if merged not in out:
            out.append(merged)
    return out or [{}]


def validation_documents(all_docs: Sequence[str], test_docs: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` documents for the validation KL, seeded, none of them among ``test_docs``."""
    from otguard.evaluation.drift import sample_documents

    if n <= 0:
        return []
    taken = set(test_docs)
    rest = [d for d in all_docs if d not in taken]
    return sample_documents(rest, n, seed=seed + 7919) if rest else []


def _num(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def budget_flags(
    rows: Sequence[Mapping[str, Any]],
    kl_budget: float | None,
    budgets: Mapping[str, float | None] | None = None,
) -> list[bool]:
    """Per row, whether it is within every budget: ``kl <= kl_budget`` and ``row[key] <= limit`` for each
    ``key: limit`` of ``budgets`` (inclusive). A budget is off when its limit is None or no row carries a
    finite value of its figure (TruthfulQA's rows carry no ``ppl_ratio``); otherwise a row without a
    finite value is not within it (not known to be; e.g. a perplexity the protocol could not average)."""
    limits = {"kl": kl_budget, **(budgets or {})}
    flags = [True] * len(rows)
    for key, limit in limits.items():
        values = [_num(r.get(key)) for r in rows]
        if limit is None or not any(math.isfinite(v) for v in values):
            continue
        for i, v in enumerate(values):
            flags[i] = flags[i] and math.isfinite(v) and v <= float(limit) + _TIE
    return flags


def select_point(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    kl_budget: float | None,
    budgets: Mapping[str, float | None] | None = None,
) -> tuple[int, bool]:
    """Index of the chosen grid point and whether it is within the budgets.

    ``rows[i]`` holds the point's validation ``metric``, ``kl`` and the figures that ``budgets`` names
    (e.g. ``{"ppl_ratio": 1.5}``; None / NaN: not measured). Among the points within every budget
    (:func:`budget_flags`), the highest ``metric`` wins; ties go to the lower KL, then to the earlier
    point. When no point is within the budgets, the gentlest is returned with ``False``: the lowest KL
    among the points within the other budgets (``budgets``: fluency is kept where it can be), else the
    lowest KL of all; without any KL, the lowest values of ``budgets``' figures, in their order.
    """
    if not rows:
        raise ValueError("select_point needs at least one grid point.")
    kls = [_num(r.get("kl")) for r in rows]
    scores = [_num(r.get(metric)) for r in rows]
    allowed = [i for i, ok in enumerate(budget_flags(rows, kl_budget, budgets)) if ok]
    if not allowed:
        return _gentlest(rows, kls, budgets or {}), False
    scored = [i for i in allowed if math.isfinite(scores[i])]
    if not scored:  # nothing measured: the gentlest allowed point
        return min(allowed, key=lambda i: (kls[i] if math.isfinite(kls[i]) else 0.0, i)), True
    top = max(scores[i] for i in scored)
    tied = [i for i in scored if scores[i] >= top - _TIE]
    return min(tied, key=lambda i: (kls[i] if math.isfinite(kls[i]) else 0.0, i)), True


def _gentlest(
    rows: Sequence[Mapping[str, Any]], kls: list[float], budgets: Mapping[str, float | None]
) -> int:
    """The fallback of :func:`select_point` when no point is within the budgets."""
    within = [i for i, ok in enumerate(budget_flags(rows, None, budgets)) if ok]
    for pool in (within, range(len(rows))):
        measured = [i for i in pool if math.isfinite(kls[i])]
        if measured:
            return min(measured, key=lambda i: (kls[i], i))

    def key(i: int) -> tuple[float, ...]:
        values = [_num(rows[i].get(k)) for k in budgets]
        return (*[v if math.isfinite(v) else math.inf for v in values], float(i))

    return min(range(len(rows)), key=key)


@dataclass
class FoldSweep:
    """One method's grid on one fold: the fitted policies, their validation and test figures, the choice."""

    method: str
    metric: str
    params: list[dict[str, Any]]
    policies: list[Policy]
    validation: list[dict[str, float | None]] = field(default_factory=list)
    test: list[dict[str, float | None]] = field(default_factory=list)
    selected: int = 0
    within_budget: bool = True
    budget_ok: list[bool] = field(default_factory=list)
    reference: dict[str, float | None] = field(default_factory=dict)  # none on the frontier's questions

    @property
    def swept(self) -> bool:
        return len(self.policies) > 1

    @property
    def policy(self) -> Policy:
        return self.policies[self.selected]

    def choose(self, kl_budget: float | None, budgets: Mapping[str, float | None] | None = None) -> int:
        """Apply :func:`select_point` to the validation figures (KL and ``budgets``, e.g.
        ``{"ppl_ratio": 1.5}``); returns the chosen index. ``budget_ok``: each point within every budget."""
        self.selected, self.within_budget = select_point(self.validation, self.metric, kl_budget, budgets)
        self.budget_ok = budget_flags(self.validation, kl_budget, budgets)
        return self.selected

    def entries(self, fold: int) -> list[dict[str, Any]]:
        """The fold's sweep entries as they are saved per (fold, method), before folds are merged."""
        return [
            {
                "params": _jsonable(p),
                "fold": fold,
                "validation": dict(self.validation[i]) if i < len(self.validation) else {},
                "test": dict(self.test[i]) if i < len(self.test) else {},
                "selected": i == self.selected,
                "within_budget": self.budget_ok[i] if i < len(self.budget_ok) else True,
            }
            for i, p in enumerate(self.params)
        ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def fit_grid(
    config: CompareConfig,
    method_id: str,
    acts: ActivationSet,
    split: Split,
    progress: bool,
    *,
    sweep: bool | None = None,
) -> FoldSweep:
    """Fit every grid point of ``method_id`` on one fold (probes on the training rows, thresholds and
    layer on the validation rows) and return the fold's :class:`FoldSweep` (nothing selected yet)."""
    from otguard.methods import get_method

    base, variant = split_variant(method_id)
    method = get_method(base)
    valid = method.get_params()
    common: dict[str, Any] = {"seed": config.seed} if "seed" in valid else {}
    if "progress" in valid:
        common["progress"] = progress
    method.set_params(**common)
    grid = method_grid(config, method_id, acts.n_layers, acts.n_heads, sweep=sweep)
    unknown = sorted({k for p in grid for k in p} - set(valid))
    if unknown:
        raise ConfigError(
            f"The grid of {method_id!r} names parameter(s) {', '.join(unknown)} that {base!r} does not take "
            f"(it takes: {', '.join(sorted(valid))})."
        )
    metric = config.select_by
    if base == "radiant" and variant == PAPER and int(grid[0].get("layer_sweep", 1) or 1) > 1:
        # RADIANT as published (docs/method.md §2.5): the best layers by mean head loss are the
        # candidates, each a full intervention, kept by validation True×Info of generated answers.
        first = method.fit_grid(acts, split.train, split.val, grid)[0]
        layers = list(first.meta.get("candidate_layers") or [])
        if len(layers) > 1:
            grid = [{**grid[0], "layers": [int(layer)], "layer_sweep": 1} for layer in layers]
            # the task's generation-based score (TruthfulQA: True×Info; toxicity: non-toxicity)
            metric = "true_x_info" if metric in TRUTHFULQA_SELECTION else metric
        else:
            return FoldSweep(method_id, metric, grid, [first])
    policies = method.fit_grid(acts, split.train, split.val, grid)
    return FoldSweep(method_id, metric, grid, list(policies))


def budget_text(config: CompareConfig) -> str:
    """The budgets of the rule as its sentence states them ("with validation KL <= 0.1 nats/token ...")."""
    parts = []
    if config.kl_budget is not None:
        parts.append(f"validation KL <= {config.kl_budget:g} nats/token")
    ppl = extra_budgets(config).get(PPL_RATIO)
    if ppl is not None:
        parts.append(
            f"a perplexity of their validation continuations (under the fluency model) <= {ppl:g}x the "
            "unsteered model's on the same prompts and seed"
        )
    return "with " + " and ".join(parts) if parts else "of the grid"


def selection_record(config: CompareConfig) -> dict[str, Any]:
    """The selection rule as ``results.json`` records it (run level)."""
    record = {
        "metric": config.select_by,
        "kl_budget": config.kl_budget,
        "ppl_budget": config.ppl_budget,
        "kl_on": "validation documents (disjoint from the test documents)",
        "validation_questions": (
            f"a seeded sample of up to {config.sweep_questions} validation questions of the training fold"
            if config.sweep_questions
            else "every validation question of the training fold"
        ),
        "validation_documents": config.sweep_docs,
        "kl_tokens": config.sweep_tokens,
        "frontier_questions": config.frontier_questions,
        "frontier": (
            "every grid point, the chosen one included, on a seeded sample of up to "
            f"{config.frontier_questions} test questions per fold (MC and judged answers) and KL on "
            f"{max(1, int(config.sweep_docs) // config.folds)} test documents per fold "
            f"({config.sweep_tokens} tokens each); the method rows use every test question and document"
        ),
        "rule": (
            f"per fold, the grid point with the highest validation {config.select_by.upper()} among those "
            + budget_text(config)
            + " (ties: lower KL, then grid order); if none is within the budget, the lowest-KL point. "
            "RADIANT@paper keeps its layer by validation True×Info of generated answers (its own rule)."
        ),
    }
    # a task whose validation items are not questions describes them itself (the toxicity task)
    from otguard.harness.registry import TASKS, task_class

    texts = getattr(task_class(config.dataset), "selection_texts", None) if config.dataset in TASKS else None
    if texts is not None:
        record.update(texts(config))
    return record
