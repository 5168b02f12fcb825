"""Contract tests for every registered method on synthetic activation banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import otguard
from otguard.activations import ActivationSet
from otguard.errors import ConfigError, DataError, NotFittedError
from otguard.methods import METHODS, get_method
from otguard.policy import Policy
from otguard.sites import ModelIdentity

L, H, d = 3, 4, 6
FAST = {"radiant": {"epochs": 60, "progress": False}, "slim": {"epochs": 60, "progress": False},
        "iti": {"epochs": 60, "progress": False, "top_k": 3}, "mean-shift": {"epochs": 60, "progress": False},
        "none": {}}  # fmt: skip


def make_bank(
    n_groups: int = 60, per_group: int = 4, seed: int = 0, informative_layer: int = 1
) -> ActivationSet:
    """Gaussian activations; class 1 is shifted along a random direction in one layer's heads."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * per_group
    y = torch.tensor([i % 2 for i in range(n)])
    x = torch.randn(n, L, H, d, generator=g)
    direction = torch.randn(H, d, generator=g)
    x[:, informative_layer] += 1.5 * y[:, None, None].float() * direction
    groups = torch.arange(n) // per_group
    identity = ModelIdentity("tiny", "llama", L, H, H, d, H * d, "model.layers.{layer}.self_attn.o_proj")
    return ActivationSet(x.half(), y, groups, {"model": identity.to_dict(), "data_fingerprint": "synthetic"})


def split(acts: ActivationSet) -> tuple[np.ndarray, np.ndarray]:
    groups = acts.groups.numpy()
    val = groups % 5 == 0
    return np.flatnonzero(~val), np.flatnonzero(val)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_returns_self_and_a_policy_that_round_trips(name: str, tmp_path) -> None:
    acts = make_bank()
    method = get_method(name, **FAST[name])
    assert method.fit(acts, *split(acts)) is method
    policy = method.policy_
    assert isinstance(policy, Policy)
    assert policy.method == name
    policy.save(tmp_path / name)
    loaded = Policy.load(tmp_path / name)
    assert loaded.rule == policy.rule and loaded.kappa == policy.kappa
    assert len(loaded.layers) == len(policy.layers)
    for a, b in zip(policy.layers, loaded.layers, strict=True):
        assert a.layer == b.layer and a.threshold == b.threshold
        assert torch.equal(a.b.float(), b.b) and torch.equal(a.head_mask, b.head_mask)
        if a.A is not None:
            assert torch.equal(a.A.float(), b.A)
    # Hyper-parameters are recorded verbatim and rebuild the method.
    rebuilt = get_method(name, **loaded.params)
    assert rebuilt.get_params() == method.get_params()


def test_get_params_round_trip_and_unknown_parameter() -> None:
    method = get_method("slim", gamma=0.2, kappa=7.0)
    assert method.get_params()["gamma"] == 0.2
    with pytest.raises(ValueError, match="no parameter 'gama'"):
        get_method("slim", gama=0.2)
    with pytest.raises(ValueError, match="Unknown method"):
        get_method("nope")


def test_unfitted_method_says_to_call_fit() -> None:
    with pytest.raises(NotFittedError, match="call fit"):
        _ = get_method("radiant").policy_


@pytest.mark.parametrize("name", ["radiant", "slim", "iti"])
def test_one_class_training_data_is_a_clear_error(name: str) -> None:
    acts = make_bank()
    acts.labels[:] = 0
    with pytest.raises(DataError, match="undesirable"):
        get_method(name, **FAST[name]).fit(acts, *split(acts))


def test_empty_split_is_a_clear_error() -> None:
    acts = make_bank()
    with pytest.raises(DataError, match="empty"):
        get_method("slim", **FAST["slim"]).fit(acts, np.array([], dtype=int), split(acts)[1])


def test_ot_methods_pick_the_informative_layer_and_move_flagged_heads_to_the_desirable_side() -> None:
    acts = make_bank(n_groups=100)
    for name in ("radiant", "slim"):
        method = get_method(name, **{**FAST[name], "epochs": 300})
        policy = method.fit(acts, *split(acts)).policy_
        edit = policy.layers[0]
        assert edit.layer == 1, name
        # Map the flagged training activations and check the head probes now call them desirable.
        x = acts.acts[:, 1].float()
        logits = torch.einsum("nhd,hd->nh", x, edit.probe_weight) + edit.probe_bias
        flagged = logits > 0
        mapped = torch.einsum("hij,nhj->nhi", edit.A, x) + edit.b
        new_logits = torch.einsum("nhd,hd->nh", mapped, edit.probe_weight) + edit.probe_bias
        assert (new_logits[flagged] <= 1e-3).float().mean() > 0.7, name
        assert all(np.isfinite(r) or r is None for r in policy.meta["guarantee_rate_val"])


def test_radiant_margin_pushes_further_than_slim_mean() -> None:
    """RADIANT's margin with the reference constraint lands past the boundary (docs/method.md §9.5)."""
    acts = make_bank(n_groups=100)
    tr, va = split(acts)
    rad = get_method("radiant", **{**FAST["radiant"], "margin": 5.0, "epochs": 300}).fit(acts, tr, va)
    edit = rad.policy_.layers[0]
    assert edit.layer == 1
    theta = rad.detector_.bank.weight[1].double()
    theta0 = rad.detector_.bank.bias[1].double()
    signed = (rad.transport_.mu_star.double() * theta).sum(-1) + theta0
    assert (signed[edit.head_mask] < 0).all()


def test_singular_covariance_gives_finite_maps() -> None:
    """Activations living in a 2-D subspace of each head (rank-deficient covariance) stay finite."""
    acts = make_bank()
    acts.acts[..., 2:] = 0
    policy = get_method("slim", **FAST["slim"]).fit(acts, *split(acts)).policy_
    edit = policy.layers[0]
    assert torch.isfinite(edit.A).all() and torch.isfinite(edit.b).all()


def test_iti_selects_top_k_heads_and_shifts_toward_desirable() -> None:
    acts = make_bank(n_groups=100)
    method = get_method("iti", **{**FAST["iti"], "top_k": 4, "strength": 2.0})
    policy = method.fit(acts, *split(acts)).policy_
    assert sum(int(e.head_mask.sum()) for e in policy.layers) == 4
    assert all(e.threshold is None and e.A is None for e in policy.layers)
    # The informative layer's heads rank first; shift direction points from class 1 to class 0.
    assert [e.layer for e in policy.layers] == [1]
    x = acts.acts[:, 1].float()
    diff = x[acts.labels == 0].mean(0) - x[acts.labels == 1].mean(0)
    assert ((policy.layers[0].b * diff).sum(-1)[policy.layers[0].head_mask] > 0).all()


def test_fit_policy_convenience_splits_by_group() -> None:
    acts = make_bank()
    policy = otguard.fit_policy(acts, "mean-shift", epochs=30, progress=False)
    assert policy.method == "mean-shift" and len(policy.layers) == 1


# ---------------------------------------------------------------- which rows feed each estimate
#
# Hand-made banks with a hand-made detector (Stage 1 replaced by a fake that records its inputs) and
# a spy on Stage 2: every test checks the exact numbers against an explicit reference and also that
# the plausible wrong choice (layer flag, labels, other split) gives different numbers.

LAYER = 1  # the layer the fake detector picks
DH = 3  # head dimension of the hand-made banks


def _grid_values(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random multiples of 1/16 in [-4, 4): exact in float16, so storage does not round them."""
    return torch.randint(-64, 64, shape, generator=g).float() / 16


def hand_bank(
    n_train: int = 40, n_val: int = 20, seed: int = 0
) -> tuple[ActivationSet, np.ndarray, np.ndarray]:
    """A 2-layer, 2-head, d = 3 bank; train rows first, then validation rows (each its own group)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    x = _grid_values(g, n, 2, 2, DH)
    x[n_train:, LAYER] += 0.75  # validation rows sit elsewhere: train-only vs train+val moments differ
    y = torch.randint(0, 2, (n,), generator=g)
    y[:2], y[n_train : n_train + 2] = torch.tensor([0, 1]), torch.tensor([0, 1])  # both classes in each split
    identity = ModelIdentity("hand", "llama", 2, 2, 2, DH, 2 * DH, "model.layers.{layer}.self_attn.o_proj")
    acts = ActivationSet(x.half(), y, torch.arange(n), {"model": identity.to_dict()})
    return acts, np.arange(n_train), np.arange(n_train, n)


# Head 0 of LAYER votes when a[0] > 0.25, head 1 when a[1] + a[2] > 0; the layer needs both (tau = 2).
PROBE_W = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]])
PROBE_B = torch.tensor([[0.0, 0.0], [-0.25, 0.0]])
TAU = 2


class FakeStage1:
    """Stands in for ``fit_detector``: fixed probes and thresholds, layer LAYER; records its inputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, x_tr, y_tr, x_va, y_va, **kwargs):  # noqa: ANN001, ANN204
        from otguard.probes import Detector, ProbeBank, ensemble_metrics

        self.calls.append((x_tr, y_tr, x_va, y_va))
        bank = ProbeBank(PROBE_W.clone(), PROBE_B.clone(), 1.0, "risk", torch.ones(2, 2, dtype=torch.long))
        thresholds = torch.tensor([TAU, TAU])
        report = ensemble_metrics(bank.votes(x_va), y_va, thresholds)
        return Detector(bank=bank, thresholds=thresholds, report=report, layer=LAYER)


class Stage2Spy:
    """Wraps ``fit_head_maps`` and keeps the arguments of each call."""

    def __init__(self) -> None:
        from otguard.transport import fit_head_maps

        self.real = fit_head_maps
        self.calls: list[dict] = []

    def __call__(self, mu_hat, sigma_hat, theta, theta0, alpha, ref_cov=None, **kwargs):  # noqa: ANN001, ANN204
        self.calls.append(
            dict(mu_hat=mu_hat, sigma_hat=sigma_hat, theta=theta, theta0=theta0, ref_cov=ref_cov)
        )
        return self.real(mu_hat, sigma_hat, theta, theta0, alpha, ref_cov=ref_cov, **kwargs)


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeStage1, Stage2Spy]:
    import otguard.methods.ot as ot_module

    fake, spy = FakeStage1(), Stage2Spy()
    monkeypatch.setattr(ot_module, "fit_detector", fake)
    monkeypatch.setattr(ot_module, "fit_head_maps", spy)
    return fake, spy


def _ml_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and divide-by-n covariance of (n, d) rows, float64, written out by hand."""
    rows = rows.double()
    mu = rows.sum(0) / rows.shape[0]
    c = rows - mu
    return mu, c.T @ c / rows.shape[0]


def _head_flags(x_layer: torch.Tensor) -> torch.Tensor:
    """(n, H) votes of the hand-made probes of LAYER on (n, H, d) activations."""
    return torch.einsum("nhd,hd->nh", x_layer.double(), PROBE_W[LAYER].double()) + PROBE_B[LAYER].double() > 0


@pytest.mark.parametrize("name", ["radiant", "slim"])
def test_stage2_moments_come_from_the_rows_the_heads_own_probe_flags(name: str, stages) -> None:
    """Source rows: flagged by that head's probe (not the layer flag, not the labels); RADIANT uses the
    training rows only and SLIM training + validation rows (docs/method.md §3.1)."""
    fake, spy = stages
    acts, tr, va = hand_bank()
    get_method(name, cov_shrinkage="none", progress=False).fit(acts, tr, va)
    x = acts.acts.float()[:, LAYER]
    # Stage 1 saw exactly the training rows for training and the validation rows for tuning.
    x_tr, y_tr, x_va, y_va = fake.calls[0]
    assert torch.equal(x_tr, acts.acts[tr].float()) and torch.equal(y_tr, acts.labels[tr])
    assert torch.equal(x_va, acts.acts[va].float()) and torch.equal(y_va, acts.labels[va])

    right_rows = np.arange(len(acts)) if name == "slim" else tr
    wrong_rows = tr if name == "slim" else np.arange(len(acts))
    call = spy.calls[0]
    for h in range(2):

        def moments_over(
            rows: np.ndarray, select: torch.Tensor, h: int = h
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return _ml_moments(x[rows][select, h])

        xs = x[right_rows]
        votes = _head_flags(xs)
        want_mu, want_cov = moments_over(right_rows, votes[:, h])
        torch.testing.assert_close(call["mu_hat"][h], want_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(call["sigma_hat"][h], want_cov, rtol=1e-12, atol=1e-12)
        # The alternatives are different sets of rows here, with clearly different means.
        layer_flag = votes.sum(1) >= TAU
        labels = acts.labels[right_rows] == 1
        other_votes = _head_flags(x[wrong_rows])[:, h]
        for wrong, rows in ((layer_flag, right_rows), (labels, right_rows), (other_votes, wrong_rows)):
            wrong_mu, _ = moments_over(rows, wrong)
            assert (wrong_mu - want_mu).abs().max() > 0.05
    torch.testing.assert_close(call["theta"], PROBE_W[LAYER].double())
    torch.testing.assert_close(call["theta0"], PROBE_B[LAYER].double())


def test_radiant_reference_covariance_is_from_desirable_training_rows(stages) -> None:
    _, spy = stages
    acts, tr, va = hand_bank()
    get_method("radiant", cov_shrinkage="none", progress=False).fit(acts, tr, va)
    x, y = acts.acts.float()[:, LAYER], acts.labels
    ref = spy.calls[0]["ref_cov"]
    assert ref is not None
    all_rows = np.arange(len(acts))
    for h in range(2):
        want = _ml_moments(x[tr][y[tr] == 0, h])[1]
        torch.testing.assert_close(ref[h], want, rtol=1e-12, atol=1e-12)
        for wrong in (x[tr][y[tr] == 1, h], x[all_rows][y == 0, h], x[tr][:, h]):
            assert (_ml_moments(wrong)[1] - want).abs().max() > 0.05


def test_slim_has_no_reference_covariance(stages) -> None:
    _, spy = stages
    acts, tr, va = hand_bank()
    get_method("slim", progress=False).fit(acts, tr, va)
    assert spy.calls[0]["ref_cov"] is None


@pytest.mark.parametrize("name", ["radiant", "slim"])
def test_source_covariance_is_shrunk_before_stage2_and_recorded(name: str, stages) -> None:
    """The default OAS shrinkage: Stage 2 receives exactly shrink_covariance(ML cov, n) per head."""
    from otguard.transport import shrink_covariance

    _, spy = stages
    acts, tr, va = hand_bank()
    policy = get_method(name, progress=False).fit(acts, tr, va).policy_
    rows = np.arange(len(acts)) if name == "slim" else tr
    x = acts.acts.float()[rows][:, LAYER]
    votes = _head_flags(x)
    for h in range(2):
        raw = _ml_moments(x[votes[:, h], h])[1]
        n = int(votes[:, h].sum())
        want, rho = shrink_covariance(raw, n)
        assert float(rho) > 0.0 and (want - raw).abs().max() > 1e-3  # shrinking changes it here
        torch.testing.assert_close(spy.calls[0]["sigma_hat"][h], want, rtol=1e-12, atol=1e-12)
        assert policy.meta["cov_shrinkage"][h] == pytest.approx(float(rho), rel=1e-12)
        assert policy.meta["source_rows"][h] == n


def test_unknown_cov_shrinkage_is_an_error() -> None:
    acts, tr, va = hand_bank()
    with pytest.raises(ConfigError, match="cov_shrinkage must be one of oas, none"):
        get_method("slim", cov_shrinkage="ledoit", progress=False).fit(acts, tr, va)


def test_few_source_rows_give_a_bounded_map_that_still_meets_the_constraint(monkeypatch) -> None:
    """5 flagged rows in d = 16 with RADIANT's reference constraint: without shrinkage the map's norm
    is in the hundreds; with it, bounded, and the transported Gaussian still meets the constraint."""
    import otguard.methods.ot as ot_module
    from otguard.probes import Detector, ProbeBank, ensemble_metrics
    from otguard.transport import Margin, chance_constraint_value

    d, n_train, n_val = 16, 60, 20
    g = torch.Generator().manual_seed(3)
    n = n_train + n_val
    x = _grid_values(g, n, 1, 1, d) / 2
    y = torch.tensor([i % 2 for i in range(n)])
    x[:, 0, 0, 0] = -1.0
    flagged = [0, 2, 4, 6, 8]  # the only training rows the probe flags (a[0] > 0), all label 0
    x[flagged, 0, 0, 0] = 1.0
    x[n_train + 1, 0, 0, 0] = 1.0  # one flagged validation row
    acts = ActivationSet(x.half(), y, torch.arange(n), {})
    weight = torch.zeros(1, 1, d)
    weight[0, 0, 0] = 1.0

    def stage1(x_tr, y_tr, x_va, y_va, **kwargs):  # noqa: ANN001, ANN202
        bank = ProbeBank(weight, torch.zeros(1, 1), 1.0, "risk", torch.ones(1, 1, dtype=torch.long))
        thresholds = torch.tensor([1])
        return Detector(bank, thresholds, ensemble_metrics(bank.votes(x_va), y_va, thresholds), 0)

    monkeypatch.setattr(ot_module, "fit_detector", stage1)
    tr, va = np.arange(n_train), np.arange(n_train, n)
    norms = {}
    for shrink in ("none", "oas"):
        method = get_method("radiant", margin=15.0, cov_shrinkage=shrink, progress=False).fit(acts, tr, va)
        edit, result = method.policy_.layers[0], method.transport_
        assert method.policy_.meta["source_rows"] == [5]
        norms[shrink] = float(torch.linalg.matrix_norm(edit.A[0].double(), ord=2))
        con = chance_constraint_value(result.mu_star, result.s_star, weight[0].double(), 0.0, Margin(15.0))
        assert float(con) <= 1e-8
    assert norms["none"] > 100.0  # the near-singular estimate: the test has teeth
    assert norms["oas"] < 10.0


# ---------------------------------------------------------------- baselines


class FakeAccuracy:
    """Stands in for ``head_accuracy``: a fixed (L, H) table; records the rows it was given."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, method, x_tr, y_tr, x_va, y_va):  # noqa: ANN001, ANN204
        self.calls.append((x_tr, y_tr, x_va, y_va))
        return self.table.clone()


def test_iti_shift_is_strength_times_population_std_along_the_mass_mean_direction(monkeypatch) -> None:
    import otguard.methods.baselines as baselines

    acts, tr, va = hand_bank(n_train=12, n_val=8)
    table = torch.tensor([[0.60, 0.90], [0.75, 0.80]])  # top 3: (0, 1), (1, 1), (1, 0)
    fake = FakeAccuracy(table)
    monkeypatch.setattr(baselines, "head_accuracy", fake)
    strength = 2.5
    policy = get_method("iti", top_k=3, strength=strength, progress=False).fit(acts, tr, va).policy_
    x_tr, y_tr, x_va, _ = fake.calls[0]
    assert torch.equal(x_tr, acts.acts[tr].float()) and torch.equal(x_va, acts.acts[va].float())
    assert policy.meta["heads"] == [[0, 1], [1, 1], [1, 0]]
    x, y = acts.acts[tr].double(), acts.labels[tr]
    edits = {e.layer: e for e in policy.layers}
    assert sorted(edits) == [0, 1]
    assert edits[0].head_mask.tolist() == [False, True] and edits[1].head_mask.tolist() == [True, True]
    for layer, head in ((0, 1), (1, 1), (1, 0)):
        a = x[:, layer, head]
        direction = a[y == 0].mean(0) - a[y == 1].mean(0)
        unit = direction / direction.norm()
        proj = a @ unit
        sigma = ((proj - proj.mean()) ** 2).mean().sqrt()  # population std (ITI: np.std)
        shift = edits[layer].b[head].double()
        torch.testing.assert_close(shift, strength * sigma * unit, rtol=1e-6, atol=1e-6)
        assert float(shift.norm()) == pytest.approx(strength * float(sigma), rel=1e-6)
        assert abs(float(shift.norm()) - strength * float(proj.std())) > 1e-3  # ddof 1 differs (n = 12)
    assert torch.equal(edits[0].b[0], torch.zeros(DH))  # the unselected head is not moved


def test_iti_ranks_heads_by_validation_not_training_accuracy() -> None:
    """Head (0, 1) separates the training rows best but carries no signal on validation: not chosen."""
    g = torch.Generator().manual_seed(5)
    n_tr, n_va = 80, 40
    n = n_tr + n_va
    y = torch.tensor([i % 2 for i in range(n)])
    x = 0.3 * torch.randn(n, 1, 3, 2, generator=g)
    sign = 2.0 * y.float() - 1.0
    x[:, 0, 0, 0] += 1.0 * sign  # informative everywhere
    x[:, 0, 1, 0] += 3.0 * sign  # most separable in training ...
    x[n_tr:, 0, 1, 0] -= 3.0 * sign[n_tr:]  # ... but pure noise on validation
    x[:, 0, 2, 0] += 0.4 * sign  # weakly informative everywhere
    acts = ActivationSet(x.half(), y, torch.arange(n), {})
    policy = (
        get_method("iti", top_k=2, epochs=200, progress=False)
        .fit(acts, np.arange(n_tr), np.arange(n_tr, n))
        .policy_
    )
    assert policy.meta["heads"] == [[0, 0], [0, 2]]


def test_mean_shift_is_strength_times_class_mean_difference_of_training_rows(monkeypatch) -> None:
    import otguard.methods.baselines as baselines

    acts, tr, va = hand_bank()
    fake = FakeAccuracy(torch.tensor([[0.7, 0.7], [0.9, 0.6]]))  # layer means 0.70 vs 0.75: layer 1
    monkeypatch.setattr(baselines, "head_accuracy", fake)
    x, y = acts.acts[tr].double(), acts.labels[tr]
    for layer_param, want_layer in ((None, 1), (0, 0)):
        policy = (
            get_method("mean-shift", strength=3.0, layer=layer_param, progress=False)
            .fit(acts, tr, va)
            .policy_
        )
        (edit,) = policy.layers
        assert edit.layer == want_layer and policy.meta["layer"] == want_layer
        assert edit.head_mask.tolist() == [True, True] and edit.threshold is None and edit.A is None
        want = 3.0 * (x[y == 0, want_layer].mean(0) - x[y == 1, want_layer].mean(0))
        torch.testing.assert_close(edit.b.double(), want, rtol=1e-6, atol=1e-6)
        every = acts.acts.double()[:, want_layer]
        wrong = 3.0 * (every[acts.labels == 0].mean(0) - every[acts.labels == 1].mean(0))
        assert (wrong - want).abs().max() > 0.05  # train + validation rows would give another shift
    assert len(fake.calls) == 1  # the layer was only searched when not given
