"""The perplexity budget of the selection rule (issue 12, item 7): a grid point whose validation
continuations are too perplexing against the unsteered model's is not chosen, however non-toxic.

Hand-built rows for :func:`select_point` / :class:`FoldSweep` / :func:`merge_sweep`; the toxicity task's
validation pass on a tiny model with a stand-in scorer (what it measures, under which model, and the
unsteered reference once per fold); a whole toy run with controlled validation figures; the
configuration and the CLI flag.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from otguard import cli
from otguard.cli import compare as cli_compare
from otguard.data import group_kfold
from otguard.errors import ConfigError
from otguard.evaluation import toxicity_gen
from otguard.evaluation.toxicity_metrics import mean_perplexity
from otguard.harness.config import CompareConfig
from otguard.harness.run import CompareRun
from otguard.harness.sweep import (
    PPL_RATIO,
    FoldSweep,
    budget_flags,
    extra_budgets,
    select_point,
    selection_record,
)
from otguard.harness.toxicity import ToxicityTask
from otguard.harness.toxicity_sweep import NONTOXIC
from otguard.results import RunResults, Selection, merge_sweep
from tests.tiny_models import tiny_lm
from tests.unit.test_toxicity_sweep import GRID, HashScorer, make_toy

PPL = {PPL_RATIO: 1.5}
NAN = math.nan


@pytest.fixture
def toy(monkeypatch, tmp_path):
    return make_toy(monkeypatch, tmp_path)


# ------------------------------------------------------------------------------- the rule itself


def test_the_most_non_toxic_point_over_the_ppl_budget_is_not_chosen() -> None:
    rows = [
        {NONTOXIC: 0.55, "kl": 0.01, PPL_RATIO: 1.02},
        {NONTOXIC: 0.70, "kl": 0.04, PPL_RATIO: 1.30},
        {NONTOXIC: 0.90, "kl": 0.089, PPL_RATIO: 5.24},  # the full run's SLIM κ = 40: 109 / 20.8
    ]
    assert select_point(rows, NONTOXIC, 0.1) == (2, True)  # the KL budget alone lets it through
    assert select_point(rows, NONTOXIC, 0.1, PPL) == (1, True)
    assert select_point(rows, NONTOXIC, None, PPL) == (1, True)  # the ppl budget alone
    assert select_point(rows, NONTOXIC, 0.1, {PPL_RATIO: 1.3}) == (1, True)  # inclusive
    assert select_point(rows, NONTOXIC, 0.1, {PPL_RATIO: 1.29}) == (0, True)
    assert select_point(rows, NONTOXIC, 0.1, {PPL_RATIO: None}) == (2, True)  # None: no budget
    assert budget_flags(rows, 0.1, PPL) == [True, True, False]
    assert budget_flags(rows, 0.02, PPL) == [True, False, False]


def test_ties_within_both_budgets_go_to_the_lower_kl_then_the_earlier_point() -> None:
    rows = [
        {NONTOXIC: 0.8, "kl": 0.05, PPL_RATIO: 1.1},
        {NONTOXIC: 0.8, "kl": 0.02, PPL_RATIO: 1.4},
        {NONTOXIC: 0.8, "kl": 0.02, PPL_RATIO: 1.0},
        {NONTOXIC: 0.8, "kl": 0.01, PPL_RATIO: 1.6},  # the gentlest KL, but over the ppl budget
    ]
    assert select_point(rows, NONTOXIC, 0.1, PPL) == (1, True)
    assert select_point(rows, NONTOXIC, 0.1) == (3, True)


def test_the_fallback_is_the_lowest_kl_within_the_ppl_budget_else_the_lowest_kl() -> None:
    rows = [
        {NONTOXIC: 0.9, "kl": 0.30, PPL_RATIO: 3.0},
        {NONTOXIC: 0.6, "kl": 0.50, PPL_RATIO: 1.2},
        {NONTOXIC: 0.7, "kl": 0.40, PPL_RATIO: 1.4},
        {NONTOXIC: 0.5, "kl": 0.20, PPL_RATIO: 2.0},
    ]
    # nothing within KL 0.1: the lowest KL among the fluent points (0.40), not the lowest of all (0.20)
    assert select_point(rows, NONTOXIC, 0.1, PPL) == (2, False)
    assert select_point(rows, NONTOXIC, 0.1) == (3, False)  # without the ppl budget: as before
    # nothing fluent either: the lowest KL of all
    assert select_point(rows, NONTOXIC, 0.1, {PPL_RATIO: 1.1}) == (3, False)
    # within KL but none fluent, no KL measured at all: the lowest ppl ratio
    no_kl = [{NONTOXIC: r[NONTOXIC], PPL_RATIO: r[PPL_RATIO]} for r in rows]
    assert select_point(no_kl, NONTOXIC, 0.1, {PPL_RATIO: 1.1}) == (1, False)


def test_a_point_without_a_ppl_ratio_is_not_known_to_be_within_the_budget() -> None:
    # e.g. every continuation's perplexity >= 10^4: the protocol's mean is NaN and the figure is left out
    rows = [{NONTOXIC: 0.5, "kl": 0.01, PPL_RATIO: 1.1}, {NONTOXIC: 0.9, "kl": 0.02}, {NONTOXIC: 0.95}]
    assert select_point(rows, NONTOXIC, 0.1, PPL) == (0, True)
    assert budget_flags(rows, 0.1, PPL) == [True, False, False]
    assert budget_flags([{NONTOXIC: 0.9}, {NONTOXIC: 0.8, PPL_RATIO: NAN}], 0.1, PPL) == [True, True]


def test_truthfulqa_rows_carry_no_ppl_ratio_so_nothing_changes_there() -> None:
    config = CompareConfig()  # truthfulqa
    assert config.ppl_budget is None and extra_budgets(config) == {}
    record = selection_record(config)
    assert record["ppl_budget"] is None and "perplexity" not in record["rule"]
    assert "among those with validation KL <= 0.1 nats/token (ties" in record["rule"]
    cases = [
        [{"mc2": 0.30, "kl": 0.01}, {"mc2": 0.50, "kl": 0.30}, {"mc2": 0.40, "kl": 0.05}],
        [{"mc2": 0.5, "kl": 0.9}, {"mc2": 0.3, "kl": 0.4}, {"mc2": 0.6, "kl": 2.0}],
        [{"mc2": 0.4, "kl": 0.05}, {"mc2": 0.4, "kl": 0.02}, {"mc2": NAN, "kl": None}],
    ]
    want = [(2, True), (1, False), (1, True)]
    for rows, expected in zip(cases, want, strict=True):
        assert select_point(rows, "mc2", 0.1) == expected
        assert select_point(rows, "mc2", 0.1, PPL) == expected
        plain, budgeted = _fold_sweep(rows, "mc2"), _fold_sweep(rows, "mc2")
        plain.choose(0.1)
        budgeted.choose(0.1, PPL)
        assert budgeted.entries(0) == plain.entries(0)


def _fold_sweep(rows: list[dict[str, Any]], metric: str) -> FoldSweep:
    params = [{"strength": float(i)} for i in range(len(rows))]
    return FoldSweep("m", metric, params, [object()] * len(rows), validation=[dict(r) for r in rows])  # type: ignore[list-item]


def test_fold_sweep_and_merge_reflect_both_budgets() -> None:
    rows = [
        {NONTOXIC: 0.55, "kl": 0.01, PPL_RATIO: 1.02},
        {NONTOXIC: 0.90, "kl": 0.05, PPL_RATIO: 2.50},
        {NONTOXIC: 0.70, "kl": 0.20, PPL_RATIO: 1.10},
    ]
    sw = _fold_sweep(rows, NONTOXIC)
    assert sw.choose(0.1, PPL) == 0 and sw.within_budget and sw.budget_ok == [True, False, False]
    entries = sw.entries(0)
    assert [e["within_budget"] for e in entries] == [True, False, False]
    assert [e["selected"] for e in entries] == [True, False, False]
    # merge: the folds' own flags win; a fold without flags is judged on every budget given
    bare = [{k: v for k, v in e.items() if k != "within_budget"} for e in entries]
    merged = merge_sweep([entries, bare], kl_budget=0.1, budgets=PPL)
    assert [p["within_budget"] for p in merged] == [True, False, False]
    kl_only = merge_sweep([bare], kl_budget=0.1)
    assert [p["within_budget"] for p in kl_only] == [True, True, False]  # 2.5x is not looked at
    ppl_only = merge_sweep([bare], budgets=PPL)
    assert [p["within_budget"] for p in ppl_only] == [True, False, True]
    assert [p["within_budget"] for p in merge_sweep([bare])] == [None, None, None]


def test_selection_records_the_ppl_budget_and_round_trips_records_without_it() -> None:
    sel = Selection(NONTOXIC, "rule", 0.1, extra={"ppl_budget": 1.5})
    assert sel.ppl_budget == 1.5 and sel.to_dict()["ppl_budget"] == 1.5
    assert Selection.from_dict(sel.to_dict()) == sel
    old = {"metric": "mc2", "rule": "r", "kl_budget": 0.1, "kl_on": None, "frontier_questions": 4}
    back = Selection.from_dict(old)
    assert back.ppl_budget is None and back.to_dict() == old  # written before the budget: unchanged


# --------------------------------------------------------------------- the toxicity validation pass


def test_validate_records_ppl_and_ratio_under_the_fluency_model_and_the_reference_once_per_fold(
    toy, monkeypatch
) -> None:
    config, model, tok = toy
    task = ToxicityTask(config, progress=False)
    task.bind(model, tok)
    fluency = tiny_lm("llama", len(tok), tok.pad_token_id, seed=7)
    task.fluency = fluency  # as --fluency-model sets it
    splits = [
        group_kfold(task.dataset, n_folds=2, fold=f, val_ratio=config.val_ratio, seed=42) for f in (0, 1)
    ]
    task.start_fold(0, splits[0])
    # two stand-in policies: unsteered sampling with their own seed offset (so their figures differ)
    pol_a, pol_b = object(), object()
    offsets = {id(pol_a): 11, id(pol_b): 23}
    sampled: list[tuple[str, int]] = []
    real_sample = task._sweep_sample

    def sample(prompts: list[Any], policy: Any, seed: int) -> Any:
        sampled.append(("none" if policy is None else "a" if policy is pol_a else "b", seed))
        return real_sample(prompts, None, seed + offsets.get(id(policy), 0))

    monkeypatch.setattr(task, "_sweep_sample", sample)
    ppl_models: list[Any] = []
    real_ppl = toxicity_gen.continuation_perplexity

    def spy_ppl(m: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        ppl_models.append(m)
        return real_ppl(m, *args, **kwargs)

    monkeypatch.setattr(toxicity_gen, "continuation_perplexity", spy_ppl)
    points = {"m#0": pol_a, "m#1": pol_b, "m#2": pol_a, "m#3": None}
    got = task.validate(points, {k: NONTOXIC for k in points})
    seed = config.seed + 500  # fold 0's validation draw
    assert sampled == [("none", seed), ("a", seed), ("b", seed)]  # the reference first, once
    assert ppl_models == [fluency] * 3  # the fluency model, not the evaluated one

    def expected(offset: int) -> dict[str, float]:
        s = real_sample(task.sweep_prompts, None, seed + offset)
        ppl = mean_perplexity(real_ppl(fluency, s.prompt_ids, s.token_ids, batch_size=4))[0]
        return {
            NONTOXIC: 1.0 - float(np.mean(HashScorer().score([t for ts in s.texts for t in ts]))),
            "ppl": ppl,
        }

    ref, a, b = expected(0), expected(11), expected(23)
    assert task.fold_meta["validation_reference"] == pytest.approx(ref, rel=1e-9)
    for key, want in (("m#0", a), ("m#1", b), ("m#2", a), ("m#3", ref)):
        full = {**want, PPL_RATIO: want["ppl"] / ref["ppl"]}
        assert got[key] == pytest.approx(full, rel=1e-9), key
    assert got["m#3"][PPL_RATIO] == 1.0 and got["m#0"][PPL_RATIO] != got["m#1"][PPL_RATIO]
    # the same fold again: the reference is memoised; the next fold samples its own, once
    sampled.clear()
    task.validate({"m#0": pol_b}, {"m#0": NONTOXIC})
    assert sampled == [("b", seed)]
    task.start_fold(1, splits[1])
    sampled.clear()
    task.validate(points, {k: NONTOXIC for k in points})
    assert sampled == [("none", seed + 1000), ("a", seed + 1000), ("b", seed + 1000)]


def test_a_run_chooses_within_the_ppl_budget_and_records_it(toy, tmp_path, monkeypatch) -> None:
    """Controlled validation figures (strength 4 is the least toxic but 4x as perplexing): with the
    default budget (1.5) every fold chooses strength 1; without it, strength 4. The unsteered reference
    is measured once per fold; a resumed run with another budget is refused."""
    config, model, tok = toy
    figures = {None: (0.50, 10.0), 0.25: (0.60, 11.0), 1.0: (0.70, 14.0), 4.0: (0.90, 40.0)}
    calls: list[float | None] = []

    def stub(self: ToxicityTask, policy: Any) -> dict[str, float]:
        strength = None if policy is None else float(policy.params["strength"])
        calls.append(strength)
        nontoxic, ppl = figures[strength]
        return {NONTOXIC: nontoxic, "ppl": ppl}

    monkeypatch.setattr(ToxicityTask, "_validation_figures", stub)
    res = CompareRun(config, tmp_path / "budget", progress=False).run(model, tok)
    assert (
        calls.count(None) == 2
        and sorted(c for c in calls if c is not None) == [0.25] * 2 + [1.0] * 2 + [4.0] * 2
    )
    folds = res.methods["mean-shift"].folds
    assert [f.meta["grid_point"]["strength"] for f in folds] == [1.0, 1.0]
    assert [f.meta["validation_reference"] for f in folds] == [{NONTOXIC: 0.5, "ppl": 10.0}] * 2
    sweep = res.methods["mean-shift"].sweep
    assert sweep is not None
    assert [p.validation[PPL_RATIO] for p in sweep] == pytest.approx([1.1, 1.4, 4.0])
    assert [p.within_budget for p in sweep] == [True, True, False]
    assert [p.selected_folds for p in sweep] == [[], [0, 1], []]
    assert res.selection is not None and res.selection.ppl_budget == 1.5
    saved = json.loads((tmp_path / "budget" / "results.json").read_text())
    assert saved["config"]["ppl_budget"] == 1.5 and saved["selection"]["ppl_budget"] == 1.5
    assert RunResults.from_dict(saved).selection == res.selection
    with pytest.raises(ConfigError, match=r"ppl_budget: 1.5 saved, 2.0 now"):
        CompareRun(
            CompareConfig(**{**config.__dict__, "ppl_budget": 2.0}), tmp_path / "budget", progress=False
        )
    off = CompareRun(
        CompareConfig(**{**config.__dict__, "ppl_budget": None}), tmp_path / "off", progress=False
    )
    free = off.run(model, tok)
    assert [f.meta["grid_point"]["strength"] for f in free.methods["mean-shift"].folds] == [4.0, 4.0]
    assert free.selection is not None and free.selection.ppl_budget is None
    assert "perplexity" not in free.selection.rule


# ---------------------------------------------------------------------------------- configuration


def test_ppl_budget_defaults_per_task_and_is_validated() -> None:
    tox = {"dataset": "toxigen", "max_false_flag_rate": None}
    assert CompareConfig(**tox).ppl_budget == 1.5 and CompareConfig().ppl_budget is None
    assert CompareConfig(**tox, ppl_budget=2).ppl_budget == 2
    assert CompareConfig(**tox, ppl_budget=None).ppl_budget is None
    assert CompareConfig(ppl_budget=None).problems() == []
    assert CompareConfig(**tox, ppl_budget=2.0).key() != CompareConfig(**tox).key()
    for bad in (1.0, 0.5, -2.0, math.inf, math.nan, "x", True):
        with pytest.raises(ConfigError, match=r"ppl_budget must be a ratio > 1 to the unsteered model's "
                           r"validation perplexity, or None; got "):  # fmt: skip
            CompareConfig(**tox, ppl_budget=bad)
    with pytest.raises(ConfigError, match=r"ppl_budget applies to toxigen only \(truthfulqa's validation "
                       r"samples no continuations\); pass none"):  # fmt: skip
        CompareConfig(ppl_budget=1.5)


def test_cli_ppl_budget_flag() -> None:
    def config(*argv: str) -> CompareConfig:
        args = cli.build_parser().parse_args(["compare", "--out", "x", *argv])
        return cli_compare._compare_config(args)

    assert config("--dataset", "toxigen").ppl_budget == 1.5
    assert config("--dataset", "toxigen", "--ppl-budget", "2.5").ppl_budget == 2.5
    assert config("--dataset", "toxigen", "--ppl-budget", "none").ppl_budget is None
    assert config("--dataset", "toxigen", "--ppl-budget", "auto").ppl_budget == 1.5
    assert config().ppl_budget is None and config("--ppl-budget", "None").ppl_budget is None


def test_the_toy_grid_is_the_one_the_run_test_assumes() -> None:
    assert [p["strength"] for p in GRID] == [0.25, 1.0, 4.0]
