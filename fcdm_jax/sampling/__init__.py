"""Sampling: trained weights -> images, for every caller (CLI, previews, evaluators).

`generator` is the one compiled sampler over the mesh (per-(seed, index) keys) and the one
rule for decoding samples into images, `settings` the sampler settings of a config section
(`sampler_settings`), `output` the resumable sample folder of the sampling CLI, `adm_npz`
ADM's sample-batch format.
"""

from fcdm_jax.sampling.generator import (STREAM_LABELS, STREAM_NOISE, Decoder, Generator,
                                         fetch, image_decoder, is_latent, load_decoder,
                                         random_labels, stream_key, to_uint8)
from fcdm_jax.sampling.settings import sampler_settings

__all__ = ["STREAM_LABELS", "STREAM_NOISE", "Decoder", "Generator", "fetch", "image_decoder",
           "is_latent", "load_decoder", "random_labels", "sampler_settings", "stream_key",
           "to_uint8"]
