"""ADM-compatible evaluation of a sample batch: FID, sFID, Inception Score, precision, recall.

    python -m fcdm_jax.evaluate --samples=samples.npz --ref=VIRTUAL_imagenet256_labeled.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth [--batch_size=256] [--out=metrics.json]

Batches are ADM's `.npz` format: `arr_0` uint8 NHWC RGB images, read in slices so that
50k images at 512 px need not fit in memory. The reference batch's `arr_0` gives the
reference features for precision/recall (and the statistics when it carries none); its
`mu`/`sigma` (pool3) and `mu_s`/`sigma_s` (spatial) are used as given when present, as
ADM's evaluator does. Features come from `fcdm_jax.models.inception` (ADM's preprocessing
by default) on all local devices; the metric math is `fcdm_jax.metrics`.

Two more modes. A training run, sampled and scored in one go (FID-k of its EMA weights,
with the network evaluations per image the sampling cost; --sampler, --steps, --cfg_scale
and --cfg_interval override the run's evaluation sampler;
for a text model each sample conditioned on a random caption of --captions, plus the CLIP
score with --clip; the MS-COCO FID-30K protocol with val2014's captions and reference):

    python -m fcdm_jax.evaluate --workdir=runs/t2i_xl --num_samples=30000 \
        --captions=/data/latents/coco256_val/captions --ref=coco_val2014_256.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth --vae=/models/sd-vae-ft-ema \
        [--clip=/models/clip-vit-large-patch14] [--out=metrics.json]

A reference batch made from images (ADM's centre crop, as the training data; the
statistics only: mu/sigma and mu_s/sigma_s), e.g. MS-COCO val2014 at 256 px:

    python -m fcdm_jax.evaluate --reference_from=coco:/data/coco --split=val2014 \
        --resolution=256 --inception=pt_inception-2015-12-05-6726825d.pth \
        --out=coco_val2014_256.npz

Exit status 0 when the results are printed (and --out written), 1 on an error (one
`error:` line naming the problem; bad input is refused before the Inception network runs).
"""

import json

from absl import flags

from fcdm_jax import cli
from fcdm_jax import fileio
from fcdm_jax.diffusion import samplers
from fcdm_jax.evaluation import adm, fid_eval
from fcdm_jax.models import inception
from fcdm_jax.sampling import cost

_LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"), ("clip_score", "CLIP score"))


flags.DEFINE_string("samples", None, "Sample batch .npz (ADM format: arr_0 uint8 NHWC).")
flags.DEFINE_string("workdir", None, "Instead of --samples: a training run, whose EMA "
                    "weights are sampled (--num_samples) and scored here.")
flags.DEFINE_string("reference_from", None, "Instead of --samples: write the reference "
                    "statistics of a dataset's images to --out: folder:PATH, coco:ROOT "
                    "(with --split=val2014) or tfds:NAME (with --data_dir, --split).")
flags.DEFINE_string("ref", None, "Reference batch .npz: arr_0 images and/or precomputed "
                    "mu/sigma (and mu_s/sigma_s), e.g. ADM's VIRTUAL_imagenet256_labeled.npz "
                    "or one written by --reference_from.")
flags.DEFINE_string("inception", None, "pytorch-fid's FID Inception weights, "
                    "pt_inception-2015-12-05-6726825d.pth (no download happens).",
                    required=True)
flags.DEFINE_integer("batch_size", 256, "Images per Inception step over all local devices "
                     "(rounded up to a multiple of the device count); with --workdir also "
                     "samples per sampling step.")
flags.DEFINE_string("out", None, "Also write the results to this JSON file (with "
                    "--reference_from: the .npz to write). An existing file is refused "
                    "unless --overwrite; it may never be one of the inputs.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_list("metrics", list(adm.METRICS), f"Which metrics to compute, from {adm.METRICS} "
                  "(--samples mode; --workdir computes fid, sfid, is).")
flags.DEFINE_enum("preprocess", "adm", list(inception.PREPROCESSING),
                  "Resize/scaling before Inception: 'adm' = ADM's TF graph (legacy TF "
                  "bilinear resize, (x-128)/128), 'pytorch_fid' = pytorch-fid's.")
flags.DEFINE_integer("split_size", 5000, "Inception Score chunk size (ADM: 5000).")
flags.DEFINE_integer("pr_batch_size", 10000, "Rows per distance block for precision/recall.")
# --workdir
flags.DEFINE_integer("num_samples", 30000, "--workdir: samples to draw (MS-COCO: 30000).")
flags.DEFINE_integer("step", None, "--workdir: the checkpoint step (default: the latest).")
flags.DEFINE_string("captions", "", "--workdir, text models: the caption folder whose "
                    "captions condition the samples (MS-COCO: val2014's, written by "
                    "extract_latents --text_encoder); default: the run's own.")
flags.DEFINE_string("clip", "", "--workdir, text models: a whole CLIP model folder "
                    "(e.g. clip-vit-large-patch14): also the mean CLIP score.")
flags.DEFINE_string("vae", "", "--workdir, latent models: the SD-VAE that decodes the "
                    "samples (default: the run's config.preview.vae_dir).")
flags.DEFINE_enum("sampler", None, list(samplers.names()), "--workdir: sampler override "
                  "(default: the run's eval/preview sampler).")
flags.DEFINE_integer("steps", None, "--workdir: sampling steps override.")
flags.DEFINE_float("cfg_scale", None, "--workdir: guidance scale override.")
flags.DEFINE_string("cfg_interval", None, "--workdir: guidance interval override, LOW,HIGH "
                    "in the objective's time (DDPM: step index 0 = data .. 999 = noise; "
                    "flow: SiT's t, 0 = noise .. 1 = data; from a paper's sigma interval: "
                    "DDPM the steps with sqrt((1-abar_t)/abar_t) in it, flow t = 1/(1+sigma)), "
                    "or 'none' (guide every step). Default: the run's eval/preview setting.")
# --reference_from
flags.DEFINE_integer("resolution", 256, "--reference_from: ADM centre-crop size.")
flags.DEFINE_string("split", "train", "--reference_from: the split (coco: val2014).")
flags.DEFINE_string("data_dir", "", "--reference_from tfds: TFDS data_dir.")


cli.define_distributed_flag()


def _run(f) -> dict:
  modes = [m for m in ("samples", "workdir", "reference_from") if getattr(f, m)]
  if len(modes) != 1:
    raise ValueError("pass exactly one of --samples (a sample batch), --workdir (a run to "
                     "sample and score) and --reference_from (images to make a reference of)")
  for name in ("batch_size", "split_size", "pr_batch_size", "num_samples", "resolution"):
    if getattr(f, name) < 1:
      raise ValueError(f"--{name} must be a positive integer, got {getattr(f, name)}")
  if f.out:   # before any work: never over an input, never over a file unasked
    fileio.check_output(f.out, overwrite=f.overwrite,
                        inputs=(f.samples, f.ref, f.inception, f.captions, f.vae, f.clip))
  if f.reference_from:
    return adm.make_reference(f.reference_from, f.out, f.inception, resolution=f.resolution,
                          split=f.split, data_dir=f.data_dir, batch_size=f.batch_size,
                          preprocess=f.preprocess)
  if not f.ref:
    raise ValueError("--ref is required: the reference batch .npz to compare against")
  if f.workdir:
    return fid_eval.evaluate_run(f.workdir, f.ref, f.inception, f.num_samples,
                        batch_size=f.batch_size, step=f.step, captions=f.captions,
                        clip=f.clip, vae=f.vae, sampler=f.sampler, steps=f.steps,
                        cfg_scale=f.cfg_scale, cfg_interval=f.cfg_interval)
  return adm.evaluate(f.samples, f.ref, f.inception, batch_size=f.batch_size, which=f.metrics,
                  preprocess=f.preprocess, split_size=f.split_size,
                  pr_batch_size=f.pr_batch_size)


def main(argv):
  del argv   # cli.run refuses positional arguments
  f = flags.FLAGS
  results = _run(f)
  if f.reference_from:
    print(f"wrote {results['out']}: statistics of {results['num_images']} images "
          f"({results['skipped']} undecodable skipped)")
    return
  for key, label in _LABELS:
    if key in results:
      print(f"{label}: {results[key]}")
  if results.get("cost"):
    print(f"Cost: {cost.describe(results['cost'])}")
  if f.out:
    fileio.atomic_write_bytes(f.out, (json.dumps(results, indent=2, default=float) + "\n").encode())


if __name__ == "__main__":
  cli.run(main)
