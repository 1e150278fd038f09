"""FCDM-XL at 256 px (32x32x4 SD-VAE latents). `--config=configs/xl_256.py:flow` for flow matching.

Remat 'dots' (matmul outputs saved, the rest of each block recomputed) rather than the
large-model 'block': chosen from the TPU preflight table (docs/performance.md), where on
v5e-8 at the published batch 256 it fits with room and has a lower step bound.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.large_model_layout(config_base.get_config("XL", 256, objective or "ddpm"))
  config.model.remat = "dots"
  return config
