"""Evaluation that needs no download: the demo's classifier-based sample metrics (demo_eval.py).

ADM-compatible FID / sFID / IS / precision / recall on ImageNet live in `fcdm_jax.evaluate`.
"""

from fcdm_jax.evaluation.demo_eval import (DigitClassifier, check_demo_eval, evaluate_samples,
                                           load_or_train_classifier, run_demo_eval)

__all__ = ["DigitClassifier", "check_demo_eval", "evaluate_samples", "load_or_train_classifier",
           "run_demo_eval"]
