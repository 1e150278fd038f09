"""fcdm_jax: FCDM convolutional diffusion models in JAX/Flax.

Entry points (`python -m fcdm_jax.NAME --help`):

  main             train a config (resumes an existing workdir)
  sample           sample a run or a published checkpoint into an ADM `.npz`
  evaluate         FID / sFID / IS / precision / recall of an ADM `.npz`
  extract_latents  SD-VAE latents of an image folder or TFDS dataset
  bench            compile time, throughput, memory and MFU of a config

Library: `models/` (FCDM, SD-VAE, Inception, CLIP text), `diffusion/` (objectives and samplers),
`train/` (state, step, sharding, checkpoints, previews, the loop), `data/` (input
pipelines), `sampling` (the one generator), `evaluation/` (in-training evaluators),
`adm_npz` (ADM's batch format), `settings` (recorded settings), `convert` (PyTorch weights).
"""

__version__ = "0.1.0"
