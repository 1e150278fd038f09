"""Scoring samples: ADM's metrics of a sample batch, and the evaluators a training run
calls (`make_evaluators`, chosen by name from `config.eval.kind`: registry.py)."""

from fcdm_jax.evaluation.registry import EVALUATORS, make_evaluators

__all__ = ["EVALUATORS", "make_evaluators"]
