"""Adapters that plug otguard policies into other tools (optional extras; imported on demand).

- :mod:`otguard.integrations.lm_eval`: the ``otguard`` model type of lm-evaluation-harness
  (``pip install "otguard[lm-eval]"``).
"""
