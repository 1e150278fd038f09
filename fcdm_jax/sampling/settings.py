"""The sampler settings of a run config, for every caller: one function, three sections.

`sampler_settings(config, "sample")` is config.sample (the sampling command, FID protocol),
`"preview"` config.preview without the grid's own fields (training previews), `"eval"` the
preview's settings with config.eval's sampler fields that are set (in-training evaluation
and the demo judges; None there means "the preview's"). `overrides` (the command line's)
come last; None values keep the section's. Every key must be a setting of a sampler that
serves the config's objective (`fcdm_jax.diffusion.samplers`), else ValueError naming the
allowed keys; the values themselves are checked when the sampler is made, except what every
sampler takes, checked here naming the flag or field: the guidance scale (a finite number)
and the guidance interval (`guidance.check_interval`: LOW,HIGH in the objective's time, or
'none'; it comes back as a (low, high) tuple or None).
"""

from __future__ import annotations

import math
from typing import Mapping

from fcdm_jax.diffusion import guidance, samplers
from fcdm_jax.diffusion.objectives import make_objective

SECTIONS = ("sample", "preview", "eval")
# Fields of config.preview and config.eval that are not sampler settings.
PREVIEW_ONLY = ("every_steps", "num_classes_shown", "per_class", "vae_dir")
EVAL_ONLY = ("enabled", "kind", "every_steps", "num_samples", "batch_size", "unguided",
             "inception", "reference", "captions", "clip")


def _section(config, name: str, exclude: tuple[str, ...]) -> dict:
  values = {k: v for k, v in config[name].to_dict().items() if k not in exclude}
  samplers.check_keys(values, config.objective, f"config.{name} sampler settings")
  return values


def sampler_settings(config, section: str, overrides: Mapping | None = None) -> dict:
  """The sampler settings of `section` ('sample', 'preview' or 'eval') of `config`, then
  `overrides` (None values keep the section's), as a plain dict."""
  if section == "sample":
    settings = _section(config, "sample", ())
  elif section == "preview":
    settings = _section(config, "preview", PREVIEW_ONLY)
  elif section == "eval":
    settings = _section(config, "preview", PREVIEW_ONLY)
    settings.update({k: v for k, v in _section(config, "eval", EVAL_ONLY).items()
                     if v is not None})
  else:
    raise ValueError(f"unknown sampler-settings section {section!r}; expected one of {SECTIONS}")
  given = {k: v for k, v in (overrides or {}).items() if v is not None}
  samplers.check_keys(given, config.objective, "sampler setting overrides")
  settings.update(given)
  scale = settings.get("cfg_scale")
  if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                            or not math.isfinite(scale)):
    where = "--cfg_scale" if "cfg_scale" in given else f"config.{section}.cfg_scale"
    raise ValueError(f"{where} must be a finite number (1 = no guidance), got {scale!r}")
  if "cfg_interval" in settings:
    source = "preview" if section == "eval" and config.eval.get("cfg_interval") is None \
        else section
    where = "--cfg_interval" if "cfg_interval" in given else f"config.{source}.cfg_interval"
    settings["cfg_interval"] = guidance.check_interval(
        settings["cfg_interval"], make_objective(config).time_range, where)
  return settings


def effective_settings(settings: Mapping, objective: str) -> dict:
  """What a sampler really runs with: the keys the named sampler reads, defaults filled in.
  Two records that sample alike compare equal, whichever keys the config declared then
  (sample folders record this, so a folder started before a setting was declared resumes)."""
  sampler = samplers.get(settings.get("sampler"), objective)
  return samplers.resolve(sampler, settings)
