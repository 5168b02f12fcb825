"""otguard: detect-then-repair attention-head interventions (RADIANT, SLIM) for Hugging Face LMs."""

__version__ = "0.1.0"
