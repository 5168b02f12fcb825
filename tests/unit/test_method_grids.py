"""Grid fits (``Method.fit_grid``), ITI's head share, the default grids, the paper settings and
RADIANT's layer-sweep candidates, on tiny random activation banks."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError
from otguard.methods import get_method
from otguard.methods.grids import (
    KAPPA_GRID,
    PAPER_PARAMS,
    default_grid,
    heads_from_share,
    parse_variant,
)
from otguard.policy import Policy
from otguard.sites import ModelIdentity

L, H, d = 4, 3, 5
# Class-1 shift per layer: layer 1 separates best, then 3, then 2; layer 0 carries no signal.
SIGNAL = (0.0, 1.6, 0.5, 0.9)
QUICK = {"epochs": 40, "progress": False}


def make_bank(n_groups: int = 50, per_group: int = 4, seed: int = 0) -> ActivationSet:
    """Gaussian activations; class 1 is shifted along a random direction, by SIGNAL[l] in layer l."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * per_group
    y = torch.tensor([(i // 2) % 2 for i in range(n)])
    x = torch.randn(n, L, H, d, generator=g)
    for layer, s in enumerate(SIGNAL):
        x[:, layer] += s * y[:, None, None].float() * torch.randn(H, d, generator=g)
    identity = ModelIdentity("tiny", "llama", L, H, H, d, H * d, "model.layers.{layer}.self_attn.o_proj")
    meta = {"model": identity.to_dict(), "data_fingerprint": "synthetic"}
    return ActivationSet(x.half(), y, torch.arange(n) // per_group, meta)


def split(acts: ActivationSet) -> tuple[np.ndarray, np.ndarray]:
    val = acts.groups.numpy() % 4 == 0
    return np.flatnonzero(~val), np.flatnonzero(val)


def assert_same_policy(a: Policy, b: Policy) -> None:
    """Exact equality: every tensor bit for bit, every parameter and metadata entry."""
    assert (a.method, a.rule, a.kappa, a.scope) == (b.method, b.rule, b.kappa, b.scope)
    assert a.params == b.params
    assert json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)
    assert a.model == b.model
    assert len(a.layers) == len(b.layers)
    for ea, eb in zip(a.layers, b.layers, strict=True):
        assert (ea.layer, ea.threshold) == (eb.layer, eb.threshold)
        for name in ("probe_weight", "probe_bias", "head_mask", "b", "A"):
            ta, tb = getattr(ea, name), getattr(eb, name)
            assert (ta is None) == (tb is None), name
            if ta is not None:
                assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


class CallCounter:
    """Wraps a function of a module, counting calls (and still calling it)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> None:
        self.real = getattr(module, name)
        self.calls = 0
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return self.real(*args, **kwargs)


# Each grid mixes points that share the expensive part with points that cannot (another seed or
# probe setting), so both paths are checked. ``stage1``: the distinct probe trainings expected.
GRIDS: dict[str, tuple[dict, list[dict], int]] = {
    "none": ({}, [{}], 0),
    "iti": (
        QUICK,
        [{"top_k": 2, "strength": 1.0}, {"head_share": 0.5, "strength": 3.0}, {"top_k": 5, "strength": 0.5},
         {"seed": 1, "top_k": 2, "strength": 1.0}, {"head_share": 0.25, "strength": -2.0}],
        2,
    ),
    "mean-shift": (
        QUICK,
        [{"strength": 0.5}, {"strength": 2.0}, {"strength": 2.0, "layer": 2}, {"strength": 1.0, "epochs": 30},
         {"strength": 4.0}],
        2,
    ),
    "radiant": (
        QUICK,
        [{"margin": 1.0}, {"margin": 8.0}, {"margin": 8.0, "threshold_rule": "radiant"},
         {"margin": 4.0, "layers": [3]}, {"margin": 4.0, "layer_sweep": 3}, {"margin": 2.0, "seed": 2},
         {"margin": 2.0, "fnr_weight": 2.0}, {"margin": 2.0, "cov_shrinkage": "none", "layers": [0, 2]}],
        3,
    ),
    "slim": (
        QUICK,
        [{"kappa": k} for k in KAPPA_GRID]
        + [{"gamma": 0.2}, {"kappa": 5.0, "layers": [2]},
           {"kappa": 5.0, "layer_criterion": "mean-head-loss"}],
        1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_fit_grid_equals_separate_fits_exactly(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import otguard.methods.baselines as baselines
    import otguard.methods.ot as ot_module

    base_params, grid, stage1 = GRIDS[name]
    acts = make_bank()
    tr, va = split(acts)
    separate = [get_method(name, **{**base_params, **point}).fit(acts, tr, va).policy_ for point in grid]

    counters = [
        CallCounter(monkeypatch, baselines, "head_accuracy"),
        CallCounter(monkeypatch, ot_module, "fit_detector"),
    ]
    method = get_method(name, **base_params)
    shared = method.fit_grid(acts, tr, va, grid)
    assert len(shared) == len(grid)
    for point, a, b in zip(grid, separate, shared, strict=True):
        assert_same_policy(a, b)
        for key, value in point.items():
            assert b.params[key] == value
    assert sum(c.calls for c in counters) == stage1
    # fit_grid fits copies: the method itself stays unfitted and keeps its parameters.
    assert "_policy" not in method.__dict__
    assert method.get_params() == get_method(name, **base_params).get_params()


def test_grid_points_that_differ_in_a_seed_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed is part of the shared key: another seed gives other probes (the check has teeth)."""
    acts = make_bank()
    tr, va = split(acts)
    a, b = get_method("radiant", **QUICK).fit_grid(acts, tr, va, [{"seed": 0}, {"seed": 1}])
    assert not torch.equal(a.layers[0].probe_weight, b.layers[0].probe_weight)


def test_slim_kappa_points_share_stage2_and_differ_only_in_kappa(monkeypatch: pytest.MonkeyPatch) -> None:
    import otguard.methods.ot as ot_module

    acts = make_bank()
    tr, va = split(acts)
    maps = CallCounter(monkeypatch, ot_module, "fit_head_maps")
    policies = get_method("slim", **QUICK).fit_grid(acts, tr, va, [{"kappa": k} for k in KAPPA_GRID])
    assert maps.calls == 1
    first = policies[0]
    for kappa, policy in zip(KAPPA_GRID, policies, strict=True):
        assert policy.kappa == kappa and policy.params["kappa"] == kappa
        want = first.with_kappa(kappa)
        want.params = {**first.params, "kappa": kappa}
        assert_same_policy(policy, want)
        assert policy.layers[0].A is not first.layers[0].A or policy is first  # independent tensors


def test_fit_grid_reuses_the_probes_of_the_last_fit_on_the_same_bank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness's layer sweep: fit once, read the candidates, fit each with layers=[l]."""
    import otguard.methods.ot as ot_module

    acts = make_bank()
    tr, va = split(acts)
    stage1 = CallCounter(monkeypatch, ot_module, "fit_detector")
    method = get_method("radiant", layer_sweep=2, **QUICK).fit(acts, tr, va)
    first = method.policy_
    candidates = method.candidate_layers_
    grid = [{"layers": [layer], "layer_sweep": 1} for layer in candidates]
    policies = method.fit_grid(acts, tr, va, grid)
    assert stage1.calls == 1
    assert [p.layers[0].layer for p in policies] == candidates
    assert method.policy_ is first  # fit_grid did not refit the method
    # Another bank object (even with equal contents) or other rows: the probes are trained again.
    method.fit_grid(ActivationSet(acts.acts.clone(), acts.labels, acts.groups, acts.meta), tr, va, grid[:1])
    assert stage1.calls == 2
    method.fit_grid(acts, tr[1:], va, grid[:1])
    assert stage1.calls == 3


def test_every_grid_point_is_checked_before_anything_is_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    import otguard.methods.ot as ot_module

    acts = make_bank()
    tr, va = split(acts)
    stage1 = CallCounter(monkeypatch, ot_module, "fit_detector")
    method = get_method("radiant", **QUICK)
    bad_points = [
        ({"margin": -1.0}, "Radiant: Margin.value must be > 0"),
        ({"marginn": 2.0}, "no parameter 'marginn'"),
        ({"layers": [L]}, r"layers must be a non-empty list of layer indices in \[-4, 4\)"),
        ({"layers": []}, "layers must be a non-empty list"),
        ({"layer_sweep": 0}, "layer_sweep must be an integer >= 1"),
        ({"threshold_rule": "fnr"}, "threshold_rule must be one of slim, radiant"),
        ({"layer_criterion": "acc"}, "layer_criterion must be one of loss, mean-head-loss"),
    ]
    for point, message in bad_points:
        with pytest.raises(ConfigError, match=message) as info:
            method.fit_grid(acts, tr, va, [{"margin": 2.0}, point])
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="must be a dict"):
        method.fit_grid(acts, tr, va, [("margin", 2.0)])
    assert stage1.calls == 0
    assert method.fit_grid(acts, tr, va, []) == []


# ---------------------------------------------------------------- ITI's head share


@pytest.mark.parametrize(
    ("share", "n_layers", "n_heads", "want"),
    [
        (48 / 1024, 32, 32, 48),  # the paper's K on LLaMA-7B
        (0.05, 30, 9, 14),  # SmolLM2-135M: 13.5 rounds half up
        (0.02, 30, 9, 5),  # 5.4
        (0.125, 4, 3, 2),  # 1.5 rounds half up (Python's round would give 2 here, but 2.5 -> 2)
        (0.25, 2, 5, 3),  # 2.5 -> 3, not banker's 2
        (0.01, 4, 3, 1),  # at least one head
        (1.0, 4, 3, 12),
    ],
)
def test_heads_from_share(share: float, n_layers: int, n_heads: int, want: int) -> None:
    assert heads_from_share(share, n_layers, n_heads) == want


HEAD_SHARES = [({"head_share": 0.25}, 3), ({"head_share": 0.125}, 2), ({"head_share": 0.01}, 1),
               ({"top_k": 7}, 7), ({"top_k": 7, "head_share": 1.0}, 12), ({"top_k": 50}, 12)]  # fmt: skip


@pytest.mark.parametrize(("params", "want_k"), HEAD_SHARES)
def test_iti_head_share_gives_k_heads(params: dict, want_k: int) -> None:
    acts = make_bank()
    policy = get_method("iti", **QUICK, **params).fit(acts, *split(acts)).policy_
    assert policy.meta["top_k"] == want_k
    assert len(policy.meta["heads"]) == want_k
    assert sum(int(e.head_mask.sum()) for e in policy.layers) == want_k


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"head_share": 0.0}, "ITI head_share must be a finite number > 0 and <= 1"),
        ({"head_share": 1.5}, "ITI head_share must be a finite number > 0 and <= 1"),
        ({"head_share": math.nan}, "ITI head_share must be"),
        ({"head_share": "5%"}, "ITI head_share must be"),
        ({"top_k": 0}, "ITI top_k must be an integer >= 1"),
        ({"top_k": 2.5}, "ITI top_k must be an integer >= 1"),
        ({"strength": math.inf}, "ITI strength must be a finite number"),
        ({"strength": "big"}, "ITI strength must be a finite number"),
    ],
)
def test_iti_bad_values_are_one_line_config_errors(params: dict, message: str) -> None:
    acts = make_bank()
    with pytest.raises(ConfigError, match=message) as info:
        get_method("iti", **QUICK, **params).fit(acts, *split(acts))
    assert "\n" not in str(info.value)


def test_mean_shift_bad_values_are_config_errors() -> None:
    acts = make_bank()
    with pytest.raises(ConfigError, match=r"MeanShift layer must be in 0\.\.3"):
        get_method("mean-shift", layer=4, **QUICK).fit(acts, *split(acts))
    with pytest.raises(ConfigError, match="MeanShift strength must be a finite number"):
        get_method("mean-shift", strength=math.nan, **QUICK).fit(acts, *split(acts))


# ---------------------------------------------------------------- default grids, paper settings


def test_default_grids_exact_values_on_smollm2() -> None:
    iti = [{"head_share": 0.05, "strength": a} for a in (2.0, 8.0)]
    assert default_grid("iti", 30, 9) == iti
    assert default_grid("mean-shift", 30, 9) == [{"strength": s} for s in (0.5, 2.0)]
    assert default_grid("radiant", 30, 9) == [{"margin": m} for m in (4.0, 15.0, 40.0)]
    assert default_grid("slim", 30, 9) == [{"kappa": k} for k in (5.0, 20.0, 40.0)]
    assert default_grid("none", 30, 9) == [{}]
    assert default_grid("radiant@paper", 30, 9) == [PAPER_PARAMS["radiant"]]


@pytest.mark.parametrize(("n_layers", "n_heads", "ks"), [(30, 9, [14]), (32, 32, [51]), (2, 4, [1]),
                                                          (4, 6, [1])])  # fmt: skip
def test_iti_default_grid_scales_with_the_model(n_layers: int, n_heads: int, ks: list[int]) -> None:
    """K follows the model (5 % of all heads, at least one)."""
    grid = default_grid("iti", n_layers, n_heads)
    assert len(grid) == 2 * len(ks) == 2
    got = sorted({heads_from_share(p["head_share"], n_layers, n_heads) for p in grid})
    assert got == ks
    for point in grid:
        k = get_method("iti", **point).n_heads_edited(n_layers, n_heads)
        assert k == heads_from_share(point["head_share"], n_layers, n_heads)


def test_default_grids_are_small_fresh_and_valid() -> None:
    acts = make_bank()
    for name in ("none", "iti", "mean-shift", "radiant", "slim"):
        grid = default_grid(name, L, H)
        assert 1 <= len(grid) <= 4
        assert len({json.dumps(p, sort_keys=True) for p in grid}) == len(grid)  # no duplicates
        for point in grid:
            get_method(name, **point).check_params(acts)
        grid[0]["strength"] = 99.0
        assert default_grid(name, L, H)[0].get("strength") != 99.0  # a fresh copy every call


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", 30, 9), "Unknown method 'nope'"),
        (("iti", 0, 9), "n_layers as an integer >= 1"),
        (("iti", 30, 2.5), "n_heads as an integer >= 1"),
        (("iti@best", 30, 9), "Unknown method variant 'iti@best'"),
    ],
)
def test_default_grid_errors(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        default_grid(*args)


def test_parse_variant() -> None:
    assert parse_variant("iti@paper") == ("iti", "paper")
    assert parse_variant("radiant") == ("radiant", None)
    for bad, message in (("iti@best", "Unknown method variant 'iti@best'; the variants are iti@paper"),
                         ("none@paper", "Unknown method variant 'none@paper'"),
                         ("nope@paper", "Unknown method 'nope' in 'nope@paper'"),
                         ("iti@", "Unknown method variant 'iti@'")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            parse_variant(bad)


def test_paper_params_are_the_published_settings_and_build_valid_methods() -> None:
    assert PAPER_PARAMS == {
        "iti": {"top_k": 48, "strength": 15.0},
        "mean-shift": {"strength": 1.0},
        "radiant": {"threshold_rule": "radiant", "margin": 15.0, "layer_sweep": 2},
        "slim": {"gamma": 0.1},
    }
    acts = make_bank()
    tr, va = split(acts)
    for name, params in PAPER_PARAMS.items():
        method = get_method(name, **QUICK, **params)
        policy = method.fit(acts, tr, va).policy_
        for key, value in params.items():
            assert policy.params[key] == value
        if name == "radiant":
            assert method.detector_.threshold_rule == "radiant"
            assert len(policy.meta["candidate_layers"]) == 2
            assert policy.meta["candidate_layers"][0] == policy.layers[0].layer
        if name == "iti":
            assert policy.meta["top_k"] == L * H  # 48 heads asked, the tiny bank has 12


def test_grids_and_registry_do_not_import_torch() -> None:
    code = (
        "import sys; import otguard.methods as m; "
        "g = m.default_grid('iti', 30, 9); p = m.PAPER_PARAMS; v = m.parse_variant('slim@paper'); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(len(g), v)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 ('slim', 'paper')"


# ---------------------------------------------------------------- RADIANT's layer sweep


def mean_head_loss(
    method: object, acts: ActivationSet, va: np.ndarray, fnr_weight: float = 1.0
) -> list[float]:
    """RADIANT's layer score written out: per layer, the mean over heads of FPR + bl·FNR of each head's
    own vote (logit > 0) on the validation rows."""
    bank = method.detector_.bank  # type: ignore[attr-defined]
    x = acts.acts[va].float()
    y = acts.labels[va]
    scores = []
    for layer in range(L):
        losses = []
        for h in range(H):
            vote = (x[:, layer, h] @ bank.weight[layer, h] + bank.bias[layer, h]) > 0
            fpr = float(vote[y == 0].float().mean())
            fnr = float((~vote[y == 1]).float().mean())
            losses.append(fpr + fnr_weight * fnr)
        scores.append(sum(losses) / H)
    return scores


@pytest.mark.parametrize(("sweep", "layers"), [(2, None), (3, None), (10, None), (2, [0, 2, 3]), (1, None)])
def test_candidate_layers_are_the_best_by_mean_head_validation_loss(
    sweep: int, layers: list[int] | None
) -> None:
    acts = make_bank()
    tr, va = split(acts)
    trained = {"epochs": 100, "lr": 2e-2, "progress": False}  # probes that see the layers' signal
    method = get_method("radiant", layer_sweep=sweep, layers=layers, **trained).fit(acts, tr, va)
    scores = mean_head_loss(method, acts, va)
    pool = layers if layers is not None else list(range(L))
    want = sorted(pool, key=lambda layer: (round(scores[layer], 9), layer))[:sweep]
    assert method.candidate_layers_ == want
    assert method.policy_.meta["candidate_layers"] == want
    assert method.policy_.layers[0].layer == want[0]
    # The bank's layers are not ranked in index order (the check has teeth).
    assert sorted(range(L), key=lambda layer: scores[layer]) == [1, 3, 2, 0]


@pytest.mark.parametrize("layer", range(L))
def test_layers_restricts_the_edited_layer_and_keeps_the_probes(layer: int) -> None:
    acts = make_bank()
    tr, va = split(acts)
    free = get_method("radiant", **QUICK).fit(acts, tr, va)
    pinned = get_method("radiant", layers=[layer], **QUICK).fit(acts, tr, va)
    assert pinned.policy_.layers[0].layer == layer
    assert pinned.candidate_layers_ == [layer]
    assert torch.equal(pinned.detector_.bank.weight, free.detector_.bank.weight)
    assert torch.equal(pinned.policy_.layers[0].probe_weight, free.detector_.bank.weight[layer])


def test_slim_records_its_one_candidate() -> None:
    acts = make_bank()
    method = get_method("slim", **QUICK).fit(acts, *split(acts))
    assert method.candidate_layers_ == [method.policy_.layers[0].layer]
    assert "layer_sweep" not in method.get_params()
