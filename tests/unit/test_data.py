"""Tests of otguard.data: parsing of every source layout, grouping, fingerprints and group-aware folds.

Unit tests run on the small hand-written fixtures in tests/fixtures/data/ (same layouts as the real
files). Tests marked ``slow`` check the documented counts on the real shared data and are skipped
when that folder is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from otguard.data import (
    DATA_DIR_ENV,
    QAItem,
    Split,
    TextDataset,
    from_file,
    group_kfold,
    group_split_by_names,
    load_dataset,
    nqopen_items,
    qa_items_from_csv,
    resolve_data_dir,
    toxigen_groups,
    toxigen_prompts,
    toxigen_statements,
    truthfulqa_items,
    truthfulqa_mc2,
)
from otguard.errors import DataError, DataFileNotFoundError, OtguardError

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "data"
USER = FIXTURES / "user"


def _shared_data_dir() -> Path | None:
    env = os.environ.get(DATA_DIR_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if (c / "truthfulqa" / "mc_task.json").is_file():
            return c
    return None


SHARED = _shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data folder (../shared/data) not present")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests pass data_dir explicitly; a developer's OTGUARD_DATA_DIR must not leak in."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _toy(n_groups: int = 11, seed: int = 0) -> TextDataset:
    """Groups of 1-4 examples with mixed labels, for fold tests."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, size=n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = np.arange(len(groups)) % 2
    texts = tuple(f"text {i} of group {g}" for i, g in enumerate(groups))
    return TextDataset("toy", texts, labels, groups, tuple(f"g{i}" for i in range(n_groups)))


# --------------------------------------------------------------------------------------------------
# resolve_data_dir


def test_resolve_data_dir_prefers_argument_then_env_then_none(monkeypatch, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(None) is None
    monkeypatch.setenv(DATA_DIR_ENV, str(other))
    assert resolve_data_dir(None) == other
    assert resolve_data_dir(FIXTURES) == FIXTURES


def test_resolve_data_dir_missing_folder_names_source_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(DataFileNotFoundError, match=DATA_DIR_ENV) as exc:
        resolve_data_dir(None)
    assert "nope" in str(exc.value) and "--data-dir" in str(exc.value)
    with pytest.raises(FileNotFoundError, match="data_dir argument"):
        resolve_data_dir(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# TextDataset


def test_textdataset_validates_shapes_and_labels():
    with pytest.raises(DataError, match="same length"):
        TextDataset("x", ("a", "b"), np.array([0]), np.array([0, 0]), ("g",))
    with pytest.raises(DataError, match="0 or 1"):
        TextDataset("x", ("a",), np.array([2]), np.array([0]), ("g",))
    with pytest.raises(DataError, match="group ids"):
        TextDataset("x", ("a",), np.array([1]), np.array([1]), ("g",))
    ds = TextDataset("x", ["a", "b"], [0, 1], [0, 0], ["g"])
    assert ds.labels.dtype == np.int64 and ds.groups.dtype == np.int64
    assert isinstance(ds.texts, tuple) and len(ds) == 2
    with pytest.raises(ValueError):
        ds.labels[0] = 1  # read-only: a fingerprint must not drift


def test_fingerprint_is_stable_known_value():
    ds = TextDataset("toy", ("a", "b"), np.array([0, 1]), np.array([0, 0]), ("q",))
    # Hard-coded: a change here invalidates every cache; bump _FINGERPRINT_VERSION on purpose only.
    assert ds.fingerprint() == "fa0c899f0f7078cac324a2fc5a9095e89595ab5e4531e02bff5fbd6fc19c5590"
    again = TextDataset("toy", ["a", "b"], [0, 1], [0, 0], ["q"])
    assert again.fingerprint() == ds.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"name": "toy2"},
        {"texts": ("a", "c")},
        {"texts": ("ab", "")},
        {"labels": np.array([1, 1])},
        {"groups": np.array([0, 1]), "group_names": ("q", "r")},
        {"group_names": ("other",)},
    ],
)
def test_fingerprint_changes_on_any_edit(change):
    base = {"name": "toy", "texts": ("a", "b"), "labels": np.array([0, 1]), "groups": np.array([0, 0])}
    base["group_names"] = ("q",)
    ref = TextDataset(**base).fingerprint()
    assert TextDataset(**{**base, **change}).fingerprint() != ref


def test_fingerprint_of_fixture_file_changes_when_file_is_edited(tmp_path):
    copy = tmp_path / "good.jsonl"
    shutil.copy(USER / "good.jsonl", copy)
    first = from_file(copy).fingerprint()
    assert from_file(copy).fingerprint() == first
    copy.write_text(copy.read_text().replace("flat", "FLAT"))
    assert from_file(copy).fingerprint() != first


def test_subset_select_limit_groups():
    ds = _toy()
    sub = ds.subset([3, 0])
    assert sub.texts == (ds.texts[3], ds.texts[0])
    assert sub.groups.tolist() == [ds.groups[3], ds.groups[0]] and sub.group_names == ds.group_names
    mask = ds.labels == 1
    assert len(ds.subset(mask)) == int(mask.sum())
    sel = ds.select_groups([2, 5])
    assert set(sel.groups.tolist()) == {2, 5} and len(sel) == int(np.isin(ds.groups, [2, 5]).sum())
    lim = ds.limit_groups(3)
    assert lim.n_groups == 3 and set(lim.groups.tolist()) == {0, 1, 2}
    assert lim.texts == tuple(t for t, g in zip(ds.texts, ds.groups, strict=True) if g < 3)
    assert ds.limit_groups(100) is ds
    with pytest.raises(DataError):
        ds.select_groups([99])
    with pytest.raises(DataError):
        ds.subset([len(ds)])
    with pytest.raises(DataError):
        ds.limit_groups(0)


def test_check_two_classes():
    ds = _toy()
    ds.check_two_classes()
    one = ds.subset(ds.labels == 1)
    with pytest.raises(DataError, match="only label 1") as exc:
        one.check_two_classes("probe training set")
    assert "probe training set" in str(exc.value) and "label 0" in str(exc.value)
    with pytest.raises(DataError, match="empty"):
        ds.subset([]).check_two_classes()


# --------------------------------------------------------------------------------------------------
# TruthfulQA


def test_truthfulqa_mc2_label_flip_grouping_and_counts():
    ds = truthfulqa_mc2(FIXTURES)
    assert ds.name == "truthfulqa-mc2"
    assert len(ds) == 8 and ds.n_groups == 3
    assert ds.texts[0] == "Q: What colour is the sky on a clear day? A: Blue."
    # MC2 1 = true -> label 0; 1 = false = undesirable.
    assert ds.labels.tolist() == [0, 0, 1, 0, 1, 1, 0, 1]
    assert ds.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert ds.group_names[2] == "Can pigs fly?"
    assert ds.class_counts() == (4, 4)


def test_truthfulqa_mc2_template():
    ds = truthfulqa_mc2(FIXTURES, template="Question: {question}\nAnswer: {answer}")
    assert ds.texts[-1] == "Question: Can pigs fly?\nAnswer: Yes, pigs can fly."
    with pytest.raises(DataError, match="template"):
        truthfulqa_mc2(FIXTURES, template="Q: {question} A: {choice}")
    with pytest.raises(DataError, match="answer"):
        truthfulqa_mc2(FIXTURES, template="Q: {question}")


def test_truthfulqa_items_match_csv_by_text():
    items = truthfulqa_items(FIXTURES)
    assert [it.question for it in items] == [
        "What colour is the sky on a clear day?",
        "How many legs does a spider have?",
        "Can pigs fly?",
    ]
    sky, spider, pigs = items
    assert sky.best_answer == "Blue" and sky.incorrect_answers == ("Green", "Red")
    assert sky.category == "Science"
    # CSV row has a doubled inner space and a trailing space: matched after whitespace normalisation.
    assert spider.correct_answers == ("Eight", "Spiders have eight legs") and spider.category == "Biology"
    # Trailing ";" and quoted commas.
    assert pigs.correct_answers == ("No, pigs cannot fly", "Pigs do not fly")
    assert pigs.mc1_targets == (("No, pigs cannot fly.", 1), ("Yes, pigs can fly.", 0))
    assert sky.mc2_targets == (("Blue.", 1), ("It is blue.", 1), ("Green.", 0))


def _copy_truthfulqa(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURES / "truthfulqa", tmp_path / "truthfulqa")
    return tmp_path


def test_truthfulqa_items_unmatched_question_is_an_error(tmp_path):
    root = _copy_truthfulqa(tmp_path)
    csv = root / "truthfulqa" / "TruthfulQA.csv"
    csv.write_text(
        csv.read_text(encoding="utf-8-sig").replace("Can pigs fly?", "Can cows fly?"), encoding="utf-8"
    )
    with pytest.raises(DataError, match="first unmatched: 'Can pigs fly\\?'") as exc:
        truthfulqa_items(root)
    assert "TruthfulQA.csv" in str(exc.value) and "1 of 3" in str(exc.value)


def test_truthfulqa_malformed_mc_file_names_file_and_entry(tmp_path):
    root = _copy_truthfulqa(tmp_path)
    path = root / "truthfulqa" / "mc_task.json"
    data = json.loads(path.read_text())
    data[1]["mc2_targets"]["Six."] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="entry 1") as exc:
        truthfulqa_mc2(root)
    assert "mc_task.json" in str(exc.value) and "Six." in str(exc.value)
    path.write_text('[{"question": "x",\n "mc1_targets": {}, ]')
    with pytest.raises(DataError, match="line 2"):
        truthfulqa_mc2(root)


def test_truthfulqa_missing_files_raise_with_hint(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="truthfulqa/mc_task.json") as exc:
        truthfulqa_mc2(tmp_path)
    assert "--data-dir" in str(exc.value) and DATA_DIR_ENV in str(exc.value)
    (tmp_path / "truthfulqa").mkdir()
    shutil.copy(FIXTURES / "truthfulqa" / "mc_task.json", tmp_path / "truthfulqa")
    with pytest.raises(DataFileNotFoundError, match="TruthfulQA.csv"):
        truthfulqa_items(tmp_path)


def test_truthfulqa_without_data_dir_and_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets") as exc:
        truthfulqa_mc2()
    assert "--data-dir" in str(exc.value)
    with pytest.raises(DataError, match="pip install datasets"):
        truthfulqa_items()


def _fake_hub(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[tuple[str, str, str]]:
    """A stand-in `datasets` module serving the fixture data in the Hub's schema."""
    mc = json.loads((FIXTURES / "truthfulqa" / "mc_task.json").read_text())
    gen = qa_items_from_csv(FIXTURES / "truthfulqa" / "TruthfulQA.csv")
    calls: list[tuple[str, str, str]] = []

    def load_dataset(name: str, config: str, split: str) -> list[dict]:
        calls.append((name, config, split))
        if fail:
            raise ConnectionError("no network")
        if config == "multiple_choice":
            return [
                {
                    "question": e["question"],
                    **{
                        k: {"choices": list(e[k]), "labels": list(e[k].values())}
                        for k in ("mc1_targets", "mc2_targets")
                    },
                }
                for e in mc
            ]
        return [
            {
                "type": "Adversarial",
                "category": it.category,
                "question": it.question,
                "best_answer": it.best_answer,
                "correct_answers": list(it.correct_answers),
                "incorrect_answers": list(it.incorrect_answers),
                "source": "",
            }
            for it in gen
        ]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_truthfulqa_hub_path_matches_local_files(monkeypatch):
    calls = _fake_hub(monkeypatch)
    hub = truthfulqa_mc2()
    assert hub.fingerprint() == truthfulqa_mc2(FIXTURES).fingerprint()
    assert truthfulqa_items() == truthfulqa_items(FIXTURES)
    assert calls[0] == ("truthfulqa/truthful_qa", "multiple_choice", "validation")
    assert ("truthfulqa/truthful_qa", "generation", "validation") in calls


def test_truthfulqa_hub_failure_is_a_data_error(monkeypatch):
    _fake_hub(monkeypatch, fail=True)
    with pytest.raises(DataError, match="ConnectionError: no network") as exc:
        truthfulqa_mc2()
    assert "--data-dir" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# QA CSVs: NQ-Open and transfer sets


def test_nqopen_items():
    items = nqopen_items(FIXTURES)
    assert len(items) == 2
    assert items[0] == QAItem(
        question="what is the capital of france",
        best_answer="Paris",
        correct_answers=("Paris", "the city of Paris"),
        incorrect_answers=("Lyon",),
        category="Misconceptions",
    )
    assert items[1].incorrect_answers == ("365", "364, maybe")


def test_nqopen_needs_a_local_folder(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        nqopen_items()
    with pytest.raises(DataFileNotFoundError, match="nqopen/NQOpen.csv"):
        nqopen_items(tmp_path)


def test_qa_items_from_csv_checks_columns_and_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(DataError, match="missing column") as exc:
        qa_items_from_csv(bad)
    assert "Correct Answers" in str(exc.value) and "bad.csv" in str(exc.value)
    bad.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\nq,a,a,b\n,a,a,b\n")
    with pytest.raises(DataError, match="line 3: empty Question"):
        qa_items_from_csv(bad)
    bad.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\nq,a,a,b,extra\n")
    with pytest.raises(DataError, match="line 2: 5 fields"):
        qa_items_from_csv(bad)
    with pytest.raises(DataFileNotFoundError):
        qa_items_from_csv(tmp_path / "none.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("Question,Best Answer,Correct Answers,Incorrect Answers\nq,a,,\n")
    assert qa_items_from_csv(ok) == [QAItem("q", "a", ("a",), ())]


# --------------------------------------------------------------------------------------------------
# ToxiGen


def test_toxigen_statements_from_prompts_split_and_dedup():
    ds = toxigen_statements(FIXTURES)
    assert ds.name == "toxigen-prompts"
    assert ds.group_names == ("asian", "mental_disability")
    asian_neutral = [t for t, y, g in zip(ds.texts, ds.labels, ds.groups, strict=True) if g == 0 and y == 0]
    asian_hate = [t for t, y, g in zip(ds.texts, ds.labels, ds.groups, strict=True) if g == 0 and y == 1]
    # Glued ". - " statement split; trailing " -" without "\n" dropped; duplicates removed.
    assert asian_neutral == [
        "neutral asian one",
        "neutral asian two.",
        "neutral asian three",
        "neutral asian four",
    ]
    # Extra backslashes before a separator are collapsed; dedup keeps first occurrence order.
    assert asian_hate == ["hate asian one", "hate asian two", "Hate Asian Three"]
    assert ds.groups.tolist() == [0] * 7 + [1] * 3
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 1, 1]
    assert not any("\\" in t or t.endswith("-") or t.startswith("-") for t in ds.texts)


def test_toxigen_demonstrations_map_file_names_to_groups():
    ds = toxigen_statements(FIXTURES, source="demonstrations")
    assert ds.group_names == ("asian", "mental_disability")
    by = {(ds.group_names[g], int(y)): [] for g, y in zip(ds.groups, ds.labels, strict=True)}
    for t, y, g in zip(ds.texts, ds.labels, ds.groups, strict=True):
        by[(ds.group_names[g], int(y))].append(t)
    # hate_asian.txt and hate_asian_sentences.txt both map to "asian".
    assert by[("asian", 1)] == ["HATE asian one", "hate asian demo", "hate asian sentence demo"]
    assert by[("mental_disability", 0)] == ["neutral md demo"]
    assert by[("mental_disability", 1)] == ["hate md demo"]


def test_toxigen_demonstration_group_mapping_variants(tmp_path):
    demo = tmp_path / "toxigen" / "demonstrations" / "religion"
    demo.mkdir(parents=True)
    (demo / "hate_muslim.txt").write_text("h1\nh2\n")
    (demo / "hate_muslim_sentences.txt").write_text("h2\nh3\n")
    (demo / "neutral_muslim.txt").write_text("n1\n")
    (demo / "neutral_native_american_sentences.txt").write_text("n2\n")
    (demo / "README.txt").write_text("not data\n")
    assert toxigen_groups(tmp_path) == ["muslim", "native_american"]
    ds = toxigen_statements(tmp_path, source="demonstrations", groups=["muslim"])
    assert ds.texts == ("n1", "h1", "h2", "h3") and ds.labels.tolist() == [0, 1, 1, 1]


def test_toxigen_both_sources_dedup_case_insensitively_across_files():
    ds = toxigen_statements(FIXTURES, source="both")
    assert ds.name == "toxigen-both"
    assert len(ds) == 10 + 5  # "HATE asian one" duplicates the prompt statement
    assert "HATE asian one" not in ds.texts and "hate asian demo" in ds.texts
    ds.check_two_classes()


def test_toxigen_group_filter_and_errors(tmp_path):
    ds = toxigen_statements(FIXTURES, groups=["mental_disability"])
    assert ds.group_names == ("mental_disability",) and set(ds.groups.tolist()) == {0}
    with pytest.raises(DataError, match="Unknown ToxiGen group") as exc:
        toxigen_statements(FIXTURES, groups=["martians"])
    assert "asian" in str(exc.value)
    with pytest.raises(DataError, match="source"):
        toxigen_statements(FIXTURES, source="web")  # type: ignore[arg-type]
    with pytest.raises(DataFileNotFoundError, match="toxigen/prompts"):
        toxigen_statements(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        toxigen_statements()


def test_toxigen_one_class_group_is_kept_and_logged(tmp_path, caplog):
    shutil.copytree(FIXTURES / "toxigen", tmp_path / "toxigen")
    (tmp_path / "toxigen" / "prompts" / "hate_trans_1k.txt").write_text("- hate trans one\\n-\n")
    ds = toxigen_statements(tmp_path)
    assert ds.group_names[-1] == "trans"
    assert ds.labels[ds.groups == 2].tolist() == [1]
    assert "no neutral" in caplog.text
    with pytest.raises(DataError, match="only label 1"):
        ds.select_groups([2]).check_two_classes()


def test_toxigen_prompts_decode_literal_newlines():
    prompts = toxigen_prompts(FIXTURES, kind="hate")
    assert [g for g, _ in prompts] == ["asian", "asian", "mental_disability"]
    assert prompts[0][1] == "- hate asian one\n- hate asian two\n-"
    assert prompts[1][1] == "- hate asian two\n- Hate Asian Three\n- hate asian one\n-"
    assert all(p.endswith("-") and "\\" not in p for _, p in prompts)
    neutral = toxigen_prompts(FIXTURES, kind="neutral", groups=["asian"], limit_per_group=1)
    assert neutral == [("asian", "- neutral asian one\n- neutral asian two. - neutral asian three\n-")]


def test_toxigen_prompts_errors(tmp_path):
    shutil.copytree(FIXTURES / "toxigen", tmp_path / "toxigen")
    (tmp_path / "toxigen" / "prompts" / "hate_trans_1k.txt").write_text("- hate trans one\\n-\n-\n")
    with pytest.raises(DataFileNotFoundError, match="neutral_trans_1k.txt"):
        toxigen_prompts(tmp_path, kind="neutral", groups=["trans"])
    assert [g for g, _ in toxigen_prompts(tmp_path, kind="neutral")] == [
        "asian",
        "asian",
        "mental_disability",
    ]
    with pytest.raises(DataError, match="hate_trans_1k.txt, line 2"):
        toxigen_prompts(tmp_path, groups=["trans"])
    with pytest.raises(DataError, match="kind"):
        toxigen_prompts(FIXTURES, kind="toxic")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="limit_per_group"):
        toxigen_prompts(FIXTURES, limit_per_group=0)


# --------------------------------------------------------------------------------------------------
# User files


def test_from_file_jsonl_with_groups():
    ds = from_file(USER / "good.jsonl")
    assert ds.name == "good" and len(ds) == 5
    assert ds.labels.tolist() == [1, 0, 0, 1, 0]
    assert ds.groups.tolist() == [0, 0, 1, 1, 2]
    assert ds.group_names == ("shape", "water", "cats")


def test_from_file_csv_without_group_column_gives_one_group_per_row():
    ds = from_file(USER / "good.csv")
    assert ds.texts[0] == "Paris is in France, in Europe." and ds.texts[2] == "A text that spans\ntwo lines."
    assert ds.labels.tolist() == [0, 1, 0, 1]
    assert ds.groups.tolist() == [0, 1, 2, 3]


def test_from_file_tsv_and_custom_columns(tmp_path):
    ds = from_file(USER / "good.tsv")
    assert ds.texts == ("Snow is cold.", "Snow is hot.") and ds.groups.tolist() == [0, 0]
    p = tmp_path / "custom.jsonl"
    p.write_text('{"comment": "hi", "toxic": 0, "topic": 7}\n{"comment": "grr", "toxic": 1, "topic": 7}\n')
    ds = from_file(p, text_column="comment", label_column="toxic", group_column="topic")
    assert ds.labels.tolist() == [0, 1] and ds.group_names == ("7",)


def test_from_file_json_array(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": 1}]))
    assert from_file(p).labels.tolist() == [0, 1]
    p.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": 2}]))
    with pytest.raises(DataError, match="record 1"):
        from_file(p)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("bad_json.jsonl", r"bad_json\.jsonl, line 3: malformed JSON"),
        ("bad_label.csv", r"bad_label\.csv, line 3: label column 'label' is 'yes'"),
        ("missing_label.jsonl", r"missing_label\.jsonl, line 2: missing column 'label'"),
    ],
)
def test_from_file_malformed_rows_name_file_and_line(name, pattern):
    with pytest.raises(DataError, match=pattern):
        from_file(USER / name)


@pytest.mark.parametrize("label", ["true", "1.0", "2", "-1"])
def test_from_file_labels_are_strict(tmp_path, label):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok", "label": 0}\n' + '{"text": "t", "label": ' + label + "}\n")
    with pytest.raises(DataError, match="line 2: label column"):
        from_file(p)


def test_from_file_other_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError):
        from_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        from_file(tmp_path / "data.parquet")
    p = tmp_path / "h.csv"
    p.write_text("sentence,label\nhi,0\n")
    with pytest.raises(DataError, match="line 1: missing column"):
        from_file(p)
    p.write_text("text,label,group\nhi,0,a\nho,1,\n")
    with pytest.raises(DataError, match="line 3: group column"):
        from_file(p)
    p.write_text("text,label\n   ,0\n")
    with pytest.raises(DataError, match="line 2: column 'text'"):
        from_file(p)
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        from_file(p)


def test_errors_are_also_builtin_exceptions():
    with pytest.raises(ValueError):
        from_file(USER / "bad_label.csv")
    with pytest.raises(FileNotFoundError):
        from_file(USER / "missing.csv")
    assert issubclass(DataError, OtguardError)


# --------------------------------------------------------------------------------------------------
# Registry


def test_load_dataset_registry_and_files():
    assert load_dataset("truthfulqa", FIXTURES).fingerprint() == truthfulqa_mc2(FIXTURES).fingerprint()
    assert load_dataset("toxigen", FIXTURES).name == "toxigen-prompts"
    assert len(load_dataset(str(USER / "good.jsonl"))) == 5
    with pytest.raises(DataError, match="truthfulqa") as exc:
        load_dataset("imdb")
    assert "toxigen" in str(exc.value)
    with pytest.raises(DataFileNotFoundError):
        load_dataset("missing.jsonl")


# --------------------------------------------------------------------------------------------------
# Folds


def _groups_of(ds: TextDataset, idx: np.ndarray) -> set[int]:
    return set(ds.groups[idx].tolist())


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("n_folds", [2, 3, 5])
def test_group_kfold_partitions_groups(n_folds, contiguous):
    ds = _toy(n_groups=17)
    test_groups: list[set[int]] = []
    for fold in range(n_folds):
        s = group_kfold(ds, n_folds, fold, contiguous=contiguous)
        assert isinstance(s, Split)
        for part in (s.train, s.val, s.test):
            assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
        # Every example in exactly one part; no group straddles two parts.
        assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), np.arange(len(ds)))
        tr, va, te = _groups_of(ds, s.train), _groups_of(ds, s.val), _groups_of(ds, s.test)
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert va  # validation is never empty with val_ratio > 0
        test_groups.append(te)
    # Test folds cover all groups exactly once.
    assert sorted(g for te in test_groups for g in te) == list(range(17))


def test_group_kfold_contiguous_blocks_match_method():
    ds = _toy(n_groups=817)
    s0, s1 = group_kfold(ds, 2, 0), group_kfold(ds, 2, 1)
    assert _groups_of(ds, s0.test) == set(range(409))
    assert _groups_of(ds, s1.test) == set(range(409, 817))
    # floor(408 * 0.8) = 326 train groups, 82 validation groups; floor(409 * 0.8) = 327 and 82.
    assert len(_groups_of(ds, s0.val)) == 82 and len(_groups_of(ds, s0.train)) == 326
    assert len(_groups_of(ds, s1.val)) == 82 and len(_groups_of(ds, s1.train)) == 327


def test_group_kfold_is_deterministic_and_uses_a_local_rng():
    ds = _toy(n_groups=30)
    np.random.seed(0)
    a = group_kfold(ds, 2, 1, seed=7, contiguous=False)
    np.random.seed(123)  # the global RNG must not matter
    np.random.random(10)
    b = group_kfold(ds, 2, 1, seed=7, contiguous=False)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    c = group_kfold(ds, 2, 1, seed=8, contiguous=False)
    assert not np.array_equal(a.test, c.test) or not np.array_equal(a.val, c.val)
    d = group_kfold(ds, 2, 1, seed=8)
    assert np.array_equal(d.test, group_kfold(ds, 2, 1, seed=9).test)  # contiguous test ignores seed
    assert np.array_equal(d.train_val, np.union1d(d.train, d.val))


def test_group_kfold_on_subset_uses_present_groups_only():
    ds = _toy(n_groups=12).select_groups(range(6, 12))
    s = group_kfold(ds, 2, 0, val_ratio=0.0)
    assert _groups_of(ds, s.test) == {6, 7, 8} and _groups_of(ds, s.train) == {9, 10, 11}
    assert s.val.size == 0


def test_group_kfold_errors():
    ds = _toy(n_groups=3)
    with pytest.raises(DataError, match="n_folds"):
        group_kfold(ds, 1, 0)
    with pytest.raises(DataError, match="fold must be in 0..1"):
        group_kfold(ds, 2, 2)
    with pytest.raises(DataError, match="3 group"):
        group_kfold(ds, 4, 0)
    with pytest.raises(DataError, match="Too few groups"):
        group_kfold(ds, 2, 0)  # test = groups 0-1; the pool's only group goes to validation
    with pytest.raises(DataError, match="val_ratio"):
        group_kfold(ds, 2, 0, val_ratio=1.0)


def test_group_split_by_names_holds_out_named_groups():
    ds = toxigen_statements(FIXTURES, source="both")
    s = group_split_by_names(ds, ["asian"], val_ratio=0.0, seed=0)
    assert _groups_of(ds, s.test) == {0} and _groups_of(ds, s.train) == {1}
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), np.arange(len(ds)))
    toy = TextDataset("t", tuple("abcdefgh"), [0, 1] * 4, [0, 0, 1, 1, 2, 2, 3, 3], ("w", "x", "y", "z"))
    s = group_split_by_names(toy, ["y"], val_ratio=0.3, seed=3)
    tr, va, te = _groups_of(toy, s.train), _groups_of(toy, s.val), _groups_of(toy, s.test)
    assert te == {2} and len(va) == 1 and len(tr) == 2 and not (tr & va) and not ((tr | va) & te)
    again = group_split_by_names(toy, ["y"], val_ratio=0.3, seed=3)
    assert np.array_equal(s.val, again.val)
    with pytest.raises(DataError, match="Unknown test group"):
        group_split_by_names(toy, ["v"])
    with pytest.raises(DataError, match="leave some"):
        group_split_by_names(toy, ["w", "x", "y", "z"])


# --------------------------------------------------------------------------------------------------
# Real shared data (slow; skipped when ../shared/data is absent)


@pytest.mark.slow
@needs_shared
def test_real_truthfulqa_mc2_counts():
    ds = truthfulqa_mc2(SHARED)
    assert len(ds) == 6204
    assert ds.class_counts() == (2835, 3369)  # 2,835 true (label 0) / 3,369 false (label 1)
    assert ds.n_groups == 817 and len(np.unique(ds.groups)) == 817
    assert ds.texts[0].startswith("Q: What happens if you eat a pomegranate? A: ")
    assert np.all(np.diff(ds.groups) >= 0)
    s0, s1 = group_kfold(ds, 2, 0), group_kfold(ds, 2, 1)
    assert _groups_of(ds, s0.test) == set(range(409)) and _groups_of(ds, s1.test) == set(range(409, 817))


@pytest.mark.slow
@needs_shared
def test_real_truthfulqa_items_all_matched():
    items = truthfulqa_items(SHARED)
    assert len(items) == 817
    mc2 = truthfulqa_mc2(SHARED)
    assert [it.question for it in items] == list(mc2.group_names)
    assert all(it.best_answer and it.correct_answers and it.incorrect_answers and it.category for it in items)
    assert all(it.mc1_targets and it.mc2_targets for it in items)
    assert sum(len(it.mc2_targets) for it in items) == 6204


@pytest.mark.slow
@needs_shared
def test_real_nqopen_count():
    items = nqopen_items(SHARED)
    assert len(items) == 3610
    assert all(it.best_answer and it.correct_answers and it.incorrect_answers for it in items)


@pytest.mark.slow
@needs_shared
def test_real_toxigen_groups_and_labels():
    groups = toxigen_groups(SHARED)
    assert len(groups) == 16 and "mental_disability" in groups and "trans" in groups
    for source in ("prompts", "both"):
        ds = toxigen_statements(SHARED, source=source)
        assert ds.group_names == tuple(groups)
        ds.check_two_classes()
        with_both = [g for i, g in enumerate(groups) if set(ds.labels[ds.groups == i].tolist()) == {0, 1}]
        # ToxiGen ships no neutral_trans_1k.txt: trans has hate statements only.
        assert set(groups) - set(with_both) == {"trans"}
        assert not any("\\n" in t or t.startswith("- ") for t in ds.texts)
    demo = toxigen_statements(SHARED, source="demonstrations")
    assert set(groups) - set(demo.group_names) == {"trans", "women"}
    hate = toxigen_prompts(SHARED, kind="hate")
    assert len(hate) == 16_000 and all(p.endswith("-") and p.startswith("- ") for _, p in hate)
    assert len(toxigen_prompts(SHARED, kind="neutral")) == 15_000
