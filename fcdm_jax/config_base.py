"""The one base config every `configs/*.py` file starts from.

A config is data: `config.model` holds exactly the `FCDM` fields (`FCDM(**config.model)`),
the rest is the published training recipe and how the run is laid out. Variant files
call `get_config(variant, resolution, objective)` and change a few fields.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from fcdm_jax.diffusion import samplers
from fcdm_jax.models.variants import get_variant

VAE_SCALE = 0.18215  # SD-VAE ft-ema latent scale
OBJECTIVES = ("ddpm", "flow")


def latent_size(resolution: int) -> int:
  """SD-VAE downsamples 8x: 256 px -> 32x32x4, 512 px -> 64x64x4."""
  if resolution % 8:
    raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor 8")
  return resolution // 8


# Remat policy and parameter layout of each published size, chosen from the TPU preflight
# table (docs/performance.md, where `fcdm_jax.preflight_table` renders each choice with the
# figures behind it; tests/test_preflight_table.py holds these to its decisions). get_config
# applies them, so a text-to-image config runs as its class config does; other sizes start
# with no remat and replicated parameters.
RUN_LAYOUTS = {
    ("S", 256): ("none", "replicated"),
    ("S", 512): ("block", "replicated"),    # no remat does not fit v5e-8
    ("B", 256): ("none", "replicated"),     # FSDP: a little less HBM, a 50% higher bound
    ("B", 512): ("block", "replicated"),    # no remat does not fit; ties dots on less HBM
    ("L", 256): ("block", "replicated"),    # FSDP: less HBM, a bound as low or higher
    ("L", 512): ("block", "fsdp"),          # dots does not fit v5e-8
    ("XL", 256): ("dots", "fsdp"),          # a lower bound than block, with room on v5e-8
    ("XL", 512): ("block", "fsdp"),         # dots does not fit v5e-8
}
# The mesh of each parameter layout: one 'data' axis over every device (each holds whole
# params), or one 'fsdp' axis over every device (params, AdamW moments and EMA sharded by
# config.sharding.rules; the batch is split over it all the same).
PARAM_MESH_AXES = {"replicated": (("data", -1), ("fsdp", 1)),
                   "fsdp": (("data", 1), ("fsdp", -1))}


def run_layout(config: ml_collections.ConfigDict, remat: str, params: str
               ) -> ml_collections.ConfigDict:
  """Sets the remat policy, and the parameter layout with the mesh it runs on."""
  if params not in PARAM_MESH_AXES:
    raise ValueError(f"unknown parameter layout {params!r}; expected one of "
                     f"{sorted(PARAM_MESH_AXES)}")
  config.model.remat = remat
  config.sharding.params = params
  config.mesh.axes = PARAM_MESH_AXES[params]
  return config


def sampler_fields(objective: str, **chosen) -> dict:
  """Every sampler setting of the objective's samplers with its default, then `chosen`; an
  unset default (None) is a typed placeholder, so that the command line can set it."""
  fields = {k: placeholder(setting.type) if setting.default is None else setting.default
            for k, setting in samplers.declared_settings(objective).items()}
  fields.update(chosen)
  return fields


def text_to_image(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MS-COCO text-to-image recipe (U-ViT's protocol) on a class config: the pooled CLIP
  ViT-L/14 text embedding (768) through each level's conditioning instead of the class
  embedding, SD-VAE latents with a caption folder beside them (`extract_latents
  --text_encoder`), 10% of captions dropped to the empty one for guidance, and FID-30K on
  random val2014 captions (`evaluate --workdir`). The optimizer and schedule stay the class
  recipe's."""
  config.name = config.name.replace("fcdm_", "fcdm_t2i_", 1)
  # linear, not the MLP: it learned faster on the demo (README, "The text-to-image demo").
  config.model.update(condition="text", text_dim=768, text_embedder="linear")
  config.data.update(source="latents", captions="", caption_dropout=0.1,
                     text_pooling="pooled")
  config.eval.update(kind="fid", num_samples=30000, captions="", clip="")
  return config


def get_config(variant: str = "S", resolution: int = 256, objective: str = "ddpm"
               ) -> ml_collections.ConfigDict:
  if objective not in OBJECTIVES:
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  c = ml_collections.ConfigDict()
  c.name = f"fcdm_{variant.lower()}_{resolution}_{objective}"
  c.seed = 0

  # --- the network: exactly the FCDM fields -------------------------------------
  fields = get_variant(variant)
  c.model = ml_collections.ConfigDict(dict(
      in_channels=fields["in_channels"],
      hidden_size=fields["hidden_size"],
      depth=tuple(fields["depth"]),
      mlp_ratio=fields["mlp_ratio"],
      class_dropout_prob=fields["class_dropout_prob"],
      num_classes=fields["num_classes"],
      # SiT-style flow matching predicts velocity only.
      learn_sigma=objective == "ddpm",
      # 'class' (published: y is an ImageNet label) or 'text': y is a pooled text embedding
      # of width text_dim (CLIP ViT-L/14: 768), projected per level by text_embedder
      # ('linear' or 'mlp'); caption dropout is then done outside the model.
      condition="class",
      text_dim=768,
      text_embedder="linear",
      # How it runs: compute dtype ('float32' or 'bfloat16'; params stay float32),
      # per-block rematerialisation ('none', 'block', 'dots', 'dots_no_batch'),
      # depthwise conv formulation ('auto', 'xla', 'shift', 'shift_vjp'), unrolled block scan.
      dtype="float32",
      remat="none",
      dwconv_impl="auto",
      scan_unroll=False,
  ))

  # --- data ----------------------------------------------------------------------
  c.image_size = resolution
  c.latent_size = latent_size(resolution)
  c.data = ml_collections.ConfigDict(dict(
      # A name from fcdm_jax.data.SOURCES (data/registry.py: one line per source and the
      # module that reads it), e.g. 'latents' (our shards, written by extract_latents),
      # 'tfds', 'embedded', 'npz', 'torch_features', 'torch_zarr'. Batch order: data/pipeline.py.
      source="latents",
      path="",            # the source's file or folder (latents, npz, torch_*)
      labels_path="",     # torch_features: labels folder if not the `*_labels` sibling
      tfds_name="",       # e.g. 'imagenet2012'
      data_dir="",        # TFDS data_dir (prepared; nothing is downloaded)
      image_key="image",  # TFDS feature names
      label_key="label",
      split="train",      # tfds / embedded ('train' or 'test')
      random_flip=True,   # latents: the stored posterior of the mirrored image
      vae_scale=VAE_SCALE,
      shuffle_seed=0,     # with config.seed, seeds order, flips and caption draws
      prefetch=2,         # batches kept ready by a background thread
      num_workers=4,      # threads decoding per-example files (tfds, torch_features)
      max_in_memory_gb=8.0,  # sources that load whole (tfrecord TFDS, zarr, compressed npz)
      # model.condition='text': the caption folder (fcdm_jax/data/captions.py) of the
      # dataset, and how often a step trains on the empty caption instead (for guidance).
      captions="",
      caption_dropout=0.1,
      text_pooling="pooled",   # 'pooled' (end-of-text state) or 'projected' (text_projection)
  ))

  # --- objective -------------------------------------------------------------------
  c.objective = objective
  c.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule="linear", diffusion_steps=1000))
  c.flow = ml_collections.ConfigDict(dict(
      # SiT training samples t uniformly on [0, 1] (with tiny edge offsets).
      train_eps=0.0, sample_eps=0.0))

  # --- optimisation (published: AdamW, lr 1e-4 constant, wd 0, EMA 0.9999) ---------
  c.batch_size = 256  # global
  # Gradient accumulation: the step splits the global batch into this many equal
  # micro-batches (a scan inside the one compiled step), averages their gradients and
  # updates AdamW and the EMA once. The recipe, data order, random draws and schedule
  # (counted in optimizer steps) stay the batch's: only memory and speed change.
  # batch_size must divide by grad_accum_steps x the data-parallel size.
  c.grad_accum_steps = 1
  c.num_train_steps = 2_000_000
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      warmup_steps=0, grad_clip_norm=0.0,
      # 'constant' (published) or 'cosine': decay after warmup to
      # learning_rate * final_lr_fraction at num_train_steps.
      schedule="constant", final_lr_fraction=0.0))
  c.ema_decay = 0.9999

  # --- sampling (FID setting and training previews) ------------------------------
  # Each section declares every setting of the objective's samplers (their keys and
  # defaults come from the registry, fcdm_jax.diffusion.samplers; None: the sampler's own
  # default), so `--config.sample.respacing=ddim50` and the like can set them.
  # Previews and in-training evaluation (config.eval's None: the preview's) sample with
  # what the demo's sampler table (README) found cheapest at the reference's quality;
  # config.sample keeps the paper's FID protocol.
  if objective == "ddpm":
    c.sample = ml_collections.ConfigDict(sampler_fields(
        objective, sampler="ddpm", steps=250, cfg_scale=1.5))
    # UniPC 20 steps (40 evaluations per image guided): Fréchet distance 74.3 against
    # DDIM's 79.2 at 20 steps and 77.3 at 50, and DDPM 250's 79.0 at 500 evaluations.
    c.preview = ml_collections.ConfigDict(sampler_fields(
        objective, sampler="unipc", steps=20, cfg_scale=4.0))
  else:
    c.sample = ml_collections.ConfigDict(sampler_fields(
        objective, sampler="sde", steps=250, cfg_scale=1.5))
    # UniPC 20 steps (40 evaluations per image guided): Fréchet distance 56.0, as the Heun
    # ODE's at 50 steps (196 evaluations), against the Euler SDE 250's 69.0 at 500.
    c.preview = ml_collections.ConfigDict(sampler_fields(
        objective, sampler="unipc", steps=20, cfg_scale=4.0))
  c.preview.update(every_steps=50_000, num_classes_shown=8, per_class=4)

  # Latent models' preview grids are decoded with this SD-VAE directory ('' = show the
  # first three latent channels).
  c.preview.vae_dir = ""

  # --- run layout ------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict(dict(
      # Named mesh axes and sizes; -1 takes the devices left over (set by run_layout).
      axes=PARAM_MESH_AXES["replicated"],
  ))
  # Logical axis -> mesh axis rules for params and activations (fcdm_jax.sharding).
  c.sharding = ml_collections.ConfigDict(dict(
      # 'replicated' keeps every parameter whole; 'fsdp' shards them by the rules
      # (set by run_layout, with the mesh).
      params="replicated",
      rules=(
          ("activation_batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("mlp", None),
          ("cond", "fsdp"),
          ("vocab", None),
          ("embed_in", None),
          ("embed_out", "fsdp"),
          ("layers", None),
      ),
  ))
  # Start a new run from a PyTorch checkpoint (.pt / .safetensors, published layout): its
  # weights, and its EMA, AdamW moments and step when the file has "ema" and "opt".
  # Ignored when the workdir already has checkpoints (resuming wins).
  c.init_from = ""
  # JAX's persistent compilation cache (fcdm_jax/compilation_cache.py): 'auto' =
  # JAX_COMPILATION_CACHE_DIR if set, else <workdir>/xla_cache; '' = off; or a directory.
  c.compilation_cache_dir = "auto"
  c.distributed = False  # jax.distributed.initialize() (also on when env says so)

  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3
  c.profile_steps = 0  # >0: trace this many steps after warm-up

  # --- in-training evaluation (fcdm_jax.evaluation; runs under `python -m fcdm_jax.main`) ---
  c.eval = ml_collections.ConfigDict(dict(
      enabled=False,
      # One evaluator or a comma-separated list ('fid,sample_stats'), from
      # fcdm_jax.evaluation.EVALUATORS (evaluation/registry.py), e.g. 'fid' (FID / sFID / IS
      # of num_samples samples against a reference batch, FID-k), 'sample_stats' (sample
      # vs data statistics, no weights needed), 'demo' / 'colour_digits' (the demos' judges).
      kind="fid",
      every_steps=0,       # also every N steps; 0: once, when training completes
      num_samples=5000,
      batch_size=64,       # samples per sampling step over all devices
      unguided=False,      # demo: also judge cfg_scale=1 samples from the same noise
      inception="",        # fid: pytorch-fid's FID-Inception weights (.pth / .safetensors)
      reference="",        # fid: reference batch .npz (arr_0 images and/or mu/sigma, mu_s/sigma_s)
      # fid of a text model: the caption folder whose captions condition the samples (one
      # random caption of a random example each; MS-COCO: val2014's, the FID-30K protocol)
      # and, when set, a whole CLIP model folder for the CLIP score of every sample.
      captions="",
      clip="",
      # Latent models' samples are decoded with config.preview.vae_dir.
  ))
  # Overrides of config.preview's sampler settings: every setting of config.preview, unset
  # (None: the preview's).
  c.eval.update({k: placeholder(setting.type)
                 for k, setting in samplers.declared_settings(objective).items()})
  return run_layout(c, *RUN_LAYOUTS.get((variant.upper().removeprefix("FCDM-"), resolution),
                                        ("none", "replicated")))
