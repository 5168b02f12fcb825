"""The model behind the learned judges: features, fitting, prediction, saving (no pickle).

See :mod:`~otguard.evaluation.learned_judge` for what the judge is and how it was chosen; this module
holds :class:`LearnedClassifier` (one verdict: P("yes" | question, answer)) and
:func:`fit_classifier`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import sparse

from otguard.data.qa import QAItem, normalize_question
from otguard.errors import DataError, ModelLoadError
from otguard.evaluation.learned_judge_data import (
    LabelledAnswers,
    answer_key,
)
from otguard.evaluation.verdicts import check_answers, correct_references, is_uninformative
from otguard.io import atomic_dir, package_version

logger = logging.getLogger(__name__)

__all__ = [
    "FORMAT_VERSION",
    "INFO_LABEL",
    "TRUTH_LABEL",
    "JudgeSettings",
    "LearnedClassifier",
    "fit_classifier",
]

FORMAT_VERSION = 1
_MODEL_JSON, _MODEL_TENSORS = "judge.json", "judge.safetensors"
_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(
    "the a an of to in is are was were be it that this and or for on with as by at from".split()  # noqa: SIM905
)
_NEGATIONS = frozenset(
    "not no never nothing none nobody don't doesn't isn't aren't can't cannot won't didn't wasn't "  # noqa: SIM905
    "weren't".split()
)
#: Column labels of the two verdicts (the harness prints them as table headers).
TRUTH_LABEL, INFO_LABEL = "True (learned judge)", "Info (learned judge)"


@dataclass(frozen=True)
class JudgeSettings:
    """Everything besides the data that decides the fitted judge (part of its cache key)."""

    seed: int = 0
    c_words: float = 30.0  # inverse L2 strength of the step-1 regression
    folds: int = 5  # cross-fitting folds of the step-1 scores
    hidden: int = 32  # units of the step-3 network
    epochs: int = 400  # full-batch Adam steps of the step-3 network
    lr: float = 0.01
    weight_decay: float = 1e-4

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Text features
# --------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _grams(text: str) -> list[str]:
    w = _words(text)
    return [*w, *(a + "_" + b for a, b in zip(w, w[1:], strict=False)), f"<len{min(len(w) // 4, 8)}>"]


def _content(text: str) -> frozenset[str]:
    return frozenset(w for w in _words(text) if w not in _STOP)


def _f1(a: frozenset[str], b: frozenset[str]) -> float:
    common = len(a & b)
    return 0.0 if common == 0 else 2.0 * common / (len(a) + len(b))


def _docs(answers: Sequence[str], qids: Sequence[int]) -> list[list[str]]:
    """Step-1 documents: each gram on its own and tied to its question (``qid < 0``: unknown question)."""
    out = []
    for text, q in zip(answers, qids, strict=True):
        g = _grams(text)
        out.append(g + [f"{q}|{x}" for x in g] if q >= 0 else g)
    return out


class _Tfidf:
    """TF-IDF (sublinear tf, smoothed idf, L2 rows) over a fixed vocabulary: stored as plain arrays."""

    def __init__(self, vocab: list[str], idf: np.ndarray) -> None:
        self.vocab, self.idf = vocab, idf
        self.index = {g: i for i, g in enumerate(vocab)}

    @classmethod
    def fit(cls, docs: list[list[str]]) -> _Tfidf:
        df: dict[str, int] = {}
        for d in docs:
            for g in set(d):
                df[g] = df.get(g, 0) + 1
        vocab = sorted(df)
        idf = np.log((1.0 + len(docs)) / (1.0 + np.array([df[g] for g in vocab], dtype=np.float64))) + 1.0
        return cls(vocab, idf)

    def transform(self, docs: list[list[str]]) -> sparse.csr_matrix:
        rows, cols, vals = [], [], []
        for r, d in enumerate(docs):
            counts: dict[int, int] = {}
            for g in d:
                j = self.index.get(g)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            for j, c in sorted(counts.items()):
                rows.append(r)
                cols.append(j)
                vals.append((1.0 + math.log(c)) * self.idf[j])
        x = sparse.csr_matrix((vals, (rows, cols)), shape=(len(docs), len(self.vocab)), dtype=np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ x


def _fit_words(docs: list[list[str]], y: np.ndarray, c: float) -> tuple[_Tfidf, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    tfidf = _Tfidf.fit(docs)
    reg = LogisticRegression(C=c, max_iter=5000).fit(tfidf.transform(docs), y)
    return tfidf, reg.coef_.ravel().astype(np.float64), float(reg.intercept_[0])


def _score_words(model: tuple[_Tfidf, np.ndarray, float], docs: list[list[str]]) -> np.ndarray:
    tfidf, coef, intercept = model
    return np.asarray(tfidf.transform(docs) @ coef).ravel() + intercept


def _cross_fit_words(
    answers: Sequence[str],
    qids: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    s: JudgeSettings,
    unseen: bool,
) -> np.ndarray:
    """Step-1 scores of the training answers, each from a model that did not see its group.

    ``unseen``: the groups are questions, and a held-out answer is scored without its question tie
    (as a new question is at judging time)."""
    out = np.zeros(len(answers))
    distinct = np.unique(groups)
    fold_of = dict(
        zip(
            distinct.tolist(), np.random.default_rng(s.seed).permutation(len(distinct)) % s.folds, strict=True
        )
    )
    fold = np.array([fold_of[g] for g in groups.tolist()])
    for k in range(s.folds):
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if len(te) == 0 or len(np.unique(y[tr])) < 2:
            continue
        model = _fit_words(_docs([answers[i] for i in tr.tolist()], qids[tr].tolist()), y[tr], s.c_words)
        te_q = np.full(len(te), -1) if unseen else qids[te]
        out[te] = _score_words(model, _docs([answers[i] for i in te.tolist()], te_q.tolist()))
    return out


@dataclass
class _Memory:
    """The labelled answers and references of every known question, as word sets."""

    questions: tuple[str, ...]
    correct: list[list[frozenset[str]]]
    incorrect: list[list[frozenset[str]]]
    correct_keys: list[list[str]]
    incorrect_keys: list[list[str]]
    by_question: dict[int, list[tuple[frozenset[str], int, int]]] = field(default_factory=dict)

    @classmethod
    def build(cls, data: LabelledAnswers, rows: np.ndarray) -> _Memory:
        mem = cls(
            data.questions,
            [[_content(r) for r in refs] for refs in data.correct_refs],
            [[_content(r) for r in refs] for refs in data.incorrect_refs],
            [[answer_key(r) for r in refs] for refs in data.correct_refs],
            [[answer_key(r) for r in refs] for refs in data.incorrect_refs],
        )
        for i in rows.tolist():
            q = int(data.question_ids[i])
            mem.by_question.setdefault(q, []).append(
                (_content(data.answers[i]), int(data.labels[i]), int(data.keys[i]))
            )
        return mem


def _features(
    answer: str,
    question: str,
    refs: tuple[list[frozenset[str]], list[frozenset[str]], list[str], list[str]],
    labelled: list[tuple[frozenset[str], int, int]] | None,
    exclude_key: int,
) -> list[float]:
    """Step-2 features of one answer; ``labelled=None`` for a question without labelled answers."""
    a = _content(answer)
    own = answer_key(answer)
    ok = [_f1(a, r) for r, k in zip(refs[0], refs[2], strict=True) if k != own] or [0.0]
    bad = [_f1(a, r) for r, k in zip(refs[1], refs[3], strict=True) if k != own] or [0.0]
    words = _words(answer)
    out = [
        max(ok),
        max(bad),
        max(ok) - max(bad),
        float(sum(w in _NEGATIONS for w in words)),
        math.log1p(len(words)),
        float(is_uninformative(answer)),
        _f1(a, _content(question)),
    ]
    if labelled is not None:
        mem = [(s, lab) for s, lab, k in labelled if k != exclude_key]
        yes = [_f1(a, s) for s, lab in mem if lab == 1] or [0.0]
        no = [_f1(a, s) for s, lab in mem if lab == 0] or [0.0]
        prior = float(np.mean([lab for _, lab in mem])) if mem else 0.5
        out += [max(yes), max(no), max(yes) - max(no), prior, math.log1p(len(mem))]
    return out


class _Net(torch.nn.Module):
    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def _fit_net(x: np.ndarray, y: np.ndarray, s: JudgeSettings) -> dict[str, torch.Tensor]:
    """Full-batch Adam on standardised features; seeded, so the same inputs give the same weights."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.as_tensor((x - mean) / std, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = _Net(x.shape[1], s.hidden)
    opt = torch.optim.Adam(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(s.epochs):
        opt.zero_grad()
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["mean"] = torch.as_tensor(mean, dtype=torch.float32)
    state["std"] = torch.as_tensor(std, dtype=torch.float32)
    return state


def _run_net(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    hidden = state["body.0.weight"].shape[0]
    net = _Net(state["body.0.weight"].shape[1], hidden)
    net.load_state_dict({k: v for k, v in state.items() if k.startswith("body.")})
    xt = (torch.as_tensor(x, dtype=torch.float32) - state["mean"]) / state["std"]
    with torch.no_grad():
        return torch.sigmoid(net(xt)).double().numpy()


# --------------------------------------------------------------------------------------------------
# One learned verdict (truth, or informativeness)
# --------------------------------------------------------------------------------------------------


class LearnedClassifier:
    """One fitted verdict: P("yes" | question, answer) from the labelled answers it was fitted on.

    Build it with :func:`fit_classifier` (or :func:`train_or_load`, which caches), save it with
    :meth:`save`, read it back with :meth:`load`.
    """

    def __init__(
        self,
        data: LabelledAnswers,
        words: tuple[_Tfidf, np.ndarray, float],
        nets: dict[str, dict[str, torch.Tensor]],
        meta: dict[str, Any],
    ) -> None:
        self.data, self.words, self.nets, self.meta = data, words, nets, meta
        self.memory = _Memory.build(data, np.arange(len(data)))
        self._qindex = {normalize_question(q): i for i, q in enumerate(data.questions)}
        self._exact: dict[tuple[int, str], list[int]] = {}
        for q, a, lab in zip(data.question_ids.tolist(), data.answers, data.labels.tolist(), strict=True):
            self._exact.setdefault((q, answer_key(a)), []).append(lab)

    def predict_proba(self, items: Sequence[QAItem], answers: Sequence[str]) -> np.ndarray:
        """``(n,)`` probability of "yes" per answer. A question is *known* when the labels cover it."""
        check_answers(items, answers)
        qids = [self._qindex.get(normalize_question(it.question), -1) for it in items]
        scores = _score_words(self.words, _docs(list(answers), qids))
        out = np.zeros(len(answers))
        for regime in ("seen", "unseen"):
            rows = [
                i
                for i, q in enumerate(qids)
                if (q >= 0 and q in self.memory.by_question) == (regime == "seen")
            ]
            if not rows:
                continue
            feats = []
            for i in rows:
                it, q = items[i], qids[i]
                refs = (
                    [_content(r) for r in correct_references(it)],
                    [_content(r) for r in it.incorrect_answers],
                    [answer_key(r) for r in correct_references(it)],
                    [answer_key(r) for r in it.incorrect_answers],
                )
                labelled = self.memory.by_question[q] if regime == "seen" else None
                feats.append([scores[i], *_features(answers[i], it.question, refs, labelled, -1)])
            out[rows] = _run_net(self.nets[regime], np.asarray(feats, dtype=np.float64))
        for i, (q, a, it) in enumerate(zip(qids, answers, items, strict=True)):
            own = answer_key(a)
            labels = self._exact.get((q, own)) if q >= 0 else None
            if labels:  # the people's label of this very answer
                out[i] = float(np.mean(labels))
            elif self.meta.get("kind") == "truth":  # a reference answer, verbatim
                is_ok = own in {answer_key(r) for r in correct_references(it)}
                if is_ok != (own in {answer_key(r) for r in it.incorrect_answers}):
                    out[i] = float(is_ok)
        return out

    # ---- persistence -------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the classifier to ``folder`` atomically (JSON + safetensors, no pickle)."""
        from safetensors.torch import save_file

        tfidf, coef, intercept = self.words
        tensors = {"idf": torch.from_numpy(tfidf.idf.copy()), "coef": torch.from_numpy(coef.copy())}
        for regime, state in self.nets.items():
            tensors.update({f"{regime}.{k}": v.contiguous() for k, v in state.items()})
        d = self.data
        doc = {
            "format": "otguard-learned-judge",
            "format_version": FORMAT_VERSION,
            "meta": self.meta,
            "intercept": intercept,
            "vocab": tfidf.vocab,
            "questions": list(d.questions),
            "correct_refs": [list(r) for r in d.correct_refs],
            "incorrect_refs": [list(r) for r in d.incorrect_refs],
            "answers": list(d.answers),
            "labels": d.labels.tolist(),
            "question_ids": d.question_ids.tolist(),
        }
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / _MODEL_TENSORS))
            (tmp / _MODEL_JSON).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LearnedClassifier:
        """Read a classifier written by :meth:`save`; a broken or foreign folder is a ModelLoadError."""
        from safetensors.torch import load_file

        root = Path(folder).expanduser()
        try:
            doc = json.loads((root / _MODEL_JSON).read_text(encoding="utf-8"))
            tensors = load_file(str(root / _MODEL_TENSORS))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"{root} holds no readable learned judge ({exc}); train one with train_or_load() or point "
                "to a folder written by LearnedClassifier.save()."
            ) from exc
        if doc.get("format") != "otguard-learned-judge" or doc.get("format_version") != FORMAT_VERSION:
            raise ModelLoadError(
                f"{root}: not a learned judge of format version {FORMAT_VERSION} (found "
                f"{doc.get('format')!r} version {doc.get('format_version')!r}); retrain it with this otguard."
            )
        answers = tuple(doc["answers"])
        qids = np.asarray(doc["question_ids"], dtype=np.int64)
        keys: dict[tuple[int, str], int] = {}
        data = LabelledAnswers(
            questions=tuple(doc["questions"]),
            correct_refs=tuple(tuple(r) for r in doc["correct_refs"]),
            incorrect_refs=tuple(tuple(r) for r in doc["incorrect_refs"]),
            answers=answers,
            labels=np.asarray(doc["labels"], dtype=np.int64),
            question_ids=qids,
            is_reference=np.zeros(len(answers), dtype=bool),
            keys=np.asarray(
                [
                    keys.setdefault((q, answer_key(a)), len(keys))
                    for q, a in zip(qids.tolist(), answers, strict=True)
                ],
                dtype=np.int64,
            ),
        )
        tfidf = _Tfidf(list(doc["vocab"]), tensors["idf"].double().numpy())
        nets: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            regime, _, key = name.partition(".")
            if regime in ("seen", "unseen"):
                nets.setdefault(regime, {})[key] = value
        return cls(
            data, (tfidf, tensors["coef"].double().numpy(), float(doc["intercept"])), nets, doc["meta"]
        )


def fit_classifier(
    data: LabelledAnswers,
    settings: JudgeSettings | None = None,
    rows: np.ndarray | None = None,
    *,
    kind: str = "truth",
) -> LearnedClassifier:
    """Fit a classifier on the labelled answers ``rows`` (default all) of ``data``.

    ``kind`` ("truth" or "info") only changes one rule: a truth judge calls an answer that is verbatim
    one of the question's correct (incorrect) references true (false) when no label covers it."""
    s = settings or JudgeSettings()
    rows = np.arange(len(data)) if rows is None else np.asarray(rows, dtype=np.int64)
    sub = _subset(data, rows)
    if len(np.unique(sub.labels)) < 2:
        raise DataError("The labels hold a single class; a judge needs both 'yes' and 'no' answers.")
    t0 = time.perf_counter()
    answers, qids, y = list(sub.answers), sub.question_ids, sub.labels
    words = _fit_words(_docs(answers, qids.tolist()), y, s.c_words)
    mem = _Memory.build(sub, np.arange(len(sub)))
    nets = {}
    for regime in ("seen", "unseen"):
        unseen = regime == "unseen"
        groups = qids if unseen else sub.keys
        scores = _cross_fit_words(answers, qids, y, groups, s, unseen)
        feats = []
        for i, q in enumerate(qids.tolist()):
            refs = (mem.correct[q], mem.incorrect[q], mem.correct_keys[q], mem.incorrect_keys[q])
            labelled = None if unseen else mem.by_question.get(q, [])
            feats.append(
                [scores[i], *_features(answers[i], sub.questions[q], refs, labelled, int(sub.keys[i]))]
            )
        nets[regime] = _fit_net(np.asarray(feats, dtype=np.float64), y, s)
    meta = {
        "kind": kind,
        "settings": asdict(s),
        "n_train": len(sub),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "otguard_version": package_version(),
    }
    return LearnedClassifier(sub, words, nets, meta)


def _subset(data: LabelledAnswers, rows: np.ndarray) -> LabelledAnswers:
    return LabelledAnswers(
        questions=data.questions,
        correct_refs=data.correct_refs,
        incorrect_refs=data.incorrect_refs,
        answers=tuple(data.answers[i] for i in rows.tolist()),
        labels=data.labels[rows],
        question_ids=data.question_ids[rows],
        is_reference=data.is_reference[rows],
        keys=data.keys[rows],
    )
