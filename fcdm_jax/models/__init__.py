"""Networks: FCDM (fcdm.py) and its building blocks (layers.py); beside it the SD-VAE
(vae.py), the FID Inception (inception.py), and the CLIP text encoder (clip_text.py) and
tokenizer (clip_tokenizer.py) for captions."""

from fcdm_jax.models.fcdm import FCDM
from fcdm_jax.models.variants import VARIANTS, get_variant

__all__ = ["FCDM", "VARIANTS", "get_variant"]
