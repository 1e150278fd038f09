"""The evaluators a training run calls (`config.eval`), built here so that the loop knows
none of them: `fcdm_jax.main` hands `make_evaluators` to `train_and_evaluate`.

An evaluator is an object with `every_steps` (0: only when training completes) and
`__call__(step, ema_params, writer) -> dict`, which samples with the EMA params, scores
the samples and writes `eval/*` scalars. It checks its settings when it is built, so a run
whose evaluation cannot work fails before training.
"""

from __future__ import annotations

KINDS = ("fid", "demo", "colour_digits")
# config.eval fields that are not sampler settings (the others override config.preview's).
EVAL_ONLY = ("enabled", "kind", "every_steps", "num_samples", "batch_size", "unguided",
             "inception", "reference", "captions", "clip")


def sample_settings(config) -> dict:
  """The preview's sampler settings with `config.eval`'s overrides (sampler, steps, ...)."""
  from fcdm_jax.train import preview
  cfg = preview.sample_settings(config)
  cfg.update({k: v for k, v in config.eval.to_dict().items()
              if k not in EVAL_ONLY and v is not None})
  return cfg


def check_count(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.eval.{name} must be an integer >= {minimum}, got {value!r}")
  return value


def make_evaluators(config, mesh, workdir: str) -> list:
  """The run's evaluators (none unless config.eval.enabled), checked now."""
  if not config.eval.enabled:
    return []
  kind = config.eval.kind
  check_count("every_steps", config.eval.every_steps, 0)
  if kind == "fid":
    from fcdm_jax.evaluation.fid_eval import FidEvaluator
    return [FidEvaluator(config, mesh)]
  if kind == "demo":
    from fcdm_jax.demo.digit_judge import DemoJudge
    return [DemoJudge(config, mesh, workdir)]
  if kind == "colour_digits":
    from fcdm_jax.demo.colour_digit_judge import ColourDigitEvaluator
    return [ColourDigitEvaluator(config, mesh, workdir)]
  raise ValueError(f"unknown config.eval.kind {kind!r}; expected one of {KINDS}")
