"""Contract tests for every registered method on synthetic activation banks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import otguard
from otguard.activations import ActivationSet
from otguard.errors import DataError, NotFittedError
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
    """RADIANT's margin with the reference constraint lands past the boundary (method.md §9.5)."""
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
