"""Classifier-free guidance: one rule shared by the model's guided forward and every sampler."""

from __future__ import annotations

import jax.numpy as jnp

PUBLISHED_GUIDED_CHANNELS = 3  # the published code guides out[:, :3] only


def guided_channels(in_channels: int, guide_all_eps: bool) -> int:
  """How many leading output channels get guidance: 3 (published) or every eps channel."""
  return in_channels if guide_all_eps else PUBLISHED_GUIDED_CHANNELS


def combine_cfg(out, cfg_scale, num_guided: int):
  """`out` = model output on the batch [cond half; null-label half] (channels last).

  Returns the same shape: the first `num_guided` channels of both halves become
  `u + s * (c - u)`; the remaining channels pass through unguided.
  """
  guided, rest = out[..., :num_guided], out[..., num_guided:]
  cond, uncond = jnp.split(guided, 2, axis=0)
  mixed = uncond + cfg_scale * (cond - uncond)
  return jnp.concatenate([jnp.concatenate([mixed, mixed], axis=0), rest], axis=-1)
