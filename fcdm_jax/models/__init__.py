"""Networks: FCDM (fcdm.py) and its building blocks (layers.py)."""

from fcdm_jax.models.fcdm import FCDM
from fcdm_jax.models.variants import VARIANTS, get_variant

__all__ = ["FCDM", "VARIANTS", "get_variant"]
