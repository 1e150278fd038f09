"""Sampling a trained FCDM into a resumable sample folder: an ADM-format batch (`.npz`)
and optionally PNG files (the library of `python -m fcdm_jax.sample`).

Weights. `--workdir` takes the EMA params of the run's latest checkpoint (or `--step`) and
the config saved with it (`--config` overrides it, e.g. for another compute dtype);
`--torch_checkpoint` takes the 'ema' weights of a published-layout `.pt` (read with
`weights_only=True`) or `.safetensors` file, with the run config given by `--config`.

Sampling. The sampler is the one `config.sample.sampler` names (`fcdm_jax.diffusion.samplers`)
with `sampler_settings(config, "sample")`; `--sampler`, `--steps`, `--cfg_scale`, ... override
them, and `--config.sample.KEY=VALUE` sets any of them.
Labels are uniform over the classes, drawn from the seed (`--labels=random`), or
`balanced` (sample i gets class i mod K), or given (a comma list, cycled, or a `.npy` /
`.txt` file with one label per sample).

Determinism. The images come from `fcdm_jax.sampling.Generator` (as training previews
and evaluation do): sample i's noise depends on (seed, i) alone, and its random label
likewise, so the same seed gives the same images whatever the batch size, device count or
how often the run was resumed (up to floating-point differences between batch shapes).

Images. Latent models (a latent `config.data.source`, `data.source_spec`) are decoded with the SD-VAE given by `--vae` after dividing by config.data.vae_scale;
pixel-space models (e.g. configs/demo.py) are their own images. Values in [-1, 1] become
uint8 as DiT's sampler does (`clip(127.5 x + 128, 0, 255)`, truncated). One-channel models
are written to PNG as grayscale and replicated to three channels in the `.npz`, because
ADM's evaluator (and `fcdm_jax.evaluate`) take RGB batches.

Output, in --out: `samples_{N}x{H}x{W}x3.npz` (`arr_0` uint8 NHWC, `arr_1` int64 labels;
written atomically at the end), `png/{i:06d}.png` with --png, and `sample_settings.json`,
whose `cost` is what the samples spent (`sampling.cost`: network evaluations per image; a
time grid's from the start, adaptive dopri5's as measured once the batch is complete; it
is not one of the settings a rerun is compared on).
While running, each finished batch is a file in `parts/`; a rerun of the same command
resumes from them (and a finished one does nothing). An --out holding samples made with
other settings is refused, never overwritten. The parts are deleted once the `.npz` is
written unless --keep_parts.

Devices and hosts. The mesh is the config's (`sharding.create_mesh`): the EMA
params are restored alone, in the config's shardings (FSDP for L/XL configs), and each
batch is split over all devices (all hosts run the same command; host 0 writes the files
to --out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import sys

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from fcdm_jax import conditions, config_checks, fileio, provenance, sampling, sharding
from fcdm_jax.conditions import ClassLabels
from fcdm_jax.data.captions import caption_folder
from fcdm_jax.models import vae as vae_lib
from fcdm_jax.models.text_encoder import load_text_encoder
from fcdm_jax.sampling import adm_npz
from fcdm_jax.sampling import cost as cost_lib
from fcdm_jax.sampling.output import COST, OUT_COMPLETE, SampleOutput, out_verdict
from fcdm_jax.sampling.settings import effective_settings, sampler_settings
from fcdm_jax.sampling.weights import load_model, resolve_model

# config.sample fields the command line may override (None = keep the config's).
SAMPLE_OVERRIDES = ("sampler", "steps", "cfg_scale", "cfg_interval", "eta", "method",
                    "guide_all_eps", "clip_denoised")


# ------------------------------------------------------------------------------ labels


def make_labels(spec: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """int32 labels of samples 0..N-1 from --labels (see the module docstring)."""
  spec = (spec or "random").strip()
  if spec == "random":
    labels = sampling.random_labels(seed, num_samples, num_classes)
  elif spec == "balanced":
    labels = np.arange(num_samples) % num_classes
  elif re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*", spec):
    given = np.asarray([int(v) for v in spec.split(",")])
    labels = np.resize(given, num_samples)
  elif fileio.isfile(spec):
    data = io.BytesIO(fileio.read_bytes(spec))
    if spec.endswith(".npy"):
      labels = np.load(data, allow_pickle=False)
    else:
      labels = np.loadtxt(data, dtype=np.int64, ndmin=1)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"--labels file {spec} must hold a 1-D array of integers, got "
                       f"{labels.dtype} {labels.shape}")
    if len(labels) != num_samples:
      raise ValueError(f"--labels file {spec} holds {len(labels)} labels, but "
                       f"--num_samples is {num_samples}")
  else:
    raise ValueError(f"--labels {spec!r}: expected 'random', 'balanced', a comma-separated "
                     "list of class indices, or an existing .npy/.txt file")
  return ClassLabels(num_classes, None).check(np.asarray(labels, np.int64))


def make_conditions(config, labels: str, prompts, text_encoder: str | None, num_samples: int,
                    seed: int):
  """(int64 labels for the batch's arr_1, the generator's conditions, their settings record,
  the empty caption's embedding or None). Text models: sample i gets prompt i mod P, its
  arr_1 entry is i mod P; class models: `make_labels`."""
  if not conditions.of_config(config).uses_captions:
    if prompts:
      raise ValueError("--prompt/--prompts are for text-conditioned models; this model is "
                       "class-conditional (use --labels)")
    values = make_labels(labels, num_samples, int(config.model.num_classes), seed)
    record = {"spec": labels if labels in ("random", "balanced") else "given",
              "sha256": hashlib.sha256(values.tobytes()).hexdigest()}
    return values, values, record, None
  if not prompts:
    raise ValueError("a text-conditioned model samples from captions: pass --prompt=TEXT "
                     "(repeatable) or --prompts=FILE (one a line)")
  if labels not in ("random", None, ""):
    raise ValueError("--labels is for class-conditional models; this one takes --prompt")
  encoder_dir = text_encoder or _recorded_text_encoder(config)
  encoder = load_text_encoder(encoder_dir, config.data.get("text_pooling", "pooled"))
  if encoder.dim != int(config.model.text_dim):
    raise ValueError(f"the text encoder in {encoder_dir} gives {encoder.dim}-dimensional "
                     f"embeddings; the model takes text_dim={config.model.text_dim}")
  prompts = [str(p) for p in prompts]
  index = np.arange(num_samples) % len(prompts)
  embeddings = encoder.encode(prompts)[index]
  record = {"prompts": prompts, "encoder": encoder.identity}
  return index.astype(np.int64), embeddings, record, encoder.empty()


def _recorded_text_encoder(config) -> str:
  """The text encoder a run's captions were encoded with (their manifest records it)."""
  path = caption_folder(config)
  manifest = fileio.join(path, "captions.json") if path else ""
  if manifest and fileio.isfile(manifest):
    recorded = json.loads(fileio.read_text(manifest)).get("encoder", {}).get("path")
    if recorded and fileio.isdir(recorded):
      return recorded
  raise ValueError("pass --text_encoder=DIR (the CLIP folder the run's captions were encoded "
                   f"with); none is recorded in the run's caption folder {path!r}")


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
  """--prompt values, then the non-empty lines of --prompts."""
  out = list(prompt or [])
  if prompts_file:
    out += [line.strip() for line in fileio.read_text(prompts_file).splitlines() if line.strip()]
  return out


# ---------------------------------------------------------------------------- generation


def vae_identity(vae_dir: str, decoder: sampling.Decoder) -> dict:
  """What the settings record of the SD-VAE in `vae_dir`: its config and weights' hash."""
  _, weights = vae_lib.find_vae_files(vae_dir)
  return {"config": provenance.as_json(dataclasses.asdict(decoder.model.config)),
          "weights_sha256": fileio.sha256_file(weights)}


# ---------------------------------------------------------------------------------- main


def sample(out: str, num_samples: int, *, workdir: str | None = None,
           torch_checkpoint: str | None = None, config=None, step: int | None = None,
           vae: str | None = None, labels: str = "random", seed: int = 0,
           batch_size: int = 64, png: bool = False, keep_parts: bool = False,
           progress: bool = True, prompts=None, text_encoder: str | None = None,
           **overrides) -> dict:
  """Writes (or finishes) the sample batch in `out`; returns a summary.

  `prompts` (a list of captions, cycled over the samples) and `text_encoder` (the CLIP
  folder that encodes them) are for text-conditioned models, `labels` for class ones.
  `overrides`: config.sample fields from SAMPLE_OVERRIDES (None = the config's).
  """
  unknown = set(overrides) - set(SAMPLE_OVERRIDES)
  if unknown:
    raise TypeError(f"unknown sample overrides {sorted(unknown)}; expected {SAMPLE_OVERRIDES}")
  for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"--{name} must be a positive integer, got {value!r}")
  # Everything is checked before the weights are read: a mistake fails in seconds.
  fileio.check_output_folder(out, inputs=(workdir, torch_checkpoint, vae, text_encoder,
                                          labels if labels and fileio.isfile(labels) else ""))
  config, weights = resolve_model(workdir, torch_checkpoint, config, step)
  config_checks.check_config(config)
  mesh = sharding.create_mesh(config)
  sample_cfg = sampler_settings(config, "sample", overrides)
  decoder = sampling.image_decoder(config, vae, mesh, "--vae")
  label_values, sample_conditions, condition_settings, empty = make_conditions(
      config, labels, prompts, text_encoder, num_samples, seed)
  generator = sampling.Generator(config, sample_cfg, mesh, decoder,   # checks the sampler
                                 empty_embedding=empty)
  size = int(config.latent_size)
  factor = decoder.model.config.downsample_factor if decoder else 1
  image_shape = (size * factor, size * factor,
                 3 if decoder else int(config.model.in_channels))
  settings = provenance.as_json({
      "weights": weights, "objective": config.objective, "model": config.model.to_dict(),
      "diffusion": config.diffusion.to_dict(), "flow": config.flow.to_dict(),
      "sample": effective_settings(sample_cfg, config.objective), "seed": seed, "num_samples": num_samples,
      "labels": condition_settings,
      "vae": vae_identity(vae, decoder) if decoder else None,
      "vae_scale": float(config.data.vae_scale) if decoder else None,
      "image_shape": image_shape})

  batch = generator.padded_size(batch_size)
  ranges = [(s, min(s + batch, num_samples)) for s in range(0, num_samples, batch)]
  final = adm_npz.npz_name(num_samples, image_shape[0], image_shape[1])
  output = SampleOutput(out, final, ranges, label_values, image_shape, png)
  summary = {"npz": output.npz, "num_samples": num_samples, "image_shape": image_shape,
             "batch_size": batch, "generated": [], "kept": []}
  def normalize(saved):   # records list the sampler's settings as `effective_settings` does
    saved = {k: v for k, v in saved.items() if k != COST}   # a result, not a setting
    sample = saved.get("sample")
    return dict(saved, sample=provenance.as_json(effective_settings(sample, config.objective))
                ) if isinstance(sample, dict) else saved

  if out_verdict(out, settings, final, normalize) == OUT_COMPLETE:
    logging.info("%s is already complete", output.npz)
    output.pngs_of_finished()
    summary[COST] = output.recorded(COST)
    return summary

  params = load_model(config, weights, mesh)
  output.start(dict(settings, **{COST: generator.planned_cost()}))
  summary["kept"] = output.finished_batches()
  output.pngs_of_resumed(summary["kept"])
  todo = [b for b in range(len(ranges)) if b not in summary["kept"]]
  logging.info("sampling %d images of %s in %d batches of %d (%d already done) on %d devices "
               "with %s (%s)", num_samples, image_shape, len(ranges), batch,
               len(summary["kept"]), mesh.size, sample_cfg.get("sampler"),
               cost_lib.describe(generator.planned_cost()))
  resumed = sum(ranges[b][1] - ranges[b][0] for b in summary["kept"])
  with tqdm(total=num_samples, initial=resumed, desc="sampling", unit="img", file=sys.stderr,
            disable=not progress or jax.process_index() != 0) as bar:
    pending = None
    for b in todo + [None]:
      if b is not None:   # dispatched before the previous batch is fetched and written
        start, end = ranges[b]
        batch_conditions = generator.condition.pad(sample_conditions[start:end], batch)
        indices = np.arange(start, start + batch, dtype=np.uint32)   # padded past the end
        result = generator(params, seed, indices, batch_conditions)
      if pending is not None:
        done, images, evaluations = pending
        n = ranges[done][1] - ranges[done][0]
        output.write_batch(done, sampling.fetch(images)[:n], sampling.fetch(evaluations)[:n])
        summary["generated"].append(done)
        bar.update(n)
      pending = None if b is None else (b, result[0], result[2])
  counts = output.evaluations(generator.grid_evaluations)   # host 0 reads them
  summary[COST] = None if counts is None else generator.cost(counts)
  output.record_result(settings, {COST: summary[COST]})
  output.assemble(keep_parts)
  logging.info("wrote %s%s", output.npz,
               f" ({cost_lib.describe(summary[COST])})" if summary[COST] else "")
  return summary
