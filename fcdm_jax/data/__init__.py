"""Input pipelines: what the training loop trains on.

    source = make_source(config, process_index=jax.process_index(),
                         process_count=jax.process_count())
    source.element_shape   # (H, W, C) of one training example
    source.num_classes, source.num_examples
    for batch in source.iterate(start_step):   # endless; {'x': f32 NHWC, 'y': i32}
      ...

The local batch is config.batch_size // process_count; the batch of global step s is a
deterministic function of (seed, s, process_index), so the data position saved in a
checkpoint is the step itself (pipeline.py explains the order, split and randomness).

Sources, by `config.data.source`: the registry `SOURCES` (registry.py) lists them, one
line each with the module that reads it; `source_spec(name)` says whether a source is latent
and whether its batches carry the posterior's std.
"""

from fcdm_jax.data.embedded import load_embedded
from fcdm_jax.data.latents import LatentDataset, LatentShardWriter, read_manifest
from fcdm_jax.data.pipeline import BatchIterator, Source, make_source
from fcdm_jax.data.preprocess import center_crop_arr
from fcdm_jax.data.registry import SOURCES, SourceSpec, source_spec

__all__ = ["SOURCES", "BatchIterator", "LatentDataset", "LatentShardWriter", "Source",
           "SourceSpec", "center_crop_arr", "load_embedded", "make_source", "read_manifest",
           "source_spec"]
