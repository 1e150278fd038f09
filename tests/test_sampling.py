"""The one generator (`fcdm_jax.sampling`): the sampling CLI, training previews and the
in-training evaluation draw the same images from the same weights, seed and labels."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from fcdm_jax import config_base, sampling, sharding
from fcdm_jax.diffusion import samplers
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.demo import digit_judge as demo_eval
from fcdm_jax.models import FCDM
from fcdm_jax.sampling import run as sampling_run
from fcdm_jax.sampling.settings import sampler_settings
from fcdm_jax.train import preview as preview_lib

from helpers.runs import make_workdir
from helpers.training import DEMO_CONFIG, TESTS, load_config, sampling_config, tiny_demo_config


def demo_shaped_config():
  """The demo's shape (32x32x1 digits, 10 classes) with a model of a few channels."""
  config = tiny_demo_config("ddpm", seed=11)
  config.preview.update(sampler="ddim", steps=3, cfg_scale=4.0, eta=0.0, num_classes_shown=10,
                        per_class=1)
  config.eval.update(sampler="ddim", steps=3, cfg_scale=4.0, num_samples=10, batch_size=16)
  return config


def parse_config(path, *args):
  """The config of `--config=path args...` as a command parses it (locked, as commands get it)."""
  argv = ["prog", f"--config={path}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_every_sampler_setting_can_be_set_from_the_command_line():
  ddpm = parse_config(TESTS.parent / "configs" / "s_256.py", "--config.sample.respacing=ddim50",
                      "--config.sample.cfg_interval=(100,261)", "--config.eval.eta=0.5",
                      "--config.preview.clip_denoised=True",
                      "--config.preview.cfg_interval=100.5,300", "--config.eval.cfg_interval=none")
  assert ddpm.is_locked and ddpm.objective == "ddpm"
  sample = sampler_settings(ddpm, "sample")
  assert (sample["respacing"], sample["cfg_interval"]) == ("ddim50", (100, 261))
  assert sampler_settings(ddpm, "preview")["cfg_interval"] == (100.5, 300.0)
  assert sampler_settings(ddpm, "eval")["cfg_interval"] is None   # 'none' over the preview's
  assert sampler_settings(ddpm, "sample", {"cfg_interval": "none"})["cfg_interval"] is None
  assert sampler_settings(ddpm, "sample", {"cfg_interval": "5,6"})["cfg_interval"] == (5.0, 6.0)
  assert make_objective(ddpm).sampling_diffusion(sample).num_timesteps == 50
  assert sampler_settings(ddpm, "eval")["eta"] == 0.5
  assert sampler_settings(ddpm, "eval")["clip_denoised"] is True   # the preview's
  flow = parse_config(DEMO_CONFIG, "--config.sample.atol=1e-5", "--config.sample.sampler=ode",
                      "--config.sample.method=dopri5", "--config.sample.max_steps=64",
                      "--config.sample.last_step=None")
  sample = sampler_settings(flow, "sample")
  assert (sample["atol"], sample["method"], sample["max_steps"]) == (1e-5, "dopri5", 64)
  make_objective(flow).make_sampler(sample, null_label=10)   # valid settings
  # Every setting of every sampler of the objective is declared in each section.
  for config in (ddpm, flow):
    keys = set(samplers.setting_keys(config.objective))
    for section in ("sample", "preview", "eval"):
      assert keys <= set(config[section].keys()), section


@pytest.mark.parametrize("section", ["sample", "preview", "eval"])
def test_an_unknown_sampler_setting_is_an_error_naming_the_allowed_keys(section):
  config = config_base.get_config("S", 256, "flow")
  with config.unlocked():
    config[section].no_such_key = 1
  with pytest.raises(ValueError, match=rf"unknown config.{section} sampler settings "
                                       r"\['no_such_key'\] for the 'flow' objective; allowed "
                                       r"keys: \['sampler', 'steps', .*'atol'"):
    sampler_settings(config, section)
  config = config_base.get_config("S", 256, "ddpm")
  with pytest.raises(ValueError, match=r"overrides \['method'\] for the 'ddpm' objective; "
                                       r"allowed keys: \[.*'respacing'"):
    sampler_settings(config, section, {"method": "heun", "steps": None})
  with pytest.raises(ValueError, match=r"for the 'ddpm' objective; allowed keys"):
    make_objective(config).make_sampler(dict(sampler="ddpm", steps=5, atol=1e-3), None)
  with pytest.raises(ValueError, match=r"section 'fid'; expected one of \('sample'"):
    sampler_settings(config, "fid")


def test_the_three_sections_give_the_settings_they_gave_before():
  """sample: config.sample with the command line's overrides; preview: config.preview less
  the grid's fields; eval: the preview's with config.eval's set fields."""
  demo = load_config(DEMO_CONFIG, "flow")
  before = {   # the keys each section had before every sampler setting was declared
      "sample": dict(sampler="sde", steps=250, cfg_scale=1.5, guide_all_eps=False,
                     diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                     last_step_size=0.04),
      "preview": dict(sampler="ode", steps=25, cfg_scale=4.0, guide_all_eps=False,
                      method="euler"),
      "eval": dict(sampler="ode", steps=25, cfg_scale=4.0, guide_all_eps=False,
                   method="euler")}
  for section, old in before.items():
    now = sampler_settings(demo, section)
    sampler = samplers.get(old["sampler"], "flow")
    assert {k: now[k] for k in old} == old, section
    assert samplers.resolve(sampler, now) == samplers.resolve(sampler, old), section
  overridden = sampler_settings(demo, "sample", dict(sampler="ode", steps=None, method="heun"))
  assert (overridden["sampler"], overridden["steps"], overridden["method"]) == ("ode", 250,
                                                                                 "heun")
  ddpm = config_base.get_config("XL", 512, "ddpm")
  # The DDPM previews' UniPC 20 steps (the README's sampler table).
  assert {k: sampler_settings(ddpm, "preview")[k] for k in ("sampler", "steps",
                                                            "cfg_scale")} == \
      dict(sampler="unipc", steps=20, cfg_scale=4.0)
  # The flow previews' too; the demo keeps its measured Euler ODE, 25 steps (above).
  flow = config_base.get_config("XL", 512, "flow")
  assert {k: sampler_settings(flow, "preview")[k] for k in ("sampler", "steps",
                                                            "cfg_scale")} == \
      dict(sampler="unipc", steps=20, cfg_scale=4.0)
  ddpm.eval.steps = 10
  assert sampler_settings(ddpm, "eval") == dict(sampler_settings(ddpm, "preview"), steps=10)
  assert sampler_settings(ddpm, "sample", dict(cfg_scale=None))["cfg_scale"] == 1.5


@pytest.mark.slow
def test_cli_preview_and_eval_give_identical_images(tmp_path):
  config = demo_shaped_config()
  workdir, ema = make_workdir(tmp_path / "run", config, seed=2)
  mesh = sharding.create_mesh(config)
  params = jax.device_put(ema, sharding.replicated(mesh))
  labels = np.arange(10, dtype=np.int32)   # the grid's rows, and the eval's balanced labels

  summary = sampling_run.sample(str(tmp_path / "out"), 10, workdir=workdir, labels="balanced",
                          seed=config.seed, batch_size=16, sampler="ddim", steps=3,
                          cfg_scale=4.0, eta=0.0, progress=False)
  with np.load(summary["npz"]) as z:
    from_cli = z["arr_0"][..., :1]   # grey digits, stored as RGB
    np.testing.assert_array_equal(z["arr_1"], labels)

  previews = preview_lib.PreviewWriter(config, mesh, str(tmp_path / "run"), writer=None)
  np.testing.assert_array_equal(previews.labels, labels)
  from_preview = previews.images(params)

  [(_, eval_cfg)] = demo_eval.check_demo_eval(config, previews.generator.model,
                                              make_objective(config), workdir)
  generator = sampling.Generator(config, eval_cfg, mesh)
  from_eval, bad = demo_eval.sample_images(generator, config, params,
                                           demo_eval.balanced_labels(10), 16, "guided")

  assert from_cli.shape == (10, 32, 32, 1) and from_cli.std() > 10 and bad == 0
  np.testing.assert_array_equal(from_preview, from_cli)
  np.testing.assert_array_equal(from_eval, from_cli)
  # The samples are the labels' own: other labels give other images.
  other, _ = previews.generator.generate(params, config.seed, np.arange(10), labels[::-1])
  assert np.abs(other.astype(int) - from_cli.astype(int)).mean() > 1


def test_a_sample_depends_on_seed_and_index_only():
  config = demo_shaped_config()
  mesh = sharding.create_mesh(config)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: FCDM(**config.model).init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), np.zeros((1,), np.float32),
      np.zeros((1,), np.int32)))
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                        nn.unbox(shapes)["params"])
  params = jax.device_put(params, sharding.replicated(mesh))
  generator = sampling.Generator(config, sampler_settings(config, "preview"), mesh)
  labels = np.asarray([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], np.int32)
  images, _ = generator.generate(params, 5, np.arange(10), labels)
  # Samples 4..7 alone, in a batch of their own: the same images.
  part, _ = generator.generate(params, 5, np.arange(4, 8), labels[4:8])
  diff = np.abs(part.astype(int) - images[4:8].astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99
  other_seed, _ = generator.generate(params, 6, np.arange(10), labels)
  assert np.abs(other_seed.astype(int) - images.astype(int)).mean() > 1
  with pytest.raises(ValueError, match=r"labels \[10\] are outside \[0, 10\)"):
    generator.generate(params, 5, np.arange(2), np.asarray([1, 10]))
  with pytest.raises(ValueError, match="3 sample indices but 2 conditions"):
    generator.generate(params, 5, np.arange(3), np.asarray([1, 2]))


def test_the_sample_batch_is_split_over_devices_in_any_tracing_context():
  """Each of 8 devices samples an eighth of the batch, also when the generator is traced
  under the training step's mesh and logical rules (activation constraints inside the
  per-sample vmap would leave its batch axis whole on every device)."""
  from fcdm_jax.sharding import sharding_context
  config = demo_shaped_config()
  shapes = jax.eval_shape(lambda: nn.unbox(FCDM(**config.model).init(
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), np.zeros((1,), np.float32),
      np.zeros((1,), np.int32)))["params"])

  def flops(devices, context: bool):
    mesh = sharding.create_mesh(devices=devices)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                         sharding=sharding.replicated(mesh)),
                          shapes)
    generator = sampling.Generator(config, sampler_settings(config, "preview"), mesh)
    if context:
      with sharding_context(mesh, config):
        lowered = generator.lower(params, 16)
    else:
      lowered = generator.lower(params, 16)
    cost = lowered.compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  whole = flops(jax.devices()[:1], context=False)
  split = flops(jax.devices()[:8], context=False)
  assert split < 0.25 * whole, (split, whole)
  assert flops(jax.devices()[:8], context=True) == pytest.approx(split, rel=0.05)


def _bytes_per_device(arrays) -> dict:
  """Bytes each device holds of `arrays`, from their addressable shards; a buffer that
  several arrays view (a shard's `.data` is an array of its own) is counted once."""
  buffers = {}
  for a in arrays:
    for shard in a.addressable_shards:
      buffers[(shard.device, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
  held = {}
  for (device, _), nbytes in buffers.items():
    held[device] = held.get(device, 0) + nbytes
  return held


def _bytes_per_device_of_layout(layout) -> dict:
  """Bytes each device would hold of arrays laid out as `layout`'s abstract leaves say."""
  held = {}
  for a in jax.tree.leaves(layout):
    for device, index in a.sharding.devices_indices_map(a.shape).items():
      size = np.dtype(a.dtype).itemsize * int(np.prod(
          [len(range(*i.indices(n))) for i, n in zip(index, a.shape)]))
      held[device] = held.get(device, 0) + size
  return held


@pytest.mark.slow
def test_fsdp_checkpoint_restores_only_the_ema_sharded(tmp_path):
  """An FSDP run's EMA arrives sharded, nothing else of the state is read, and its images
  are those of a replicated restore."""
  import gc
  from fcdm_jax import checkpoint as ckpt_lib
  config = sampling_config()
  config.model.hidden_size = 32   # wide enough that most bytes are in sharded kernels
  config.sharding.params = "fsdp"
  config.mesh.axes = (("data", 1), ("fsdp", -1))
  workdir, ema = make_workdir(tmp_path / "run", config, seed=3)
  ema_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(ema))

  from fcdm_jax.checkpoint import params_layout
  layout = params_layout(config, sharding.create_mesh(config))
  wanted = max(_bytes_per_device_of_layout(layout).values())   # the EMA bytes per device

  gc.collect()
  before = _bytes_per_device(jax.live_arrays())
  params, restored_config, step = ckpt_lib.load_ema_params(workdir)
  gc.collect()
  after = _bytes_per_device(jax.live_arrays())

  held = _bytes_per_device(jax.tree.leaves(params))
  grown = max(after.get(d, 0) - before.get(d, 0) for d in after)
  assert len(held) == 8 and restored_config.sharding.params == "fsdp" and step == 7
  print(f"\nEMA {ema_bytes} B in all, {wanted} B per device in the config's FSDP shardings; "
        f"restored {max(held.values())} B on the fullest device "
        f"({max(held.values()) / wanted:.3f} of that); device memory grew by {grown} B "
        f"(the whole train state, replicated, would be {4 * ema_bytes} B per device)")
  kernel = params["latent"]["pwconv1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert wanted < 0.3 * ema_bytes             # the policy really shards most bytes
  assert max(held.values()) <= 1.1 * wanted
  assert grown <= 1.1 * wanted                # and nothing else of the state stayed behind
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ema)

  run = lambda out, cfg: sampling_run.sample(str(tmp_path / out), 8, workdir=workdir, config=cfg,
                                       batch_size=8, seed=1, progress=False)
  replicated = restored_config.copy_and_resolve_references()
  replicated.sharding.params = "replicated"
  replicated.mesh.axes = (("data", -1), ("fsdp", 1))
  fsdp_images = np.load(run("fsdp", None)["npz"])["arr_0"]
  replicated_images = np.load(run("replicated", replicated)["npz"])["arr_0"]
  assert fsdp_images.std() > 10
  np.testing.assert_array_equal(fsdp_images, replicated_images)
  other = restored_config.copy_and_resolve_references()
  other.model.hidden_size = 16
  with pytest.raises(ValueError, match=r"other model fields \(saved, now\): "
                                       r"\{'hidden_size': \(32, 16\)\}"):
    ckpt_lib.load_ema_params(workdir, config=other)
