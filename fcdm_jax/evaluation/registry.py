"""The evaluators a training run may call, by name: one line each in `EVALUATORS`.

An evaluator is a class built as `cls(config, mesh, workdir)` with `every_steps` (0: only
when training completes) and `__call__(step, ema_params, writer) -> dict`, which samples
with the EMA params, scores the samples and writes `eval/*` scalars. It checks its
settings when it is built, so a run whose evaluation cannot work fails before training.

`config.eval.kind` names one evaluator or several, comma-separated ("fid,demo");
`make_evaluators` builds them (the loop knows none of them: `fcdm_jax.main` hands
`make_evaluators` to `train_and_evaluate`). Classes are named by `module:Class` and
imported only when built, so the demo's judges register here without an import cycle.

To add an evaluator: write its module (a class as above) and one line below.
"""

from __future__ import annotations

import importlib

EVALUATORS: dict[str, str] = {
    "fid": "fcdm_jax.evaluation.fid_eval:FidEvaluator",
    "demo": "fcdm_jax.demo.digit_judge:DemoJudge",
    "colour_digits": "fcdm_jax.demo.colour_digit_judge:ColourDigitEvaluator",
    "sample_stats": "fcdm_jax.evaluation.sample_stats:SampleStats",
}


def check_count(name: str, value, minimum: int) -> int:
  """`config.eval.<name>` as an integer >= minimum; ValueError naming it otherwise."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.eval.{name} must be an integer >= {minimum}, got {value!r}")
  return value


def eval_counts(config, min_samples: int) -> tuple[int, int, int]:
  """(num_samples, batch_size, every_steps) of config.eval, checked (an evaluator's basics)."""
  ev = config.eval
  return (check_count("num_samples", ev.num_samples, min_samples),
          check_count("batch_size", ev.batch_size, 1), check_count("every_steps", ev.every_steps, 0))


def evaluator_names(kind: str) -> list[str]:
  """The registered names `config.eval.kind` lists; ValueError for an unknown or repeated
  one, or none."""
  names = [n.strip() for n in str(kind).split(",") if n.strip()]
  if not names:
    raise ValueError(f"config.eval.kind {kind!r} names no evaluator; expected one or more "
                     f"(comma-separated) of {tuple(EVALUATORS)}")
  for name in names:
    if name not in EVALUATORS:
      raise ValueError(f"unknown config.eval.kind {name!r}; expected one or more "
                       f"(comma-separated) of {tuple(EVALUATORS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.eval.kind {kind!r} names an evaluator twice")
  return names


def evaluator_class(name: str) -> type:
  """The class registered as `name` (imports its module)."""
  module, _, attr = EVALUATORS[name].partition(":")
  return getattr(importlib.import_module(module), attr)


def make_evaluators(config, mesh, workdir: str) -> list:
  """The run's evaluators, one per name of config.eval.kind (none unless
  config.eval.enabled), each checked now."""
  if not config.eval.enabled:
    return []
  names = evaluator_names(config.eval.kind)
  check_count("every_steps", config.eval.every_steps, 0)
  return [evaluator_class(name)(config, mesh, workdir) for name in names]
