"""Text-to-image FCDM-L at 256 px on MS-COCO 2014 (config_base.text_to_image: pooled CLIP
ViT-L/14 text through the adaLN conditioning, SD-VAE latents, 10% empty captions, FID-30K).

    python -m fcdm_jax.main --config=configs/t2i_l_256.py --workdir=runs/t2i_l \
        --config.data.path=/data/latents/coco256_train --config.preview.vae_dir=/models/sd-vae-ft-ema

`--config=configs/t2i_l_256.py:flow` for flow matching.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  return config_base.text_to_image(config_base.get_config("L", 256, objective or "ddpm"))
