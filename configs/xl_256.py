"""FCDM-XL at 256 px (32x32x4 SD-VAE latents). `--config=configs/xl_256.py:flow` for flow matching."""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  return config_base.large_model_layout(config_base.get_config("XL", 256, objective or "ddpm"))
