"""FCDM-S at 512 px (64x64x4 SD-VAE latents). `--config=configs/s_512.py:flow` for flow matching.

Remat 'block': chosen from the TPU preflight table (docs/performance.md): at the published
batch 256 without remat it does not fit a v5e-8 chip's 16 GiB, and of the policies that do,
'block' has the lowest step bound there.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("S", 512, objective or "ddpm")
  config.model.remat = "block"
  return config
