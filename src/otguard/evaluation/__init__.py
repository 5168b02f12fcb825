"""Evaluation: MC scoring, judged generation, side effects, semantic similarity, toxicity.

One module per concept; submodules are imported on demand (some pull in sentence-transformers,
sacrebleu or rouge-score):

- Truthfulness: :mod:`~otguard.evaluation.truthfulqa_mc` (``score_mc``),
  :mod:`~otguard.evaluation.truthfulqa_gen` (``generate_answers``).
- Judging generated answers: :mod:`~otguard.evaluation.verdicts` (``JudgeResult``, the ``Judge``
  protocol, the refusal heuristic), :mod:`~otguard.evaluation.overlap` (TruthfulQA's BLEU / ROUGE-L
  via sacrebleu / rouge-score, ``ReferenceOverlapJudge``), :mod:`~otguard.evaluation.semantic`
  (embeddings, SEM, ``SemJudge``), :mod:`~otguard.evaluation.llm_judge` (``OpenAIJudge``).
- Toxicity: :mod:`~otguard.evaluation.toxicity_gen` (prompt sources, ``sample_continuations``,
  ``continuation_perplexity``: the one perplexity implementation),
  :mod:`~otguard.evaluation.toxicity_scorers` (``ToxicityScorer`` protocol, offline scorers),
  :mod:`~otguard.evaluation.perspective` (``PerspectiveScorer``),
  :mod:`~otguard.evaluation.toxicity_metrics` (expected max, probability, mean, distinct-n,
  ``mean_perplexity``).
- Side effects: :mod:`~otguard.evaluation.drift` (``measure_drift``, ``measure_drift_many``).
- :mod:`~otguard.evaluation.factory`: ``make_judge`` / ``make_scorer`` from CLI names.
- ``_http``: the one retry policy and JSON request helper of the two HTTP clients.
"""
