"""``otguard compare``: fit every method on every fold and evaluate them side by side.

For each fold (k-fold by group, validation split inside the training fold, everything seeded): fit
each method on the fold's activations (collected once per model and reused by all methods and
folds), measure the side effects of all policies in one pass over a seeded sample of natural text
(CE and KL with the policy on every position, the detector's flag rate and edited heads per flagged
position), then evaluate each policy on the fold's held-out items with the task (see
:mod:`otguard.harness.registry` for the tasks). Transfer questions, natural-text documents and
non-ToxiGen prompts are split across the folds like the questions (fold ``k`` uses items
``k::folds``), so every item is evaluated once per method, with the policy of its fold.

The unsteered model (``none``) is evaluated first in every fold, also when ``--methods`` leaves it
out: every other method is compared with its answers question by question (repair and harm rates,
paired bootstrap intervals of the difference, :mod:`otguard.harness.paired`). Those figures are
computed when ``results.json`` is assembled, from the per-item values saved with each (fold, method)
result, so a resumed run gets them too.

Each finished (fold, method) result is saved at once (:mod:`otguard.harness.resume`), and a rerun of
the same configuration into the same folder resumes from them. Writes ``results.json`` (through
:class:`otguard.results.RunResults`), the task's CSV (``answers.csv`` / ``continuations.csv``),
``report.md`` and ``report.html``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from otguard.errors import DataError
from otguard.harness.config import CompareConfig
from otguard.harness.registry import task_class
from otguard.harness.resume import PartialResult, PartialStore
from otguard.harness.summary import BASELINE, FLAGGED, HEADS, method_result, pick_examples
from otguard.harness.sweep import FoldSweep, extra_budgets
from otguard.harness.task import StageTimer, Task
from otguard.io import atomic_write_text, package_version, prepare_output_dir, write_marker
from otguard.results import DetectorRecord, FoldRecord, MethodResult, RunResults

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from otguard.activations import ActivationSet
    from otguard.data.splits import Split
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_KIND", "CompareRun", "fit_policies", "run_compare", "versions", "write_csv"]

#: The kind of output folder ``otguard compare`` writes (see :func:`otguard.io.prepare_output_dir`).
OUTPUT_KIND = "compare"
_DETECTOR_KEYS = ("fpr", "fnr", "accuracy", "f1", "threshold")


def versions() -> dict[str, str]:
    """Versions recorded in ``results.json``."""
    import transformers

    return {
        "otguard": package_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as CSV atomically (a reader never sees half a file)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def fit_policies(
    config: CompareConfig,
    methods: Sequence[str],
    acts: ActivationSet,
    split: Split,
    task: Task,
    progress: bool,
) -> dict[str, FoldSweep]:
    """Fit every grid point of ``methods`` on one fold (train rows for the probes, validation rows for
    threshold and layer); returns each method's :class:`~otguard.harness.sweep.FoldSweep` (a one-point
    grid for unswept methods). SLIM without a swept or fixed κ (``slim@paper``, or any SLIM when sweeps
    are off) gets its κ from ``task.stage3``; Stage-3 time is recorded on its own, not in the fit time."""
    from otguard.harness.sweep import fit_grid, split_variant

    fitted: dict[str, FoldSweep] = {}
    for name in methods:
        t0 = time.time()
        sweep = fit_grid(config, name, acts, split, progress, sweep=config.sweep and task.supports_sweep)
        fit_seconds = time.time() - t0
        base = split_variant(name)[0]
        fixed_kappa = "kappa" in config.method_params.get(name, {}) or any("kappa" in p for p in sweep.params)
        if base == "slim" and not fixed_kappa:
            t1 = time.time()
            sweep.policies = [task.stage3(p) for p in sweep.policies]
            for p in sweep.policies:
                p.meta["stage3_seconds"] = (time.time() - t1) / len(sweep.policies)
        for p in sweep.policies:
            p.meta["fit_seconds"] = fit_seconds / len(sweep.policies)
            if sweep.swept:
                p.meta["grid_fit_seconds"] = fit_seconds
        fitted[name] = sweep
    return fitted


#: The unsteered model's key in the frontier pass.
_REFERENCE = "none#reference"


def _reference(done: dict[tuple[int, str], PartialResult], config: CompareConfig) -> dict[str, Any]:
    """The unsteered model's frontier figures (the same test questions and documents as the grid
    points), averaged over the folds: the frontier plot's reference."""
    per_fold: dict[int, dict[str, Any]] = {}
    for (fold, _), part in sorted(done.items()):
        ref = part.record.meta.get("frontier_reference")
        if ref and fold not in per_fold:
            per_fold[fold] = ref
    out: dict[str, Any] = {}
    keys = {k for ref in per_fold.values() for k in ref}
    for key in sorted(keys):
        vals = [float(r[key]) for r in per_fold.values() if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    out["what"] = "the unsteered model on the frontier's test questions and documents (mean over folds)"
    return out


def _point_key(method: str, index: int) -> str:
    """The key of a method's grid point in the shared passes (MC, KL, generations)."""
    return f"{method}#{index}"


def _grid_points(swept: dict[str, FoldSweep]) -> dict[str, Policy | None]:
    """Every grid point of the swept methods by :func:`_point_key` (None: a policy that edits nothing)."""
    return {_point_key(n, i): (p if p.layers else None) for n, sw in swept.items()
            for i, p in enumerate(sw.policies)}  # fmt: skip


def _per_point(
    name: str, sweep: FoldSweep, figures: dict[str, dict[str, Any]], kls: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per grid point of ``name``: its figures and its KL (None where not measured)."""
    return [
        {**figures.get(_point_key(name, i), {}), "kl": kls.get(_point_key(name, i))}
        for i in range(len(sweep.policies))
    ]


def _fold_record(fold: int, policy: Policy, seconds: float, meta: dict[str, Any]) -> FoldRecord:
    det = policy.meta.get("detector_val")
    detector = None
    if det:
        per_layer = {k: det[k] for k in _DETECTOR_KEYS if k in det}
        detector = DetectorRecord.from_dict({"layer": policy.meta.get("layer"), "per_layer": per_layer})
    meta = dict(meta)
    if policy.meta.get("stage3_seconds") is not None:
        meta["stage3_seconds"] = policy.meta["stage3_seconds"]
    return FoldRecord(
        fold=fold,
        seconds=seconds,
        fit_seconds=policy.meta.get("fit_seconds"),
        policy={
            "layers": [e.layer for e in policy.layers],
            "threshold": policy.layers[0].threshold if policy.layers else None,
            "kappa": policy.kappa,
            "rule": policy.rule,
        },
        detector=detector,
        meta=dict(meta),
    )


class CompareRun:
    """One comparison run, prepared before the model is loaded and run once it is.

    ``CompareRun(config, out_dir)`` checks everything that can be checked without the model: the
    configuration, the output folder (a non-empty folder that is not a compare output is refused
    unless ``force``), saved results of another configuration (refused unless ``force``, which
    discards them), the task's data, and any external judge or scorer (contacted once).
    :meth:`run` then does the model work and writes the outputs. ``workers`` runs the folds in forked
    processes (:mod:`otguard.harness.parallel`); it changes how fast, not what is computed, so it is not
    part of the configuration a resumed run must match.
    """

    def __init__(
        self,
        config: CompareConfig,
        out_dir: str | os.PathLike[str],
        *,
        force: bool = False,
        progress: bool = True,
        option: str = "out_dir",
        workers: int | str = "auto",
    ) -> None:
        from otguard.harness.parallel import check_workers

        self.config = config.validate()
        self.progress = progress
        #: fold worker processes: ``"auto"`` or a number (:func:`otguard.harness.parallel.resolve_workers`)
        self.workers = check_workers(workers)
        self.workers_used = 1
        self.out = prepare_output_dir(out_dir, OUTPUT_KIND, force=force, option=option)
        self.store = PartialStore(
            self.out,
            config.to_dict(),
            force=force,
            force_hint="--force" if option.startswith("--") else "force=True",
        )
        self.timer = StageTimer()
        cls: type[Task] = task_class(config.dataset)
        self.task = cls(config, progress=progress, timer=self.timer)
        self.docs = self._documents()
        #: What each fold evaluates: ``none`` first (the paired reference), then the other methods.
        self.evaluated = (BASELINE, *(m for m in config.methods if m != BASELINE))
        wanted = {(f, m) for f in range(config.folds) for m in self.evaluated}
        if wanted - self.store.saved_pairs():
            self.task.preflight()

    def _documents(self) -> list[str]:
        """The test documents of CE/KL; the validation documents of the sweeps go to ``self.val_docs``."""
        from otguard.evaluation.drift import load_documents, sample_documents
        from otguard.harness.sweep import validation_documents

        cfg = self.config
        self.val_docs: list[str] = []
        if not cfg.drift_source:
            return []
        n_docs, n_val = int(cfg.drift_docs), int(cfg.sweep_docs)  # scaled with --limit by the configuration
        try:
            every = load_documents(cfg.drift_source)
            docs = sample_documents(every, n_docs, seed=cfg.seed)
        except DataError as exc:
            logger.warning("CE/KL skipped: %s", exc)
            return []
        if self.task.supports_sweep and (cfg.sweep or cfg.grids):
            self.val_docs = validation_documents(every, docs, n_val, cfg.seed)
        return docs

    def run(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> RunResults:
        """Fit and evaluate every (fold, method) not saved yet, then write ``results.json``, the CSV and
        the report; returns the results."""
        cfg, started = self.config, time.time()
        model_facts = {
            "name": str(getattr(model.config, "_name_or_path", "") or cfg.model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
        write_marker(self.out, OUTPUT_KIND)
        self.store.open(model_facts)
        done = self.store.load()
        if done:
            logger.info("Resuming: %d saved (fold, method) result(s) in %s", len(done), self.store.folder)
        todo = [(f, m) for f in range(cfg.folds) for m in self.evaluated if (f, m) not in done]
        if todo:
            try:
                self._compute(model, tokenizer, done)
            except BaseException:
                if done:
                    logger.error(
                        "%d finished (fold, method) result(s) are saved in %s; rerun the same command "
                        "to resume from them.",
                        len(done),
                        self.store.folder,
                    )
                raise
        results = self._assemble(
            done, model_facts, started, resumed=len(self.evaluated) * cfg.folds - len(todo)
        )
        results.write(self.out / "results.json")
        rows = [row for f in range(cfg.folds) for m in cfg.methods for row in done[(f, m)].rows]
        write_csv(self.out / self.task.csv_name, self.task.csv_fields, rows)
        from otguard.report import write_report

        write_report(self.out / "results.json", self.out, how_to_read=self.task.how_to_read(results))
        logger.info("Wrote %s (%.0f s)", self.out / "results.json", time.time() - started)
        return results

    def _compute(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        done: dict[tuple[int, str], PartialResult],
    ) -> None:
        """The fold loop over the missing (fold, method) results; each is saved as soon as it is done.
        Folds run in worker processes where :func:`~otguard.harness.parallel.resolve_workers` says so."""
        from otguard.activations import collect
        from otguard.harness.parallel import resolve_workers

        cfg, task = self.config, self.task
        task.bind(model, tokenizer)
        with self.timer("collect"):
            acts = collect(model, tokenizer, task.dataset, batch_size=cfg.batch_size, progress=self.progress)
        folds = [f for f in range(cfg.folds) if any((f, m) not in done for m in self.evaluated)]
        device = next(model.parameters()).device
        self.workers_used = resolve_workers(self.workers, len(folds), device)
        if self.workers_used > 1:
            self._compute_parallel(folds, acts, done)
            return
        for fold in folds:
            self._fold(fold, acts, done)

    def _compute_parallel(
        self, folds: list[int], acts: ActivationSet, done: dict[tuple[int, str], PartialResult]
    ) -> None:
        """The folds in forked worker processes (:mod:`otguard.harness.parallel`); their saved results
        are loaded into ``done`` and their stage timings added to this run's."""
        from otguard.harness.parallel import run_folds

        wanted = {(f, m) for f in folds for m in self.evaluated}

        def in_worker(fold: int) -> dict[str, float]:
            self.progress = self.task.progress = False  # the parent shows one bar for all workers
            before = dict(self.timer.seconds)
            self._fold(fold, acts, done)
            return {k: v - before.get(k, 0.0) for k, v in self.timer.seconds.items()}

        def saved() -> int:  # the pairs saved so far (files of this run's folder)
            return len(wanted & self.store.saved_pairs())

        try:
            seconds = run_folds(folds, self.workers_used, in_worker, done_count=saved, total=len(wanted),
                                progress=self.progress)  # fmt: skip
        finally:
            done.update(self.store.load())
        for key, value in seconds.items():
            self.timer.seconds[key] = self.timer.seconds.get(key, 0.0) + value

    def _fold(self, fold: int, acts: ActivationSet, done: dict[tuple[int, str], PartialResult]) -> None:
        """Fit, select, measure and evaluate the missing methods of one fold; each result is saved (and
        added to ``done``) as soon as it is complete."""
        from otguard.data import group_kfold
        from otguard.evaluation.drift import measure_drift_many

        cfg, task = self.config, self.task
        model, tokenizer = task.model, task.tokenizer
        pending = [m for m in self.evaluated if (fold, m) not in done]
        if not pending:
            return
        split = group_kfold(
            task.dataset, n_folds=cfg.folds, fold=fold, val_ratio=cfg.val_ratio, seed=cfg.split_seed
        )
        task.start_fold(fold, split)
        with self.timer("fit"):
            sweeps = fit_policies(cfg, pending, acts, split, task, self.progress)
        if isinstance(cfg.max_false_flag_rate, float | int):
            with self.timer("gate_calibration"):
                task.calibrate_gates(sweeps, float(cfg.max_false_flag_rate))
        self._select(fold, sweeps)
        policies = {name: sw.policy for name, sw in sweeps.items()}
        active = {name: (p if p.layers else None) for name, p in policies.items()}
        fold_docs = self.docs[fold :: cfg.folds]
        drift = {}
        if fold_docs:
            with self.timer("side_effects"):
                drift = measure_drift_many(
                    model,
                    tokenizer,
                    fold_docs,
                    active,
                    max_tokens=cfg.drift_tokens,
                    batch_size=8,
                    progress=self.progress,
                )
        task.prepare_test(active)
        self._frontier(fold, sweeps, fold_docs)
        for name in pending:
            t_method = time.time()
            policy = active[name]
            evaluation = task.evaluate(name, policy)
            metrics = evaluation.metrics
            meta = {**task.fold_meta, **evaluation.meta}
            sw = sweeps[name]
            if sw.swept:
                meta["sweep"] = sw.entries(fold)
                meta["grid_point"] = meta["sweep"][sw.selected]["params"]
                meta["frontier_reference"] = dict(sw.reference)
            if "gate_calibration" in policies[name].meta:
                meta["gate_calibration"] = policies[name].meta["gate_calibration"]
            if name in drift:
                d = drift[name]
                metrics["ce"], metrics["kl"] = d.ce, d.kl
                if policy is not None and d.flag_rate is not None:
                    metrics["flag_rate"] = d.flag_rate
                    metrics["edited_heads"] = d.edited_heads_per_flag or 0.0
                    # counts, so that the folds combine as a ratio of sums
                    if d.edited_heads is not None and d.flagged_positions is not None:
                        meta[HEADS], meta[FLAGGED] = float(d.edited_heads), float(d.flagged_positions)
            seconds = time.time() - t_method
            result = PartialResult(
                fold=fold,
                method=name,
                metrics={k: float(v) for k, v in metrics.items()},
                record=_fold_record(fold, policies[name], seconds, meta),
                rows=evaluation.rows,
                judge_name=task.judge_name,
                items=evaluation.items,
            )
            self.store.save(result)
            done[(fold, name)] = result
            shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            logger.info("fold %d %s: %s (%.0f s)", fold, name, shown, seconds)

    def _frontier(self, fold: int, sweeps: dict[str, FoldSweep], fold_docs: list[str]) -> None:
        """Test figures of every grid point of the swept methods, the chosen one included, measured alike
        (the task's frontier questions; KL on the first ``sweep_docs / folds`` test documents, at most
        ``sweep_tokens`` tokens each), for the frontier only: nothing here feeds a choice."""
        cfg = self.config
        swept = {name: sw for name, sw in sweeps.items() if sw.swept}
        if not swept:
            return
        points = _grid_points(swept)
        n_docs = max(1, int(cfg.sweep_docs) // cfg.folds)
        with self.timer("frontier"):
            # the unsteered model on the same questions: the frontier plot's reference line
            figures = self.task.frontier({**points, _REFERENCE: None})
            kls = self._grid_kls(fold_docs[:n_docs] if cfg.sweep_docs else [], points)
        for name, sw in swept.items():
            sw.test = _per_point(name, sw, figures, kls)
            sw.reference = {**figures.get(_REFERENCE, {}), "kl": 0.0}

    def _grid_kls(self, docs: list[str], points: dict[str, Policy | None]) -> dict[str, float]:
        """KL of every grid point on ``docs`` (``sweep_tokens`` each), one shared pass; {} without docs."""
        from otguard.evaluation.drift import measure_drift_many

        if not docs:
            return {}
        drift = measure_drift_many(self.task.model, self.task.tokenizer, docs, points,
                                   max_tokens=self.config.sweep_tokens, batch_size=8,
                                   progress=self.progress)  # fmt: skip
        return {k: d.kl for k, d in drift.items()}

    def _select(self, fold: int, sweeps: dict[str, FoldSweep]) -> None:
        """Validation figures of every grid point (the task's score on the training fold's validation
        questions, KL on the validation documents) and the choice of each swept method
        (:func:`otguard.harness.sweep.select_point`)."""
        swept = {name: sw for name, sw in sweeps.items() if sw.swept}
        if not swept:
            return
        cfg, task = self.config, self.task
        points = _grid_points(swept)
        metrics = {key: swept[key.rpartition("#")[0]].metric for key in points}
        with self.timer("sweep_validation"):
            scores = task.validate(points, metrics)
            kls = self._grid_kls(self.val_docs[fold :: cfg.folds], points)
        for name, sw in swept.items():
            sw.validation = _per_point(name, sw, scores, kls)
            # RADIANT@paper keeps its layer by validation True×Info alone, as published (no budgets).
            paper = name.endswith("@paper")
            sw.choose(cfg.kl_budget if kls and not paper else None, None if paper else extra_budgets(cfg))
            logger.info(
                "fold %d %s: chose %s of %d grid points (validation %s %.4f, KL %s, ppl ratio %s%s)",
                fold, name, sw.params[sw.selected], len(sw.params), sw.metric,
                float(sw.validation[sw.selected].get(sw.metric) or float("nan")),
                sw.validation[sw.selected].get("kl"), sw.validation[sw.selected].get("ppl_ratio"),
                "" if sw.within_budget else ", none within the budgets",
            )  # fmt: skip

    def _assemble(
        self,
        done: dict[tuple[int, str], PartialResult],
        model_facts: dict[str, str],
        started: float,
        resumed: int,
    ) -> RunResults:
        """``results.json`` from the saved results (the same path for fresh and resumed runs)."""
        from otguard.harness.sweep import selection_record
        from otguard.results import Selection, SweepPoint, merge_sweep

        cfg = self.config
        methods: dict[str, MethodResult] = {}
        examples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for name in cfg.methods:
            parts = [done[(fold, name)] for fold in range(cfg.folds)]
            bases = [done[(fold, BASELINE)] for fold in range(cfg.folds)]
            methods[name] = method_result(
                self.task, name, parts, bases, bootstrap=cfg.bootstrap, seed=cfg.seed
            )
            per_fold = [p.record.meta.get("sweep") or [] for p in parts]
            if all(per_fold):
                merged = merge_sweep(per_fold, kl_budget=cfg.kl_budget)
                methods[name].sweep = [SweepPoint.from_dict(d) for d in merged]
            if name != BASELINE:
                examples[name] = pick_examples(self.task, parts, bases, seed=cfg.seed)
        last = done[(cfg.folds - 1, cfg.methods[-1])]
        config = {
            **cfg.to_dict(),
            "model": model_facts["name"],
            "judge": last.judge_name or self.task.judge_name,
            "dtype": model_facts["dtype"],
            "threads": torch.get_num_threads(),
            # folds in worker processes of one thread each (1: this process, `threads` threads)
            "workers": self.workers_used,
            "methods": list(cfg.methods),
        }
        if resumed:
            config["resumed_results"] = resumed
        catalogue = {
            k: spec
            for k, spec in self.task.metric_specs().items()
            if any(k in m.metrics for m in methods.values())
        }
        return RunResults(
            config=config,
            methods=methods,
            metrics=catalogue,
            task=self.task.name,
            started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            seconds=time.time() - started,
            timings=dict(self.timer.seconds),
            versions=versions(),
            judges=self.task.judges(),
            selection=(
                Selection.from_dict({**selection_record(cfg), "reference": _reference(done, cfg)})
                if any(m.sweep for m in methods.values())
                else None
            ),
            examples={m: e for m, e in examples.items() if any(e.values())},
        )


def run_compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: CompareConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    force: bool = False,
    workers: int | str = "auto",
) -> RunResults:
    """Run the comparison and write its outputs into ``out_dir``; returns the results.

    The same as ``CompareRun(config, out_dir, force=force, workers=workers).run(model, tokenizer)``; use
    :class:`CompareRun` to check everything before loading the model.
    """
    return CompareRun(config, out_dir, force=force, progress=progress, workers=workers).run(model, tokenizer)
