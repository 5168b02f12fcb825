"""Evaluation: judges and metrics used by SLIM's Stage 3 and by the comparison harness."""
