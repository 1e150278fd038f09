"""FCDM-S at 256 px (32x32x4 SD-VAE latents). `--config=configs/s_256.py:flow` for flow matching."""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("S", 256, objective or "ddpm")
  return config
