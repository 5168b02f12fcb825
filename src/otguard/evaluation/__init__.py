"""Evaluation: MC scoring, judged generation, side effects, semantic similarity.

Submodules are imported on demand (some pull in sentence-transformers or matplotlib):
:mod:`~otguard.evaluation.truthfulqa_mc` (``score_mc``), :mod:`~otguard.evaluation.truthfulqa_gen`
(``generate_answers``), :mod:`~otguard.evaluation.judges` (``SemJudge``, ``ReferenceOverlapJudge``,
``OpenAIJudge``), :mod:`~otguard.evaluation.drift` (``measure_drift``), :mod:`~otguard.evaluation.semantic`.
"""
