"""fcdm_jax: FCDM convolutional diffusion models in JAX/Flax.

Entry points (`python -m fcdm_jax.NAME --help`):

  main             train a config (resumes an existing workdir)
  sample           sample a run or a published checkpoint into an ADM `.npz` (labels or prompts)
  evaluate         FID / sFID / IS / precision / recall of an ADM `.npz`; FID-k and the
                   CLIP score of a run (--workdir); reference statistics (--reference_from)
  extract_latents  SD-VAE latents of an image folder, MS-COCO or a TFDS dataset, and the
                   caption folder of a captioned one
  export_torch     a run's checkpoint as a published-layout `.pt` / `.safetensors`
  bench            compile time, throughput, memory and MFU of a config (a package)
  preflight        compile a config for a TPU slice or GPUs here: fits or not, roofline
                   bound; --fit: the fastest remat and accumulation that fit
  preflight_table  the TPU and GPU tables of docs/performance.md (resumable)
  demo.prepare     prepare the text-to-image demo's data (its first run does it too)

Commands are flags and a `main` run through `cli` (one `error:` line per bad input, a clean
end on every host). Every path they take may be local or `gs://` (`fileio`).

Library, one way down: foundation (`fileio`, `sharding`, `provenance`, `distributed`,
`models/torch_weights`) <- `models/`, `conditions/`, `diffusion/`, `data/` <- `checkpoint`
(a run's checkpoints, for training and inference alike) <- `sampling/`, `train/`,
`evaluation/`, `programs`, `perf/` <- commands; `demo/` holds
what only the demos use. Extension points are registries: `diffusion.samplers.SAMPLERS`,
`data.SOURCES`, `evaluation.EVALUATORS`, `conditions.CONDITIONS`.
"""

import os as _os

# Object-store URLs go through fsspec (gcsfs for gs://), the client the tests run against a
# GCS emulator; TensorFlow's gfile (EPATH_USE_TF=1) has no emulator setting. Set before
# etils.epath picks a backend (it decides once per process).
_os.environ.setdefault("EPATH_USE_TF", "false")
# The gpu extra's CUDA plugin checks its CUDA libraries whenever JAX starts; on a machine
# without an NVIDIA GPU the failed check is a logged traceback before JAX falls back to the
# CPU. JAX leaves CUDA out there anyway (the same device files decide, as in
# jax._src.hardware_utils), so the check guards nothing and is skipped.
if not any(_os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")):
  _os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

__version__ = "0.1.0"
