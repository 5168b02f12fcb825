"""TruthfulQA's side of the sweeps: validation scores, shared MC passes, frontier figures, gate calibration.

Mixed into :class:`otguard.harness.truthfulqa.TruthfulQATask`:

- :meth:`validate` scores grid points on a seeded sample of the training fold's validation questions
  (``sweep_questions``; never a test question): MC2 (all the points in one shared pass,
  :func:`otguard.evaluation.truthfulqa_mc.score_mc_many`) or the judged True / True×Info of greedy
  answers;
- :meth:`prepare_test` runs the test MC of every method's policy of the fold in one shared pass;
  :meth:`evaluate` reads it;
- :meth:`frontier` scores every grid point on a seeded sample of the fold's test questions
  (``frontier_questions``): MC1/MC2 in one shared pass, and the judged True/Info of greedy answers;
- :meth:`calibrate_gates` sets the vote threshold of every gated policy on validation reference answers
  (:func:`otguard.gate_calibration.calibrate_gate`); policies that share their probes and layer share
  one calibration (the votes of a layer do not depend on the edits made at that layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otguard.data.qa import QAItem
    from otguard.evaluation.truthfulqa_mc import MCResult
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

__all__ = ["TruthfulQASweeps", "policy_key", "probe_key", "with_thresholds"]


def probe_key(policy: Policy) -> str:
    """A hash of what a gate's votes depend on: the hooked layers, their probes and head masks."""
    h = hashlib.sha256()
    for e in policy.layers:
        h.update(str(e.layer).encode())
        for t in (e.probe_weight, e.probe_bias, e.head_mask):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def policy_key(policy: Policy | None) -> str:
    """What the harness memoises a policy's outputs by: its fingerprint, ``"none"`` for the plain model."""
    return "none" if policy is None else policy.fingerprint()


def _answer_scores(items: list[QAItem], result: MCResult) -> dict[str, dict[str, float]]:
    """``{question: {answer: score}}`` back from an :class:`MCResult` (the inverse of ``from_scores``)."""
    out: dict[str, dict[str, float]] = {}
    for item, s1, s2 in zip(items, result.mc1_scores, result.mc2_scores, strict=True):
        scores = {a: v for (a, _), v in zip(item.mc1_targets, s1, strict=True)}
        scores.update({a: v for (a, _), v in zip(item.mc2_targets, s2, strict=True)})
        out[item.question] = scores
    return out


def with_thresholds(policy: Policy, thresholds: dict[int, int | None], record: dict[str, Any]) -> Policy:
    """A copy of ``policy`` whose gated layers use ``thresholds`` (layer -> τ), with the calibration
    record in its metadata."""
    layers = [
        e if e.threshold is None else dataclasses.replace(e, threshold=thresholds.get(e.layer, e.threshold))
        for e in policy.layers
    ]
    return dataclasses.replace(policy, layers=layers, meta={**policy.meta, "gate_calibration": record})


class TruthfulQASweeps:
    """Sweep support of the TruthfulQA task (see the module docstring)."""

    supports_sweep = True
    calibrates_gates = True
    # set by TruthfulQATask
    config: Any
    model: Any
    tokenizer: Any
    judge: Any
    progress: bool
    timer: Any
    test_items: list[QAItem]
    val_all: list[QAItem]
    sweep_items: list[QAItem]
    frontier_items: list[QAItem]
    _mc_cache: dict[str, MCResult]
    _mc_memo: dict[str, dict[str, dict[str, float]]]  # policy_key -> question -> {answer: score}
    fold: int

    def _answers(self, items: list[QAItem], policy: Policy | None) -> list[str]:  # pragma: no cover
        raise NotImplementedError

    def _score_many(self, items: list[QAItem], policies: dict[str, Policy | None]) -> dict[str, MCResult]:
        """MC results of each policy on ``items`` keyed by :func:`policy_key`. What an earlier pass of the
        run scored (the same policy on the same question: the test pass, then the frontier) is read from
        the memo; the rest runs in one shared pass (``truthfulqa_mc.score_mc_many``)."""
        from otguard.evaluation.truthfulqa_mc import MCResult, score_mc_many

        distinct = {policy_key(p): p for p in policies.values()}
        if not distinct or not items:
            return {}
        memo = self._mc_memo
        todo = {k: p for k, p in distinct.items()
                if any(it.question not in memo.get(k, {}) for it in items)}  # fmt: skip
        if todo:
            out = score_mc_many(self.model, self.tokenizer, items, todo, batch_size=self.config.mc_batch_size,
                                progress=self.progress)  # fmt: skip
            for k, result in out.items():
                memo.setdefault(k, {}).update(_answer_scores(items, result))
        return {k: MCResult.from_scores(items, [memo[k][it.question] for it in items],
                                        {"memoised": k not in todo}) for k in distinct}  # fmt: skip

    def _judged(self, items: list[QAItem], policy: Policy | None) -> dict[str, float]:
        answers = self._answers(items, policy)
        s = self.judge.judge(items, answers).summary()
        out = {"true": float(s["true"])}
        if s.get("info") is not None:
            out["info"] = float(s["info"])
            out["true_x_info"] = float(s["true_x_info_product"])
        return out

    def validate(
        self, points: dict[str, Policy | None], metrics: dict[str, str]
    ) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {k: {} for k in points}
        items = self.sweep_items
        by_mc = {k: p for k, p in points.items() if metrics.get(k) == "mc2"}
        mcs = self._score_many(items, by_mc)
        for k, p in by_mc.items():
            if policy_key(p) in mcs:
                out[k]["mc2"] = float(mcs[policy_key(p)].mc2)
        for k, p in points.items():
            if metrics.get(k) in ("true", "true_x_info") and items:
                out[k].update(self._judged(items, p))
        return out

    def prepare_test(self, active: dict[str, Policy | None]) -> None:
        with self.timer("mc"):
            self._mc_cache = self._score_many(self.test_items, active)

    def frontier(self, points: dict[str, Policy | None]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {k: {} for k in points}
        if not self.frontier_items:
            return out
        mcs = self._score_many(self.frontier_items, points)
        for key, policy in points.items():
            mc = mcs[policy_key(policy)]
            out[key].update({"mc1": float(mc.mc1), "mc2": float(mc.mc2)})
            out[key].update({k: v for k, v in self._judged(self.frontier_items, policy).items()
                             if k in ("true", "info")})  # fmt: skip
        return out

    def calibrate_gates(self, sweeps: dict[str, Any], max_false_flag_rate: float) -> None:
        from otguard.gate_calibration import calibrate_gate
        from otguard.harness.truthfulqa import gate_sample

        items = gate_sample(self.val_all, self.config.gate_questions, self.config.gate_answers,
                            seed=self.config.seed + 1000 + self.fold)  # fmt: skip
        if not items:
            logger.warning("No validation questions to calibrate the gates on; thresholds left as fitted.")
            return
        done: dict[str, tuple[dict[int, int | None], dict[str, Any]]] = {}
        for name, sweep in sweeps.items():
            if name.endswith("@paper"):  # the published rows keep their published threshold rule
                continue
            for i, policy in enumerate(sweep.policies):
                if not any(e.threshold is not None for e in policy.layers):
                    continue
                # One-layer policies with the same probes share a calibration (a layer's votes do not
                # depend on its own edits); a multi-layer policy's later votes do, so it gets its own.
                key = probe_key(policy) if len(policy.layers) == 1 else f"policy-{id(policy)}"
                if key not in done:
                    calibrated, record = calibrate_gate(policy, self.model, self.tokenizer, items,
                                                        max_false_flag_rate=max_false_flag_rate,
                                                        batch_size=self.config.batch_size)  # fmt: skip
                    rec = record.to_dict()
                    done[key] = ({e.layer: e.threshold for e in calibrated.layers}, rec)
                thresholds, rec = done[key]
                sweep.policies[i] = with_thresholds(policy, thresholds, rec)
