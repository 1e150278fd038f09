"""Evaluation of samples during training: FID-k with Inception (fid_eval.py) and the demo's
classifier judge (demo_eval.py), both built by `hooks.make_evaluators` from config.eval.

ADM-compatible FID / sFID / IS / precision / recall of a finished sample batch live in
`fcdm_jax.evaluate`.
"""

from fcdm_jax.evaluation.demo_eval import (DemoJudge, DigitClassifier, check_demo_eval,
                                           evaluate_samples, load_or_train_classifier,
                                           run_demo_eval)
from fcdm_jax.evaluation.hooks import make_evaluators

__all__ = ["DemoJudge", "DigitClassifier", "check_demo_eval", "evaluate_samples",
           "load_or_train_classifier", "make_evaluators", "run_demo_eval"]
