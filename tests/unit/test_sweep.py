"""The selection rule and the sweep options, on hand-made inputs (harness/sweep.py)."""

from __future__ import annotations

import math

import pytest

from otguard.errors import ConfigError
from otguard.harness.sweep import (
    expand_grid,
    parse_grid_option,
    parse_param_option,
    select_point,
    split_variant,
    validation_documents,
)

NAN = math.nan


def test_the_best_validation_score_within_the_budget_wins() -> None:
    rows = [{"mc2": 0.30, "kl": 0.01}, {"mc2": 0.50, "kl": 0.30}, {"mc2": 0.40, "kl": 0.05}]
    assert select_point(rows, "mc2", 0.1) == (2, True)  # 0.50 is over the budget
    assert select_point(rows, "mc2", None) == (1, True)  # no budget: the best score
    assert select_point(rows, "mc2", 0.30) == (1, True)  # the budget is inclusive


def test_ties_go_to_the_lower_kl_then_to_the_earlier_point() -> None:
    rows = [{"mc2": 0.4, "kl": 0.05}, {"mc2": 0.4, "kl": 0.02}, {"mc2": 0.4, "kl": 0.02}]
    assert select_point(rows, "mc2", 0.1) == (1, True)


def test_nothing_within_the_budget_gives_the_gentlest_point_marked_outside() -> None:
    rows = [{"mc2": 0.5, "kl": 0.9}, {"mc2": 0.3, "kl": 0.4}, {"mc2": 0.6, "kl": 2.0}]
    assert select_point(rows, "mc2", 0.1) == (1, False)


def test_unmeasured_values_are_skipped_and_no_kl_means_no_budget() -> None:
    rows = [{"mc2": NAN, "kl": 0.01}, {"mc2": 0.2, "kl": None}, {"mc2": 0.1, "kl": 0.02}]
    assert select_point(rows, "mc2", 0.1) == (2, True)  # point 1 has no KL: not known to be within
    assert select_point([{"true": 0.1}, {"true": 0.3}], "true", 0.1) == (1, True)
    with pytest.raises(ValueError):
        select_point([], "mc2", 0.1)


def test_grid_options_are_the_product_of_their_axes() -> None:
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert expand_grid({}) == [{}]
    name, points = parse_grid_option("iti:head_share=0.02,0.05:strength=2,5")
    assert name == "iti" and points == [
        {"head_share": 0.02, "strength": 2},
        {"head_share": 0.02, "strength": 5},
        {"head_share": 0.05, "strength": 2},
        {"head_share": 0.05, "strength": 5},
    ]
    assert parse_param_option("radiant:threshold_rule=radiant") == ("radiant", "threshold_rule", "radiant")
    assert parse_param_option("slim:kappa=none") == ("slim", "kappa", None)
    for bad in ("iti", "iti:", "iti:strength", "iti:strength="):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid_option(bad)
    with pytest.raises(ConfigError, match="--param"):
        parse_param_option("radiant:margin")
    assert split_variant("iti@paper") == ("iti", "paper") and split_variant("slim") == ("slim", None)


def test_validation_documents_are_seeded_and_disjoint_from_the_test_documents() -> None:
    docs = [f"document {i}" for i in range(30)]
    test = docs[::3]
    val = validation_documents(docs, test, 8, seed=0)
    assert len(val) == 8 and not set(val) & set(test)
    assert val == validation_documents(docs, test, 8, seed=0)
    assert validation_documents(docs, docs, 8, seed=0) == [] and validation_documents(docs, test, 0, 0) == []


def _bank(n_groups: int = 40, layers: int = 3, heads: int = 4, d: int = 8) -> object:
    """Gaussian activations with a class signal that grows with the layer."""
    import torch

    from otguard.activations import ActivationSet
    from otguard.sites import ModelIdentity

    g = torch.Generator().manual_seed(0)
    n = n_groups * 4
    y = torch.tensor([(i // 2) % 2 for i in range(n)])
    x = torch.randn(n, layers, heads, d, generator=g)
    for layer in range(layers):
        x[:, layer] += (0.5 + layer) * y[:, None, None].float() * torch.randn(heads, d, generator=g)
    ident = ModelIdentity(
        "tiny", "llama", layers, heads, heads, d, heads * d, "model.layers.{layer}.self_attn.o_proj"
    )
    return ActivationSet(
        x, y, torch.arange(n) // 4, {"model": ident.to_dict(), "data_fingerprint": "synthetic"}
    )


def test_radiant_as_published_sweeps_its_candidate_layers_by_true_x_info() -> None:
    import numpy as np

    from otguard.harness.config import CompareConfig
    from otguard.harness.sweep import fit_grid
    from otguard.methods.grids import PAPER_PARAMS

    acts = _bank()
    val = acts.groups.numpy() % 4 == 0
    split = type("Split", (), {"train": np.flatnonzero(~val), "val": np.flatnonzero(val)})()
    config = CompareConfig(methods=("none", "radiant@paper"), method_params={"radiant@paper": {"epochs": 30}})
    sweep = fit_grid(config, "radiant@paper", acts, split, False)
    assert (
        sweep.metric == "true_x_info"
        and sweep.swept
        and len(sweep.policies) == PAPER_PARAMS["radiant"]["layer_sweep"]
    )
    from otguard.methods import get_method

    first = get_method("radiant", epochs=30, progress=False, **PAPER_PARAMS["radiant"])
    candidates = first.fit(acts, split.train, split.val).candidate_layers_
    assert len(candidates) == 2 and [p["layers"] for p in sweep.params] == [[c] for c in candidates]
    assert [pol.layers[0].layer for pol in sweep.policies] == candidates
    assert all(p["threshold_rule"] == "radiant" and p["margin"] == 15.0 for p in sweep.params)
    # the plain method is swept over its margins by the common rule
    plain = fit_grid(CompareConfig(methods=("none", "radiant"), method_params={"radiant": {"epochs": 30}}),
                     "radiant", acts, split, False)  # fmt: skip
    assert plain.metric == "mc2" and [p["margin"] for p in plain.params] == [4.0, 15.0, 40.0]
