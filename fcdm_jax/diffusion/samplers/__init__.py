"""The sampler registry: `config.sample.sampler` (and `.preview`, `.eval`) names one of SAMPLERS.

Each sampler is one module here whose `SAMPLER` says which objectives it serves, which
settings it reads (with their defaults) and how it is built (`base.Sampler`). Adding one is
that module plus its line below; the sampling command's `--sampler` choices, the config's
declared settings (`config_base`) and every error list names from this table.

Cost. `evaluations_per_image(settings, objective)` is what one image costs in network
evaluations, from the sampler's `model_times` and the guidance settings: an evaluation
counts 2 where it is guided (the doubled batch, or the null rows inside the guidance
interval) and 1 where it is conditional only; None for a sampler whose evaluations depend
on the data (adaptive dopri5), which counts them as it runs (`base`). Every output that
reports a cost uses it (through `fcdm_jax.sampling.Generator`).

Settings. Every sampler reads `base.COMMON` (sampler, steps, cfg_scale, cfg_interval,
guide_all_eps) and its own keys. The keys a section of a config may hold are those of the
samplers serving its objective (`setting_keys`); None means "the sampler's default".
"""

from __future__ import annotations

from typing import Mapping

from fcdm_jax.diffusion import guidance
from fcdm_jax.diffusion.samplers import ddim, ddpm, dpmpp_2m, ode, sde, unipc
from fcdm_jax.diffusion.samplers.base import COMMON, Sampler, Setting

SAMPLERS: dict[str, Sampler] = {
    "ddpm": ddpm.SAMPLER,
    "ddim": ddim.SAMPLER,
    "sde": sde.SAMPLER,
    "ode": ode.SAMPLER,
    "dpmpp_2m": dpmpp_2m.SAMPLER,
    "unipc": unipc.SAMPLER,
}


def names(objective: str | None = None) -> tuple[str, ...]:
  """The samplers serving `objective` (all of them for None), in registry order."""
  return tuple(n for n, s in SAMPLERS.items() if objective is None or objective in s.objectives)


def get(name, objective: str) -> Sampler:
  """The sampler `name` (None: the objective's first), checked to serve `objective`."""
  if name is None:
    return SAMPLERS[names(objective)[0]]
  key = str(name).lower()
  if key not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; expected one of {names()} (for the "
                     f"{objective!r} objective: {names(objective)})")
  if objective not in SAMPLERS[key].objectives:
    raise ValueError(f"sampler {name!r} does not serve the {objective!r} objective; its "
                     f"samplers are {names(objective)}")
  return SAMPLERS[key]


def declared_settings(objective: str) -> dict[str, Setting]:
  """Every setting a sampler of `objective` reads: COMMON's, then each sampler's own. A key
  two samplers read with different defaults gets the default None (each its own)."""
  out = dict(COMMON)
  for name in names(objective):
    for key, setting in SAMPLERS[name].settings.items():
      if key in out and out[key].default != setting.default:
        setting = Setting(None, setting.type, f"{out[key].help} / {setting.help}; None: the "
                          "sampler's default", setting.nullable)
      out[key] = setting
  return out


def setting_keys(objective: str) -> tuple[str, ...]:
  """The keys a sampler-settings section of an `objective` config may hold."""
  return tuple(declared_settings(objective))


def check_keys(keys, objective: str, where: str = "sampler settings") -> None:
  """ValueError naming the allowed keys if any of `keys` is none of the objective's settings."""
  allowed = setting_keys(objective)
  unknown = sorted(set(keys) - set(allowed))
  if unknown:
    raise ValueError(f"unknown {where} {unknown} for the {objective!r} objective; allowed "
                     f"keys: {list(allowed)}")


def resolve(sampler: Sampler, values: Mapping) -> dict:
  """COMMON's and `sampler`'s settings from `values`, with the default where a key is absent
  or None (unless the setting is `nullable`: None is then a value)."""
  out = {}
  for key, setting in dict(COMMON, **sampler.settings).items():
    unset = key not in values or (values[key] is None and not setting.nullable)
    out[key] = setting.default if unset else values[key]
  return out


def evaluations_per_image(settings: Mapping, objective) -> int | None:
  """Network evaluations one image costs with `settings` (a config.sample-like mapping) on
  `objective` (an `objectives.Objective`): 2 per guided evaluation, 1 per conditional-only
  one (`guidance.rows_per_evaluation` at each of the sampler's `model_times`); None when the
  count depends on the data (the sampler counts it as it runs)."""
  sampler = get(settings.get("sampler"), objective.name)
  resolved = resolve(sampler, settings)
  times = sampler.model_times(objective, resolved)
  if times is None:
    return None
  interval = guidance.check_interval(resolved["cfg_interval"], objective.time_range)
  return int(guidance.rows_per_evaluation(times, resolved["cfg_scale"], interval).sum())
