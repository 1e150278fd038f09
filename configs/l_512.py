"""FCDM-L at 512 px (64x64x4 SD-VAE latents). `--config=configs/l_512.py:flow` for flow matching."""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("L", 512, objective or "ddpm")
  # Large variants: shard params/optimizer/EMA over 'fsdp' and recompute each block
  # in the backward pass, as the published code does.
  config.sharding.params = "fsdp"
  config.mesh.axes = (("data", 1), ("fsdp", -1))
  config.model.remat = "block"
  return config
