"""The hook's per-position record, monitor mode and the summed edited-heads count.

- ``handle.records()`` equals, entry for entry, the explicit reference's log (tests/reference/
  explicit_policy.py: one row, position, layer and head at a time, float64): vote counts, layer
  flags, edited heads, and edited heads whose probe calls them desirable after the edit / after the
  full map; for every rule, for the three scopes (per-row answer starts included), with a KV cache
  and inside ``generate`` with left padding.
- Monitor mode leaves the logits bit-identical to the plain model's, and its counts equal repair
  mode's on the first hooked layer of the same forward (the later layers see edited inputs in repair
  mode) and the reference's in monitor mode on every layer.
- "Edited heads per flagged position" sums over layers: a hand-made two-layer policy that flags
  every position on both layers with 3 and 4 edited heads gives 7 (the old mean per layer gave 3.5).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from otguard.decoding import cache_kwarg
from otguard.errors import PolicyError
from otguard.hook import attached
from otguard.policy import LayerEdit, Policy
from otguard.sites import model_identity
from tests.reference.explicit_policy import ExplicitPolicy
from tests.unit.test_policy import PAD, VOCAB, batch, left_padded, logits_of, random_policy, tiny_llama

torch.set_num_threads(1)

FIELDS = ("votes", "layer_flagged", "edited", "desirable", "mapped_desirable")


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


def expected_records(ref: ExplicitPolicy, n_layers: int) -> list[dict[str, torch.Tensor]]:
    """The reference log regrouped as ``handle.records()`` lays it out: per row, by call then position."""
    rows: dict[int, dict[tuple[int, int], dict[int, dict[str, int]]]] = {}
    for (call, row, position, layer), entry in ref.log.items():
        rows.setdefault(row, {}).setdefault((call, position), {})[layer] = entry
    out = []
    for row in range(max(rows) + 1 if rows else 0):
        keys = sorted(rows.get(row, {}))
        entries = [rows[row][k] for k in keys]
        assert all(len(e) == n_layers for e in entries)
        rec = {"positions": torch.tensor([k[1] for k in keys], dtype=torch.long)}
        names = {"layer_flagged": "flagged"}
        for field in FIELDS:
            values = [[e[i][names.get(field, field)] for i in range(n_layers)] for e in entries]
            rec[field] = torch.tensor(values, dtype=torch.long).reshape(-1, n_layers)
        rec["layer_flagged"] = rec["layer_flagged"].bool()
        rec["flagged"] = rec["layer_flagged"].any(-1)
        out.append(rec)
    return out


def assert_records_equal(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w)
        for key in w:
            assert torch.equal(g[key], w[key]), f"row {i}, {key}: {g[key].tolist()} != {w[key].tolist()}"


def both_branches(ref: ExplicitPolicy) -> None:
    """The inputs exercise flagged and unflagged positions, and edits the probe still calls undesirable."""
    entries = list(ref.log.values())
    assert any(e["flagged"] for e in entries) and not all(e["flagged"] for e in entries)
    assert sum(e["desirable"] for e in entries) > 0


@pytest.mark.parametrize("mode", ["repair", "monitor"])
@pytest.mark.parametrize("rule", ["replace", "kappa-p", "shift"])
@pytest.mark.parametrize(("scope", "padding"), [("all", "right"), ("answer", "left"), ("generation", "none")])
def test_records_match_reference(llama, rule, scope, padding, mode):
    thresholds = (2, 3) if rule != "shift" else (2, None)
    policy = random_policy(llama, rule=rule, thresholds=thresholds, scope=scope)
    ids, mask = batch(padding, 3)
    starts = torch.tensor([4, 6, 7])

    def run(handle: Any) -> torch.Tensor:
        if scope == "answer":
            handle.set_answer_start(starts)
        return logits_of(llama, ids, mask)

    with policy.attach(llama, mode=mode, record=True) as handle:
        got_logits = run(handle)
        got = handle.records()
        stats = handle.stats()
    with ExplicitPolicy(policy, llama, mode=mode) as ref:
        want_logits = run(ref)
    want = expected_records(ref, len(policy.layers))
    assert_records_equal(got, want)
    if scope != "generation":
        both_branches(ref)
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=1e-4)
    # Per-row stats are the records' any-layer flags; the totals agree with them.
    per_row = handle.stats_per_row()
    for row, rec in zip(per_row, want, strict=True):
        n, k = rec["flagged"].numel(), int(rec["flagged"].sum())
        assert row == {"positions": float(n), "flagged_positions": float(k), "flag_rate": k / n if n else 0.0,
                       "flagged": k > 0}  # fmt: skip
    n_flagged = sum(r["flagged_positions"] for r in per_row)
    assert stats["flagged_positions"] == ref.n_flagged_positions == n_flagged
    assert stats["edited_heads"] == ref.n_edited_heads == sum(int(r["edited"].sum()) for r in got)
    if scope == "answer":  # per-row starts: row i's positions begin at starts[i]
        assert [int(r["positions"][0]) for r in got] == starts.tolist()


@pytest.mark.parametrize("rule", ["replace", "kappa-p"])
def test_records_with_kv_cache_steps(llama, rule):
    """A prompt forward with a cache, then single-token steps: the records carry absolute positions."""
    from transformers import DynamicCache

    policy = random_policy(llama, rule=rule, scope="all")
    ids, mask = batch("left", 3, length=8)
    steps = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))

    def run() -> None:
        cache = {cache_kwarg(llama): DynamicCache()}
        am = mask
        llama(input_ids=ids, attention_mask=am, **cache, use_cache=True)
        for t in range(steps.shape[1]):
            am = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
            llama(input_ids=steps[:, t : t + 1], attention_mask=am, **cache, use_cache=True)

    with torch.no_grad():
        with policy.attach(llama, record=True) as handle:
            run()
            got = handle.records()
        with ExplicitPolicy(policy, llama) as ref:
            run()
    assert_records_equal(got, expected_records(ref, len(policy.layers)))
    assert [r["positions"].tolist() for r in got] == [list(range(12))] * 3
    both_branches(ref)


def test_records_in_generate_and_stats_per_row_end(llama):
    """Inside ``generate`` (left padding): the last prompt token and every fed-back generated token,
    reset by each ``generate`` call; ``end`` cuts each row's positions."""
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (5, 9, 7)]
    ids, mask = left_padded(prompts)
    W, new = ids.shape[1], 6
    kw = {"max_new_tokens": new, "do_sample": False, "pad_token_id": PAD}
    policy = random_policy(llama, rule="kappa-p", scope="generation")
    with torch.no_grad():
        with policy.attach(llama, record=True) as handle:
            llama.generate(input_ids=ids[:1, -5:], **kw)  # another sequence first: reset drops it
            out = llama.generate(input_ids=ids, attention_mask=mask, **kw)
            got = handle.records()
            per_row = handle.stats_per_row(end=[W - 1 + 2, W - 1 + new, W - 1])
        with ExplicitPolicy(policy, llama) as ref:
            ref.reset()
            want_out = llama.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, want_out)
    assert_records_equal(got, expected_records(ref, len(policy.layers)))
    assert [r["positions"].tolist() for r in got] == [list(range(W - 1, W - 1 + new))] * 3
    flags = [r["flagged"] for r in got]
    assert [p["positions"] for p in per_row] == [2.0, float(new), 0.0]
    assert per_row[0]["flagged_positions"] == float(flags[0][:2].sum())
    assert per_row[1]["flagged"] == bool(flags[1].any()) and per_row[2]["flagged"] is False


def test_monitor_leaves_logits_and_counts_as_repair(llama):
    ids, mask = batch("left", 3)
    plain = logits_of(llama, ids, mask)
    policy = random_policy(llama, rule="replace", scope="all")
    with policy.attach(llama, mode="monitor", record=True) as handle:
        monitored = logits_of(llama, ids, mask)
        mon = handle.records()
    with policy.attach(llama, mode="repair", record=True) as handle:
        repaired = logits_of(llama, ids, mask)
        rep = handle.records()
    assert torch.equal(monitored, plain)
    assert not torch.allclose(repaired, plain, atol=1e-3)
    for m, r in zip(mon, rep, strict=True):  # the first hooked layer sees the same input in both modes
        for key in FIELDS:
            assert torch.equal(m[key][:, 0], r[key][:, 0])
    assert any(bool(r["layer_flagged"][:, 0].any()) for r in rep)
    # A single-layer policy: every count of the forward is the same in both modes, without records too.
    single = random_policy(llama, rule="kappa-p", thresholds=(2,), layers=(1,), with_A=(True,), scope="all")
    counts = {}
    for mode in ("monitor", "repair"):
        with attached(single, llama, mode=mode) as handle:
            out = logits_of(llama, ids, mask)
            counts[mode] = handle.stats()
        if mode == "monitor":
            assert torch.equal(out, plain)
    assert counts["monitor"] == counts["repair"]
    assert 0 < counts["repair"]["flagged_positions"] < ids.numel()


def test_monitor_in_generate_equals_plain(llama):
    ids, mask = left_padded([torch.arange(3, 9), torch.arange(20, 31)])
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    policy = random_policy(llama, rule="replace", scope="generation")
    with torch.no_grad():
        plain = llama.generate(input_ids=ids, attention_mask=mask, **kw)
        with policy.attach(llama, mode="monitor", record=True) as handle:
            monitored = llama.generate(input_ids=ids, attention_mask=mask, **kw)
            records = handle.records()
        with policy.attach(llama) as handle:
            repaired = llama.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(monitored, plain)
    assert not torch.equal(repaired, plain)
    assert [r["positions"].numel() for r in records] == [8, 8]


def edit(layer: int, *, bias: float, n_mask: int, threshold: int = 1) -> LayerEdit:
    H, d = 4, 8
    mask = torch.zeros(H, dtype=torch.bool)
    mask[:n_mask] = True
    return LayerEdit(layer=layer, probe_weight=torch.zeros(H, d), probe_bias=torch.full((H,), bias),
                     threshold=threshold, head_mask=mask, b=torch.ones(H, d) * 0.1,
                     A=torch.eye(d).expand(H, d, d).clone())  # fmt: skip


def test_edited_heads_per_flag_sums_over_layers():
    """Hand-made: probe weights 0, bias +9 (every head votes, every position flagged) or -9 (none)."""
    model = tiny_llama(1, n_layers=2)
    ident = model_identity(model)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    both = Policy("hand", "replace", [edit(0, bias=9.0, n_mask=3), edit(1, bias=9.0, n_mask=4)], ident,
                  scope="all")  # fmt: skip
    with both.attach(model) as handle:
        model(ids)
        stats = handle.stats()
    want = {"positions": 20.0, "flag_rate": 1.0, "flagged_positions": 10.0, "position_flag_rate": 1.0}
    assert stats == {**want, "edited_heads": 70.0, "edited_heads_per_flag": 7.0}
    one = Policy("hand", "replace", [edit(0, bias=9.0, n_mask=3), edit(1, bias=-9.0, n_mask=4)], ident,
                 scope="all")  # fmt: skip
    with one.attach(model) as handle:
        model(ids)
        stats = handle.stats()
    assert stats["flag_rate"] == 0.5 and stats["flagged_positions"] == 10.0
    assert stats["edited_heads_per_flag"] == 3.0
    # Post-edit desirable share: weights 0 and bias +9 mean the probe calls every edit undesirable.
    with both.attach(model, record=True) as handle:
        model(ids)
        rec = handle.records()
    assert [r["edited"].tolist() for r in rec] == [[[3, 4]] * 5] * 2
    assert all(int(r["desirable"].sum()) == 0 for r in rec)
    # clear() zeroes the counters.
    with both.attach(model) as handle:
        model(ids)
        handle.clear()
        assert handle.stats()["positions"] == 0.0 and handle.stats()["edited_heads"] == 0.0
        model(ids[:1])
        assert handle.stats()["flagged_positions"] == 5.0


def test_bad_mode_and_records_without_record(llama):
    policy = random_policy(llama, scope="all")
    with pytest.raises(PolicyError, match="mode"):
        policy.attach(llama, mode="watch")  # type: ignore[arg-type]
    with policy.attach(llama) as handle, pytest.raises(PolicyError, match="record=True"):
        handle.records()
    assert not llama._forward_pre_hooks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["repair", "monitor"])
def test_record_and_monitor_hooks_do_not_sync_on_cuda(mode):
    from tests.unit.test_cuda import hooks_fail_on_sync

    model = tiny_llama(0).cuda()
    policy = random_policy(tiny_llama(0), rule="kappa-p", scope="generation")
    ids = torch.randint(3, VOCAB, (3, 7), device="cuda")
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": PAD}
    with policy.attach(model, mode=mode, record=True) as handle:
        with hooks_fail_on_sync(handle._handles):
            model.generate(ids, **kw)
        records = handle.records()
        stats = handle.stats()
    cpu_model = tiny_llama(0)
    with policy.attach(cpu_model, mode=mode, record=True) as handle:
        cpu_model.generate(ids.cpu(), **kw)
        want = handle.records()
    assert [r["positions"].tolist() for r in records] == [list(range(6, 11))] * 3
    assert stats["flagged_positions"] == sum(int(r["flagged"].sum()) for r in records)
    for g, w in zip(records, want, strict=True):
        assert torch.equal(g["flagged"], w["flagged"])
