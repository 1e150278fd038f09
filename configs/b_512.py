"""FCDM-B at 512 px (64x64x4 SD-VAE latents). `--config=configs/b_512.py:flow` for flow matching.

Remat 'block': chosen from the TPU preflight table (docs/performance.md): at the published
batch 256 without remat it fits none of v5e-8, v6e-8 (nor v5p-8 with room), and of the
policies that fit v5e-8, 'block' ties 'dots' on the step bound with half the HBM.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("B", 512, objective or "ddpm")
  config.model.remat = "block"
  return config
