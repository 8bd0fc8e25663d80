"""Evaluation with lm-eval-harness: the `scalejax` model type, task runs from Python."""
