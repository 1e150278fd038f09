"""FCDM-XL at 256 px (32x32x4 SD-VAE latents). `--config=configs/xl_256.py:flow` for flow matching.

Remat and parameter layout: config_base.RUN_LAYOUTS, chosen from the TPU preflight
table (docs/performance.md).
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  return config_base.get_config("XL", 256, objective or "ddpm")
