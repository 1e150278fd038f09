"""Scoring samples: ADM's metrics of a sample batch, and the evaluators a training run
calls (`make_evaluators`, chosen by name from `config.eval`)."""

from fcdm_jax.evaluation.hooks import make_evaluators

__all__ = ["make_evaluators"]
