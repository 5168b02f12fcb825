"""Evaluation: MC scoring, judged generation, side effects, semantic similarity, toxicity.

Submodules are imported on demand (some pull in sentence-transformers or matplotlib):
:mod:`~otguard.evaluation.truthfulqa_mc` (``score_mc``), :mod:`~otguard.evaluation.truthfulqa_gen`
(``generate_answers``), :mod:`~otguard.evaluation.judges` (``SemJudge``, ``ReferenceOverlapJudge``,
``OpenAIJudge``), :mod:`~otguard.evaluation.drift` (``measure_drift``, ``measure_drift_many``),
:mod:`~otguard.evaluation.semantic`, :mod:`~otguard.evaluation.toxicity` (scorers and metrics) and
:mod:`~otguard.evaluation.toxicity_gen` (prompt sources, ``sample_continuations``,
``continuation_perplexity``).
"""
