"""FCDM-XL at 256 px (32x32x4 SD-VAE latents). `--config=configs/xl_256.py:flow` for flow matching."""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("XL", 256, objective or "ddpm")
  # Large variants: shard params/optimizer/EMA over 'fsdp' and recompute each block
  # in the backward pass, as the published code does.
  config.sharding.params = "fsdp"
  config.mesh.axes = (("data", 1), ("fsdp", -1))
  config.model.remat = "block"
  return config
