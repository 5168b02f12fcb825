"""Saved (fold, method) results: round trip, refusal of another configuration or model, force, bad files."""

from __future__ import annotations

import json
import math

import pytest

from otguard.errors import ConfigError
from otguard.harness.paired import ItemValues
from otguard.harness.resume import PartialResult, PartialStore
from otguard.results import FoldRecord

CONFIG = {"dataset": "truthfulqa", "folds": 2, "limit": 40, "methods": ["none", "slim"]}
MODEL = {"name": "tiny", "dtype": "float32"}


def _result(fold: int = 0, method: str = "slim") -> PartialResult:
    record = FoldRecord(
        fold=fold, policy={"layers": [1], "kappa": 10.0}, seconds=1.25, meta={"test_questions": 20}
    )
    metrics = {"mc1": 0.1 + 0.2, "ppl": float("nan"), "kl": 1e-300}
    rows = [{"fold": fold, "method": method, "question": "Q?", "answer": 'A, "quoted"', "true": True}]
    items = {"test": ItemValues(["Q?", "R?"], {"true": [1.0, 0.0], "mc2": [0.1 + 0.2, float("nan")]})}
    return PartialResult(fold, method, metrics, record, rows, judge_name="sem:minilm", items=items)


def test_save_and_load_round_trip_exactly(tmp_path) -> None:
    store = PartialStore(tmp_path, CONFIG)
    key = store.open(MODEL)
    path = store.save(_result())
    assert path.name == "fold0-slim.json"
    assert json.loads(path.read_text())["key"] == key
    loaded = PartialStore(tmp_path, CONFIG)
    loaded.open(MODEL)
    (got,) = loaded.load().values()
    want = _result()
    assert got.metrics["mc1"] == want.metrics["mc1"] == 0.30000000000000004  # floats survive exactly
    assert got.metrics["kl"] == 1e-300 and math.isnan(got.metrics["ppl"])
    assert got.record.to_dict() == want.record.to_dict()
    assert got.rows == want.rows and got.judge_name == "sem:minilm"
    # the per-question values the bootstrap and repair/harm need survive exactly
    assert got.items["test"].ids == ["Q?", "R?"] and got.items["test"].values["true"] == [1.0, 0.0]
    assert got.items["test"].values["mc2"][0] == 0.30000000000000004 and math.isnan(
        got.items["test"].values["mc2"][1]
    )
    assert loaded.saved_pairs() == {(0, "slim")}


def test_another_configuration_is_refused_with_the_differences(tmp_path) -> None:
    store = PartialStore(tmp_path, CONFIG)
    store.open(MODEL)
    store.save(_result())
    with pytest.raises(ConfigError) as info:
        PartialStore(tmp_path, {**CONFIG, "limit": 20, "folds": 3})
    text = str(info.value)
    assert "folds: 2 saved, 3 now" in text and "limit: 40 saved, 20 now" in text
    assert "pass --force to discard them" in text
    with pytest.raises(ConfigError, match="pass force=True"):
        PartialStore(tmp_path, {**CONFIG, "limit": 20}, force_hint="force=True")


def test_another_model_is_refused(tmp_path) -> None:
    PartialStore(tmp_path, CONFIG).open(MODEL)
    store = PartialStore(tmp_path, CONFIG)  # same configuration: accepted before the model loads
    with pytest.raises(ConfigError, match="dtype: 'float32' saved, 'bfloat16' now"):
        store.open({**MODEL, "dtype": "bfloat16"})


def test_force_discards_only_the_saved_results(tmp_path) -> None:
    store = PartialStore(tmp_path, CONFIG)
    store.open(MODEL)
    store.save(_result(0, "none"))
    store.save(_result(1, "slim"))
    (store.folder / "my-notes.txt").write_text("mine")
    fresh = PartialStore(tmp_path, {**CONFIG, "limit": 20}, force=True)
    assert sorted(p.name for p in fresh.folder.iterdir()) == ["my-notes.txt"]
    fresh.open(MODEL)
    assert fresh.load() == {}
    only_ours = PartialStore(tmp_path / "b", CONFIG)
    only_ours.open(MODEL)
    only_ours.save(_result())
    PartialStore(tmp_path / "b", CONFIG, force=True)
    assert not only_ours.folder.exists()  # an emptied folder is removed


def test_unreadable_files_are_recomputed_and_foreign_keys_refused(tmp_path, caplog) -> None:
    store = PartialStore(tmp_path, CONFIG)
    store.open(MODEL)
    store.save(_result(0, "none"))
    (store.folder / "fold1-none.json").write_text('{"format": 1, "key": ')  # half a file (not atomic)
    assert set(store.load()) == {(0, "none")}
    assert "Ignoring unreadable saved result" in caplog.text
    assert not (store.folder / "fold1-none.json").exists()
    data = json.loads((store.folder / "fold0-none.json").read_text())
    data["key"] = "0123456789abcdef"
    (store.folder / "fold0-none.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="belongs to another run"):
        store.load()


def test_results_saved_by_the_previous_format_are_computed_again(tmp_path) -> None:
    store = PartialStore(tmp_path, CONFIG)
    store.open(MODEL)
    path = store.save(_result())
    data = json.loads(path.read_text())
    data["format"] = 1  # no per-question values: repair/harm and the bootstrap could not use it
    path.write_text(json.dumps(data))
    assert store.load() == {} and not path.exists()
