"""Stage-1 probes: batched training = the one-probe loop, real best checkpoint, ensembles, layer choice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from otguard.errors import DataError, OtguardError
from otguard.probes import (
    Detector,
    LayerReport,
    ProbeBank,
    choose_layer,
    ensemble_metrics,
    fit_detector,
    select_thresholds,
    train_probes,
)
from tests.reference.probe_loop import train_probes_loop

torch.set_num_threads(1)

L, H, D = 3, 4, 8
INFORMATIVE = [(0, 1), (1, 0), (1, 2), (2, 3)]


def gaussian_acts(
    n: int, seed: int, *, shift: float = 3.0, informative=INFORMATIVE, shape=(L, H, D)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced labels; informative heads get +shift along one fixed unit direction when y = 1.

    The class means are ``shift`` apart (Bayes accuracy Phi(shift / 2) ~ 0.93 for shift 3); every
    other head is the same N(0, I) for both classes (chance level).
    """
    gen = torch.Generator().manual_seed(seed)
    n_layers, n_heads, dim = shape
    y = torch.arange(n) % 2
    y = y[torch.randperm(n, generator=gen)]
    x = torch.randn((n, n_layers, n_heads, dim), generator=gen)
    direction = torch.nn.functional.normalize(torch.ones(dim), dim=0)
    for layer, head in informative:
        x[:, layer, head] += shift * y[:, None].float() * direction + 0.5
    return x, y


@pytest.fixture(scope="module")
def splits():
    x, y = gaussian_acts(400, seed=1)
    xv, yv = gaussian_acts(200, seed=2)
    xt, yt = gaussian_acts(2000, seed=3)
    return x, y, xv, yv, xt, yt


# --------------------------------------------------------------------------- training


def test_informative_heads_learn_and_noise_heads_stay_at_chance(splits):
    x, y, xv, yv, xt, yt = splits
    bank = train_probes(x, y, xv, yv, epochs=300, lr=3e-2, progress=False)
    acc = bank.head_metrics(xt, yt)["accuracy"]
    assert acc.shape == (L, H)
    informative = torch.zeros(L, H, dtype=torch.bool)
    for layer, head in INFORMATIVE:
        informative[layer, head] = True
    assert acc[informative].min() > 0.88
    assert (acc[~informative] - 0.5).abs().max() < 0.08


@pytest.mark.parametrize("loss", ["risk", "bce"])
@pytest.mark.parametrize("fnr_weight", [1.0, 2.5])
def test_batched_training_equals_one_probe_at_a_time_loop_float64(splits, loss, fnr_weight):
    x, y, xv, yv, _, _ = splits
    kw = dict(fnr_weight=fnr_weight, loss=loss, epochs=40, seed=3, lr=2e-2)
    bank = train_probes(x, y, xv, yv, dtype=torch.float64, progress=False, **kw)
    w_ref, b_ref, e_ref = train_probes_loop(x, y, xv, yv, dtype=torch.float64, **kw)
    torch.testing.assert_close(bank.weight, w_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(bank.bias, b_ref, rtol=1e-9, atol=1e-11)
    assert torch.equal(bank.best_epoch, e_ref)
    assert bank.weight.dtype == torch.float64


def test_float32_training_tracks_the_float64_loop(splits):
    x, y, xv, yv, _, _ = splits
    kw = dict(fnr_weight=1.5, epochs=60, seed=0, checkpoint="last")
    bank = train_probes(x, y, xv, yv, progress=False, **kw)
    w_ref, b_ref, _ = train_probes_loop(x, y, xv, yv, dtype=torch.float64, **kw)
    assert bank.weight.dtype == torch.float32
    torch.testing.assert_close(bank.weight.double(), w_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(bank.bias.double(), b_ref, rtol=0, atol=1e-4)


def test_float16_activations_are_computed_in_float32(splits):
    x, y, xv, yv, _, _ = splits
    x16, xv16 = x.half(), xv.half()
    a = train_probes(x16, y, xv16, yv, epochs=20, progress=False)
    b = train_probes(x16.float(), y, xv16.float(), yv, epochs=20, progress=False)
    assert a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_best_checkpoint_is_a_real_copy_of_an_earlier_epoch():
    # Validation labels are the opposite of training labels: the better the probes fit the training
    # set, the worse they do on validation, so every probe's best epoch is an early one.
    x, y = gaussian_acts(300, seed=5, informative=[(i, j) for i in range(L) for j in range(H)])
    xv, yv = gaussian_acts(200, seed=6, informative=[(i, j) for i in range(L) for j in range(H)])
    epochs = 80
    best = train_probes(x, y, xv, 1 - yv, epochs=epochs, lr=2e-2, progress=False)
    last = train_probes(x, y, xv, 1 - yv, epochs=epochs, lr=2e-2, checkpoint="last", progress=False)
    assert (best.best_epoch < epochs).all()
    assert (last.best_epoch == epochs).all()
    assert not torch.isclose(best.weight, last.weight).all(dim=-1).any()
    # Each probe's stored weights are exactly those it had after best_epoch Adam steps.
    for e in best.best_epoch.unique().tolist():
        short = train_probes(x, y, xv, 1 - yv, epochs=e, lr=2e-2, checkpoint="last", progress=False)
        mask = best.best_epoch == e
        assert torch.equal(best.weight[mask], short.weight[mask])
        assert torch.equal(best.bias[mask], short.bias[mask])
    # And it really is better on validation than the final weights.
    assert (best.head_metrics(xv, 1 - yv)["loss"] <= last.head_metrics(xv, 1 - yv)["loss"]).all()


def test_same_seed_is_deterministic_and_seeds_differ(splits):
    x, y, xv, yv, _, _ = splits
    state = torch.random.get_rng_state()
    a = train_probes(x, y, xv, yv, epochs=15, seed=7, progress=False)
    b = train_probes(x, y, xv, yv, epochs=15, seed=7, progress=False)
    c = train_probes(x, y, xv, yv, epochs=15, seed=8, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.isclose(a.weight, c.weight).all()


def test_bce_is_finite_and_learns_with_huge_activations(splits):
    x, y, xv, yv, xt, yt = splits
    scale = 1e4
    bank = train_probes(x * scale, y, xv * scale, yv, loss="bce", fnr_weight=2.0, epochs=50, progress=False)
    assert torch.isfinite(bank.weight).all() and torch.isfinite(bank.bias).all()
    logits = bank.logits(xt * scale)
    assert torch.isfinite(logits).all()
    assert ((bank.best_epoch >= 1) & (bank.best_epoch <= 50)).all()


def test_votes_are_strict_at_probability_one_half():
    bank = ProbeBank(
        weight=torch.zeros(1, 2, 3),
        bias=torch.tensor([[0.0, 1e-3]]),
        fnr_weight=1.0,
        loss="risk",
        best_epoch=torch.ones(1, 2, dtype=torch.int64),
    )
    x = torch.randn(5, 1, 2, 3)
    votes = bank.votes(x)
    assert votes.shape == (5, 1, 2) and votes.dtype == torch.bool
    assert not votes[:, 0, 0].any()  # p == 0.5 exactly is not a vote
    assert votes[:, 0, 1].all()
    torch.testing.assert_close(bank.probabilities(x)[:, 0, 0], torch.full((5,), 0.5))


def test_head_metrics_hand_made():
    # One head: logit = a (d = 1). y = [0, 0, 0, 1, 1]; a > 0 on examples 2, 3 -> FP 1 of 3, FN 1 of 2.
    bank = ProbeBank(torch.ones(1, 1, 1), torch.zeros(1, 1), 2.0, "risk", torch.ones(1, 1, dtype=torch.int64))
    x = torch.tensor([-1.0, -2.0, 1.0, 3.0, -0.5]).view(5, 1, 1, 1)
    m = bank.head_metrics(x, torch.tensor([0, 0, 0, 1, 1]))
    assert m["fpr"].item() == pytest.approx(1 / 3)
    assert m["fnr"].item() == pytest.approx(1 / 2)
    assert m["accuracy"].item() == pytest.approx(3 / 5)
    assert m["loss"].item() == pytest.approx(1 / 3 + 2.0 * 0.5)


# --------------------------------------------------------------------------- thresholds


def votes_from_counts(counts: list[list[int]], n_heads: int) -> torch.Tensor:
    """(N, L) vote counts -> (N, L, H) votes with the first ``count`` heads voting."""
    c = torch.tensor(counts)
    return torch.arange(n_heads).view(1, 1, -1) < c.unsqueeze(-1)


# Two heads, two layers. Layer 0: desirable counts [0, 0, 1, 2], undesirable [1, 2, 2, 2]:
#   tau=0: FPR 1,    FNR 0    | tau=1: FPR 0.5, FNR 0 | tau=2: FPR 0.25, FNR 0.25
# Layer 1: every example has 2 votes: all tau in {0, 1, 2} give FPR 1, FNR 0 (a full tie).
Y_T = [0, 0, 0, 0, 1, 1, 1, 1]
COUNTS = [[0, 2], [0, 2], [1, 2], [2, 2], [1, 2], [2, 2], [2, 2], [2, 2]]


@pytest.mark.parametrize(
    ("rule", "fnr_weight", "expected"),
    [
        ("slim", 1.0, [1, 0]),  # tau=1 and tau=2 tie at 0.5 -> the smaller tau; full tie -> 0
        ("slim", 0.5, [2, 0]),  # 0.25 + 0.125 < 0.5
        ("slim", 4.0, [1, 0]),  # 0.5 < 0.25 + 1.0
        ("radiant", 0.5, [1, 0]),  # zero FNR first: tau in {0, 1}, then lower loss -> 1
        ("radiant", 1.0, [1, 0]),
    ],
)
def test_select_thresholds_hand_made(rule, fnr_weight, expected):
    votes = votes_from_counts(COUNTS, 2)
    tau = select_thresholds(votes, torch.tensor(Y_T), fnr_weight=fnr_weight, rule=rule)
    assert tau.dtype == torch.int64
    assert tau.tolist() == expected


def test_select_thresholds_can_pick_all_heads_and_radiant_avoids_misses():
    # Three heads. Desirable counts [0, 1, 2, 2], undesirable [3, 3, 3, 1].
    # SLIM: tau=3 -> FPR 0, FNR 0.25 (loss 0.25) beats tau=1 (FPR 0.75, FNR 0).
    # RADIANT: only tau in {0, 1} miss nothing -> tau = 1, despite FPR 0.75.
    counts = [[0], [1], [2], [2], [3], [3], [3], [1]]
    votes = votes_from_counts(counts, 3)
    y = torch.tensor(Y_T)
    assert select_thresholds(votes, y, rule="slim").tolist() == [3]
    assert select_thresholds(votes, y, rule="radiant").tolist() == [1]


# --------------------------------------------------------------------------- ensemble metrics and layer


def test_ensemble_metrics_hand_made():
    votes = votes_from_counts(COUNTS, 2)
    report = ensemble_metrics(votes, torch.tensor(Y_T), torch.tensor([2, 1]), fnr_weight=2.0)
    assert isinstance(report, LayerReport)
    # Layer 0 at tau=2: flagged = [0,0,0,1 | 0,1,1,1] -> TP 3, FP 1, FN 1, TN 3.
    assert report.tp.tolist() == [3, 4]
    assert report.fp.tolist() == [1, 4]
    assert report.fn.tolist() == [1, 0]
    assert report.tn.tolist() == [3, 0]
    torch.testing.assert_close(report.fpr, torch.tensor([0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(report.fnr, torch.tensor([0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(report.accuracy, torch.tensor([0.75, 0.5], dtype=torch.float64))
    torch.testing.assert_close(report.f1, torch.tensor([0.75, 8 / 12], dtype=torch.float64))
    torch.testing.assert_close(report.loss, torch.tensor([0.75, 1.0], dtype=torch.float64))
    assert report.threshold.tolist() == [2, 1]
    rows = report.to_rows()
    assert rows[0]["layer"] == 0 and rows[1]["tp"] == 4 and rows[0]["threshold"] == 2
    d = json.loads(json.dumps(report.to_dict()))
    assert d["fnr_weight"] == 2.0 and d["loss"] == [0.75, 1.0]


def _report(loss: list[float]) -> LayerReport:
    t = torch.tensor(loss, dtype=torch.float64)
    z = torch.zeros(len(loss))
    zi = torch.zeros(len(loss), dtype=torch.int64)
    return LayerReport(t, t, z, z, zi, zi, zi, zi, t, zi)


def test_choose_layer_picks_lowest_loss_earliest_on_ties():
    report = _report([0.5, 0.3, 0.3, 0.4])
    assert choose_layer(report) == 1
    assert choose_layer(report, layers=[2, 3]) == 2
    assert choose_layer(report, layers=[-1, 0]) == 3
    heads = {"loss": torch.tensor([[0.125, 0.375], [0.5, 0.75], [0.25, 0.25], [0.125, 0.125]])}
    assert choose_layer(report, "mean-head-loss", head_metrics=heads) == 3
    assert choose_layer(report, "mean-head-loss", head_metrics=heads, layers=[0, 2]) == 0  # tie -> earlier
    with pytest.raises(ValueError, match="head_metrics"):
        choose_layer(report, "mean-head-loss")
    with pytest.raises(ValueError, match="criterion"):
        choose_layer(report, "accuracy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers"):
        choose_layer(report, layers=[4])


def test_fit_detector_chooses_the_informative_layer(splits):
    x, y, xv, yv, xt, yt = splits
    # Layer 1 has two informative heads, layers 0 and 2 one each.
    det = fit_detector(x, y, xv, yv, epochs=200, lr=3e-2, progress=False)
    assert isinstance(det, Detector) and isinstance(det.bank, ProbeBank)
    assert det.head_report["loss"].shape == (L, H)
    assert det.layer == 1
    assert det.thresholds.shape == (L,)
    assert det.report.loss[1] == det.report.loss.min()
    flags = det.flags(xt)
    assert flags.shape == (len(yt), L) and flags.dtype == torch.bool
    acc = (flags == yt.bool().unsqueeze(1)).float().mean(0)  # (L,) test accuracy of each layer's ensemble
    assert acc.argmax() == 1 and acc[1] > 0.75
    assert torch.equal(det.predict(xt), flags[:, 1])
    restricted = fit_detector(x, y, xv, yv, epochs=200, lr=3e-2, layers=[0, 2], progress=False)
    assert restricted.layer in (0, 2)
    radiant = fit_detector(
        x,
        y,
        xv,
        yv,
        epochs=200,
        lr=3e-2,
        threshold_rule="radiant",
        layer_criterion="mean-head-loss",
        progress=False,
    )
    assert radiant.report.fnr[radiant.layer] == 0  # RADIANT's rule: no validation misses
    assert radiant.layer == 1


def test_progress_bar_and_logging_run(splits, caplog):
    x, y, xv, yv, _, _ = splits
    with caplog.at_level("INFO", logger="otguard.probes"):
        train_probes(x, y, xv, yv, epochs=3, progress=True)
    assert any("probes" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- errors


def test_one_class_labels_raise_data_error_saying_what_to_do(splits):
    x, y, xv, yv, _, _ = splits
    with pytest.raises(
        DataError, match=r"y has only label 0 .*need both desirable \(0\) and undesirable \(1\)"
    ):
        train_probes(x, torch.zeros_like(y), xv, yv, epochs=1, progress=False)
    with pytest.raises(DataError, match="y_val has only label 1"):
        train_probes(x, y, xv, torch.ones_like(yv), epochs=1, progress=False)
    with pytest.raises(DataError, match="only label"):
        select_thresholds(votes_from_counts(COUNTS, 2), torch.zeros(8))
    with pytest.raises(DataError, match="only label"):
        fit_detector(x, y, xv, torch.zeros_like(yv), epochs=1, progress=False)


def test_bad_data_raises_data_error(splits):
    x, y, xv, yv, _, _ = splits
    with pytest.raises(DataError, match="empty"):
        train_probes(x[:0], y[:0], xv, yv, epochs=1, progress=False)
    with pytest.raises(DataError, match=r"shape \(400,\)"):
        train_probes(x, y[:10], xv, yv, epochs=1, progress=False)
    with pytest.raises(DataError, match=r"\(N, L, H, d\)"):
        train_probes(x[:, 0], y, xv, yv, epochs=1, progress=False)
    with pytest.raises(DataError, match="x_val has per-example shape"):
        train_probes(x, y, xv[:, :2], yv, epochs=1, progress=False)
    with pytest.raises(DataError, match="0/1 labels"):
        train_probes(x, y * 2, xv, yv, epochs=1, progress=False)
    bad = x.clone()
    bad[3, 1, 2, 0] = math.nan
    with pytest.raises(DataError, match="non-finite"):
        train_probes(bad, y, xv, yv, epochs=1, progress=False)
    bank = train_probes(x, y, xv, yv, epochs=1, progress=False)
    with pytest.raises(DataError, match="probes were trained on"):
        bank.votes(torch.zeros(2, L, H, D + 1))
    with pytest.raises(DataError, match="thresholds"):
        ensemble_metrics(bank.votes(xv), yv, torch.zeros(L + 1))
    # Both an otguard error and a ValueError.
    assert issubclass(DataError, OtguardError) and issubclass(DataError, ValueError)


def test_bad_arguments_raise_value_error(splits):
    x, y, xv, yv, _, _ = splits
    for kw in ({"loss": "mse"}, {"epochs": 0}, {"fnr_weight": -1.0}, {"lr": 0.0}, {"checkpoint": "first"}):
        with pytest.raises(ValueError):
            train_probes(x, y, xv, yv, progress=False, **kw)
    with pytest.raises(ValueError, match="rule"):
        select_thresholds(votes_from_counts(COUNTS, 2), torch.tensor(Y_T), rule="iti")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu(splits):
    x, y, xv, yv, _, _ = splits
    kw = dict(fnr_weight=2.0, epochs=30, lr=2e-2, dtype=torch.float64, progress=False)
    cpu = train_probes(x, y, xv, yv, **kw)
    gpu = train_probes(x, y, xv, yv, device="cuda", **kw)
    assert gpu.weight.is_cuda
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-9, atol=1e-11)
    assert torch.equal(gpu.best_epoch.cpu(), cpu.best_epoch)
    det = fit_detector(x, y, xv, yv, epochs=50, lr=3e-2, device="cuda", progress=False)
    assert det.flags(xv).shape == (len(yv), L)
