"""FCDM-B at 512 px (64x64x4 SD-VAE latents). `--config=configs/b_512.py:flow` for flow matching.

Remat and parameter layout: config_base.RUN_LAYOUTS, chosen from the TPU preflight
table (docs/performance.md).
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  return config_base.get_config("B", 512, objective or "ddpm")
