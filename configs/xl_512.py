"""FCDM-XL at 512 px (64x64x4 SD-VAE latents). `--config=configs/xl_512.py:flow` for flow matching."""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  return config_base.large_model_layout(config_base.get_config("XL", 512, objective or "ddpm"))
