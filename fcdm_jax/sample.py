"""Sample a trained FCDM into an ADM-format batch (`.npz`) and optionally PNG files.

    python -m fcdm_jax.sample --workdir=runs/xl_256 --vae=/models/sd-vae-ft-ema \
        --num_samples=50000 --sampler=ddpm --steps=250 --cfg_scale=1.5 --out=samples/xl_256
    python -m fcdm_jax.sample --torch_checkpoint=FCDM-XL-256.pt --config=configs/xl_256.py \
        --vae=/models/sd-vae-ft-ema --num_samples=50000 --out=samples/xl_256_published
    python -m fcdm_jax.sample --workdir=runs/xl_256 --vae=/models/sd-vae-ft-ema \
        --num_samples=50000 --sampler=dpmpp_2m --steps=20 --cfg_interval=100,261 \
        --out=samples/xl_256_dpmpp

The last line prints, and `sample_settings.json` records (`cost`), the network evaluations
each image cost (a guided one counts 2).

Weights, labels, determinism, the output folder and resuming: `fcdm_jax.sampling.run`.
Exit status 0 when the sample batch is complete, 1 on an error (one `error:` line).
"""


import jax
from absl import flags
from ml_collections import config_flags

from fcdm_jax import cli
from fcdm_jax.diffusion import samplers
from fcdm_jax.diffusion.objectives import OBJECTIVES
from fcdm_jax.sampling import cost, run

flags.DEFINE_string("workdir", None, "Training run directory: its latest checkpoint's EMA "
                    "params (or --step's) and its saved config.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: latest).")
flags.DEFINE_string("torch_checkpoint", None, "A published-layout FCDM checkpoint (.pt with "
                    "'ema'/'model', or .safetensors) instead of --workdir; needs --config.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py): required with --torch_checkpoint; with "
    "--workdir it replaces the saved config. Fields: --config.FIELD=VALUE, e.g. "
    "--config.sample.respacing=ddim50, --config.sample.cfg_interval=100,261 (a pair: "
    "LOW,HIGH; 'none' for none), --config.sample.atol=1e-5.")
flags.DEFINE_integer("num_samples", None, "How many images to sample (ADM's FID: 50000).",
                     required=True)
flags.DEFINE_string("out", None, "Output directory: the .npz, png/ and the resumable parts.",
                    required=True)
flags.DEFINE_string("vae", None, "Local diffusers SD-VAE directory; required for latent "
                    "models, whose samples it decodes.")
flags.DEFINE_enum("sampler", None, list(samplers.names()), "Sampler (" + "; ".join(
    f"{o} objective: {'|'.join(samplers.names(o))}" for o in OBJECTIVES) + "). Default: the "
                  "config's sample.sampler.")
flags.DEFINE_integer("steps", None, "Sampling steps (DDPM: respaced steps; flow: time-grid "
                     "points). Default: the config's sample.steps (250).")
flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 = none. Default: "
                   "the config's sample.cfg_scale (1.5).")
flags.DEFINE_string("cfg_interval", None, "Guidance interval LOW,HIGH: guide only where the "
                    "model's time t is in it (elsewhere the conditional rows alone run: half "
                    "the cost); 'none': guide every step. In the objective's time: DDPM the "
                    "step index (0 = data .. 999 = noise), flow SiT's t (0 = noise .. 1 = "
                    "data). From a paper's sigma interval (EDM2: [0.34, 1.02]): DDPM the steps "
                    "with sqrt((1-abar_t)/abar_t) in it (DiT's schedule: 100,261); flow "
                    "t = 1/(1+sigma) (0.495,0.746). Default: the config's sample.cfg_interval "
                    "(none); with --config also --config.sample.cfg_interval=LOW,HIGH.")
flags.DEFINE_float("eta", None, "DDIM eta (0 = deterministic).")
flags.DEFINE_enum("method", None, ["euler", "heun", "dopri5"], "Flow samplers: the SDE/ODE "
                  "integration method (dopri5: ODE only).")
flags.DEFINE_bool("guide_all_eps", None, "Guide all eps channels instead of the published "
                  "first three.")
flags.DEFINE_bool("clip_denoised", None, "DDPM/DDIM: clip the predicted x0 to [-1, 1] (useful "
                  "for pixel-space models).")
flags.DEFINE_string("labels", "random", "Class labels: 'random' (uniform, from --seed), "
                    "'balanced' (i mod num_classes), a comma-separated list (cycled), or a "
                    ".npy/.txt file with one label per sample.")
flags.DEFINE_integer("seed", 0, "Seed of the noise and the random labels; sample i depends "
                     "only on (seed, i).")
flags.DEFINE_integer("batch_size", 64, "Samples per step over all devices (rounded up to a "
                     "multiple of the device count); the unit of resuming.")
flags.DEFINE_multi_string("prompt", None, "Text-conditioned models: a caption to sample "
                          "from (repeatable; sample i takes prompt i mod P).")
flags.DEFINE_string("prompts", None, "Text-conditioned models: a file of captions, one a "
                    "line (after any --prompt).")
flags.DEFINE_string("text_encoder", None, "Text-conditioned models: the local CLIP folder "
                    "(weights + tokenizer) that encodes the prompts; default: the one the "
                    "run's captions record.")
flags.DEFINE_bool("png", False, "Also write png/{index:06d}.png.")
flags.DEFINE_bool("keep_parts", False, "Keep parts/ after the .npz is written.")
cli.define_distributed_flag()


def main(argv):
  del argv   # cli.run refuses positional arguments
  f = flags.FLAGS
  config = cli.config_value(_CONFIG)
  if config is not None:
    config = config.copy_and_resolve_references()
    config.model.depth = tuple(config.model.depth)
  overrides = {k: f[k].value for k in run.SAMPLE_OVERRIDES}
  summary = run.sample(f.out, f.num_samples, workdir=f.workdir,
                   torch_checkpoint=f.torch_checkpoint, config=config, step=f.step,
                   vae=f.vae, labels=f.labels, seed=f.seed, batch_size=f.batch_size,
                   png=f.png, keep_parts=f.keep_parts,
                   prompts=run.read_prompts(f.prompt, f.prompts), text_encoder=f.text_encoder,
                   **overrides)
  if jax.process_index() == 0:
    height, width, channels = summary["image_shape"]
    kind = "RGB" if channels == 3 else "grayscale, stored as RGB"
    print(f"{summary['npz']}: {summary['num_samples']} images of {height}x{width} ({kind}); "
          f"{len(summary['generated'])} batches sampled now, {len(summary['kept'])} resumed"
          + (f"; {cost.describe(summary['cost'])}" if summary.get("cost") else ""))


if __name__ == "__main__":
  cli.run(main)
