"""The README's sampler table for a class demo checkpoint (`fcdm_jax.demo.sampler_sweep`):

    python -m fcdm_jax.demo.sampler_table --workdir=runs/demo --out=runs/demo/samplers.json

samples and judges every sampler at 5, 8, 10, 15, 20, 25 and 50 steps and the reference
(DDPM 250 for the DDPM objective, SiT's Euler SDE 250 for flow), with and without EDM2's
guidance interval, 500 samples each; rows already in --out are skipped (stop it and run it
again to go on). Prints a line per new row, then the markdown table and the same at a
glance (Fréchet distance / evaluations per image by steps, the README's form).
Exit status 0 when the table is printed, 1 on an error (one `error:` line).
"""

from absl import flags

from fcdm_jax import cli
from fcdm_jax.demo import sampler_sweep

flags.DEFINE_string("workdir", None, "A class demo run (configs/demo.py or :ddpm) with a "
                    "checkpoint.", required=True)
flags.DEFINE_string("out", None, "The table's JSON file: rows are added as they finish and "
                    "kept when the command runs again.", required=True)
flags.DEFINE_integer("step", None, "The checkpoint step (default: the latest).")
flags.DEFINE_integer("num_samples", sampler_sweep.NUM_SAMPLES, "Class-balanced samples per "
                     "row.")
flags.DEFINE_list("steps", [str(n) for n in sampler_sweep.STEPS], "The steps of every sampler.")
flags.DEFINE_integer("reference_steps", sampler_sweep.REFERENCE_STEPS, "The reference's steps.")
flags.DEFINE_list("samplers", None, "Only these rows' samplers, by their table label ('ddim', "
                  "'ode (heun)', ...); default: all. The reference is always sampled.")
flags.DEFINE_list("sigma_interval", [str(v) for v in sampler_sweep.SIGMA_INTERVAL],
                  "The guidance interval in EDM's sigma (LOW,HIGH; EDM2's for DiT); each "
                  "row is sampled without it and with it converted to the objective's time.")
flags.DEFINE_integer("batch_size", 100, "Samples per sampling step over all devices.")


def _integers(name: str, values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name} must be integers, got {','.join(values)}") from None


def main(argv):
  del argv   # cli.run refuses positional arguments
  f = flags.FLAGS
  try:
    sigma = [float(v) for v in f.sigma_interval]
  except ValueError:
    raise ValueError(f"--sigma_interval must be two numbers LOW,HIGH, got "
                     f"{','.join(f.sigma_interval)}") from None
  if len(sigma) != 2:
    raise ValueError(f"--sigma_interval must be two numbers LOW,HIGH, got {sigma}")

  def report(row):
    print(f"{row['label']}, {row['steps'] or 'adaptive'} steps, "
          f"{'with' if row['guidance_interval'] else 'without'} interval: "
          f"{row['evaluations_per_image']} evaluations per image, accuracy "
          f"{row['accuracy']:.3f}, Fréchet distance {row['frechet_distance']:.2f}, "
          f"{row['seconds']:.1f} s", flush=True)

  data = sampler_sweep.sweep(f.workdir, f.out, step=f.step, num_samples=f.num_samples,
                             steps=_integers("steps", f.steps),
                             reference_steps=f.reference_steps, only=f.samplers,
                             sigma_interval=sigma, batch_size=f.batch_size, on_row=report)
  print(sampler_sweep.markdown(data))
  print()
  print(sampler_sweep.grid(data))


if __name__ == "__main__":
  cli.run(main)
