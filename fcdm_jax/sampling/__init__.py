"""Sampling: trained weights -> images, for every caller (CLI, previews, evaluators).

`generator` is the one compiled sampler over the mesh (per-(seed, index) keys),
`output` the resumable sample folder of the sampling CLI, `adm_npz` ADM's sample-batch
format.
"""

from fcdm_jax.sampling.generator import (STREAM_LABELS, STREAM_NOISE, ClassLabels, Decoder,
                                         Generator, TextEmbeddings, condition_of, fetch,
                                         is_latent, load_decoder, random_labels, stream_key,
                                         to_uint8)

__all__ = ["STREAM_LABELS", "STREAM_NOISE", "ClassLabels", "Decoder", "Generator",
           "TextEmbeddings", "condition_of", "fetch", "is_latent", "load_decoder",
           "random_labels", "stream_key", "to_uint8"]
