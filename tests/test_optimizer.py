"""The learning-rate schedules and the optimizer's bad-input errors."""

import math

import numpy as np
import pytest

from fcdm_jax.train.state import learning_rate_fn, make_optimizer
from helpers.training import load_config


def _lr(config, step):
  return float(learning_rate_fn(config)(step))


def test_constant_is_the_published_default():
  config = load_config(**{"optimizer.learning_rate": 1e-4, "optimizer.warmup_steps": 0})
  assert config.optimizer.schedule == "constant"
  assert [_lr(config, s) for s in (0, 10, 10_000)] == pytest.approx([1e-4] * 3)


def test_constant_with_linear_warmup():
  config = load_config(**{"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 100})
  assert [_lr(config, s) for s in (0, 25, 100, 5000)] == pytest.approx([0, 2.5e-4, 1e-3, 1e-3])


def test_cosine_decays_after_warmup_to_the_final_fraction():
  config = load_config(num_train_steps=1100, **{
      "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 100,
      "optimizer.schedule": "cosine", "optimizer.final_lr_fraction": 0.1})
  peak, end = 2e-3, 2e-4
  assert _lr(config, 50) == pytest.approx(1e-3)
  assert _lr(config, 100) == pytest.approx(peak)
  # Halfway through the decay: the mean of peak and end.
  assert _lr(config, 600) == pytest.approx((peak + end) / 2, rel=1e-5)
  quarter = end + (peak - end) * (1 + math.cos(math.pi / 4)) / 2
  assert _lr(config, 350) == pytest.approx(quarter, rel=1e-5)
  assert _lr(config, 1100) == pytest.approx(end)
  lrs = np.array([_lr(config, s) for s in range(100, 1101, 50)])
  assert np.all(np.diff(lrs) < 0)


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.schedule": "linear"}, "optimizer.schedule must be 'constant' or 'cosine'"),
    ({"optimizer.schedule": "cosine", "optimizer.final_lr_fraction": 1.5}, "final_lr_fraction"),
    ({"optimizer.schedule": "cosine", "optimizer.warmup_steps": 50, "num_train_steps": 50},
     "needs num_train_steps"),
    ({"optimizer.warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"optimizer.learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_bad_settings_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    make_optimizer(load_config(**overrides))
