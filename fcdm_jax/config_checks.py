"""Start-up checks of a run config: a bad value is one ValueError naming the field, what it
may be and what it was, before any work (training, sampling, the benchmark, the preflight).

`check_config(config)` checks what every command that takes a config uses (the network,
the sampler's steps, scale and guidance interval, the data scale); `training=True` adds
what only a training run uses (batch, steps, checkpoints, optimizer, EMA, previews and
their guidance interval, evaluation). Checks that need the devices (a batch the mesh
divides) are the training loop's `check_run_setup`.
A field a config does not have (one saved before the field existed) is not checked.
"""

from __future__ import annotations

import math

from fcdm_jax.conditions import CONDITIONS
from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.objectives import OBJECTIVES, make_objective
from fcdm_jax.models.fcdm import REMAT_POLICIES
from fcdm_jax.models.layers import DWCONV_IMPLS, TEXT_EMBEDDERS

MODEL_DTYPES = ("float32", "bfloat16")   # compute dtypes (params stay float32)
SCHEDULES = ("constant", "cosine")

_MISSING = object()


def _get(config, field: str):
  node = config
  for part in field.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _bad(field: str, wanted: str, value) -> ValueError:
  return ValueError(f"config.{field} must be {wanted}, got {value!r} "
                    f"(set --config.{field}=...)")


def _number(config, field: str, low=None, high=None, *, integer=False, low_open=False,
            high_open=False, optional=False) -> None:
  """`config.field` is a finite number (an int when `integer`) in the bounds given."""
  value = _get(config, field)
  if value is _MISSING or (optional and value is None):
    return
  kind = "an integer" if integer else "a finite number"
  bounds = []
  if low is not None:
    bounds.append(f"{'>' if low_open else '>='} {low}")
  if high is not None:
    bounds.append(f"{'<' if high_open else '<='} {high}")
  wanted = kind + (" " + " and ".join(bounds) if bounds else "")
  ok_type = (isinstance(value, int) if integer else isinstance(value, (int, float)))
  if isinstance(value, bool) or not ok_type or not math.isfinite(value):
    raise _bad(field, wanted, value)
  if low is not None and (value <= low if low_open else value < low):
    raise _bad(field, wanted, value)
  if high is not None and (value >= high if high_open else value > high):
    raise _bad(field, wanted, value)


def _choice(config, field: str, allowed) -> None:
  value = _get(config, field)
  if value is not _MISSING and value not in allowed:
    raise ValueError(f"config.{field}={value!r} is not one of {', '.join(map(str, allowed))} "
                     f"(set --config.{field}=...)")


def _interval(config, section: str) -> None:
  """A section's guidance interval: LOW,HIGH inside the objective's time (or none)."""
  value = _get(config, f"{section}.cfg_interval")
  if value is not _MISSING and value is not None:
    guidance.check_interval(value, make_objective(config).time_range,
                            f"config.{section}.cfg_interval")


def check_config(config, *, training: bool = False) -> None:
  """Raises ValueError naming the first bad field of `config` (see the module docstring)."""
  _choice(config, "objective", OBJECTIVES)
  _choice(config, "model.dtype", MODEL_DTYPES)
  _choice(config, "model.remat", sorted(REMAT_POLICIES))
  _choice(config, "model.dwconv_impl", DWCONV_IMPLS)
  _choice(config, "model.condition", sorted(CONDITIONS))
  _choice(config, "model.text_embedder", TEXT_EMBEDDERS)
  for field in ("in_channels", "hidden_size", "num_classes", "text_dim"):
    _number(config, f"model.{field}", 1, integer=True)
  _number(config, "model.mlp_ratio", 0, low_open=True)
  _number(config, "model.class_dropout_prob", 0, 1, high_open=True)
  depth = _get(config, "model.depth")
  if depth is not _MISSING and (
      not isinstance(depth, (tuple, list)) or not depth
      or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depth)):
    raise _bad("model.depth", "a non-empty list of positive integers (blocks per level)",
               depth)
  for field in ("image_size", "latent_size"):
    _number(config, field, 1, integer=True)
  _number(config, "data.vae_scale", 0, low_open=True)
  _number(config, "sample.steps", 1, integer=True, optional=True)
  _number(config, "sample.cfg_scale", optional=True)
  _interval(config, "sample")
  if not training:
    return
  for field in ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints"):
    _number(config, field, 1, integer=True)
  _number(config, "profile_steps", 0, integer=True)
  _number(config, "grad_accum_steps", 1, integer=True)
  accum, batch = _get(config, "grad_accum_steps"), _get(config, "batch_size")
  if accum is not _MISSING and batch is not _MISSING and batch % accum:
    raise ValueError(f"config.batch_size={batch} is not divisible by config.grad_accum_steps="
                     f"{accum} (equal micro-batches); set --config.batch_size or "
                     "--config.grad_accum_steps=...")
  _number(config, "optimizer.learning_rate", 0, low_open=True)
  _number(config, "optimizer.weight_decay", 0)
  _number(config, "optimizer.b1", 0, 1, high_open=True)
  _number(config, "optimizer.b2", 0, 1, high_open=True)
  _number(config, "optimizer.eps", 0, low_open=True)
  _number(config, "optimizer.warmup_steps", 0, integer=True)
  _number(config, "optimizer.grad_clip_norm", 0)
  _choice(config, "optimizer.schedule", SCHEDULES)
  _number(config, "optimizer.final_lr_fraction", 0, 1)
  _number(config, "ema_decay", 0, 1)
  _number(config, "data.prefetch", 0, integer=True)
  _number(config, "data.num_workers", 1, integer=True)
  _number(config, "data.caption_dropout", 0, 1)
  _number(config, "preview.every_steps", 0, integer=True)
  _number(config, "preview.steps", 1, integer=True, optional=True)
  _number(config, "preview.cfg_scale", optional=True)
  _interval(config, "preview")
  _interval(config, "eval")
  _number(config, "eval.every_steps", 0, integer=True)
  if _get(config, "eval.enabled") is True:
    _number(config, "eval.num_samples", 1, integer=True)
    _number(config, "eval.batch_size", 1, integer=True)
