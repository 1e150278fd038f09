"""`fcdm_jax.sample` on tiny untrained models (a workdir checkpoint and a published-layout
file): ADM batches that `fcdm_jax.evaluate` reads, determinism, resuming, the VAE decode of
latent models, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jax

from fcdm_jax import convert, distributed, sampling
from fcdm_jax.diffusion import samplers
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.sampling import run as sampling_run
from fcdm_jax.sampling import weights as sampling_weights
from fcdm_jax.evaluation import adm
from fcdm_jax.sampling import output as sample_output
from fcdm_jax.sampling.settings import sampler_settings
from fcdm_jax.models import vae as vae_lib

from helpers.model_files import TINY_VAE, write_inception, write_vae_dir
from helpers.runs import STEP, make_workdir
from helpers.training import sampling_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("sample")
  workdir, ema = make_workdir(d / "run", sampling_config())
  return dict(base=d, workdir=workdir, ema=ema)


def _cli(*args, devices=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", "fcdm_jax.sample", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_sample_then_evaluate(pixel_run):
  d = pixel_run["base"]
  out = d / "cli_out"
  proc = _cli(f"--workdir={pixel_run['workdir']}", "--num_samples=10", f"--out={out}",
              "--sampler=ddpm", "--steps=3", "--cfg_scale=2.0", "--batch_size=8", "--png",
              "--seed=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  npz = out / "samples_10x8x8x3.npz"
  assert str(npz) in proc.stdout
  with np.load(npz, allow_pickle=False) as z:
    assert sorted(z.files) == ["arr_0", "arr_1"]
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8
  assert labels.shape == (10,) and set(labels.tolist()) <= {0, 1, 2}
  # One-channel samples: grey PNGs, replicated to RGB in the batch.
  assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 0],
                                                                           images[..., 2])
  assert images.std() > 10   # not a constant image
  pngs = sorted(os.listdir(out / "png"))
  assert pngs == [f"{i:06d}.png" for i in range(10)]
  png = np.asarray(Image.open(out / "png" / "000004.png"))
  np.testing.assert_array_equal(png, images[4, ..., 0])
  assert not (out / "parts").exists()   # removed once the batch is written
  settings = json.loads((out / "sample_settings.json").read_text())
  assert settings["sample"]["cfg_scale"] == 2.0 and settings["weights"]["step"] == STEP

  # ... and the batch goes straight into the evaluator.
  ref = d / "ref.npz"
  rng = np.random.default_rng(0)
  np.savez(ref, arr_0=rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8))
  results = adm.evaluate(str(npz), str(ref), write_inception(d / "inception.safetensors"),
                              batch_size=8, which=("is", "pr"), split_size=5)
  assert results["num_samples"] == 10 and results["num_reference"] == 9
  assert results["inception_score"] >= 0.99
  assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1


@pytest.mark.slow
def test_same_seed_same_images_whatever_the_batch(pixel_run):
  d = pixel_run["base"]
  run = lambda out, **kw: sampling_run.sample(str(d / out), 10, workdir=pixel_run["workdir"],
                                        progress=False, **kw)
  a = run("a", batch_size=8, seed=1, labels="balanced")
  b = run("b", batch_size=16, seed=1, labels="balanced")
  c = run("c", batch_size=8, seed=2, labels="balanced")
  load = lambda s: np.load(s["npz"])["arr_0"]
  assert a["generated"] == [0, 1] and b["generated"] == [0]
  diff = np.abs(load(a).astype(int) - load(b).astype(int))
  assert diff.max() <= 1 and (diff == 0).mean() > 0.99   # float rounding of other batch shapes
  assert np.abs(load(a).astype(int) - load(c).astype(int)).mean() > 5
  np.testing.assert_array_equal(np.load(a["npz"])["arr_1"], np.arange(10) % 3)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_multistep_solver_with_a_guidance_interval_records_its_cost(pixel_run, solver):
  """`sample --sampler=dpmpp_2m|unipc --steps=20 --cfg_interval=100,261` writes the ADM batch
  with the evaluations per image in sample_settings.json (20 conditional + one null-row
  evaluation per step inside the interval); sample i is the same whatever the batch size
  (8 devices here) and device count (2, in the command)."""
  d = pixel_run["base"]
  chosen = dict(sampler=solver, steps=20, cfg_scale=2.0, cfg_interval="100,261")
  run = lambda out, batch: sampling_run.sample(str(d / out), 10, workdir=pixel_run["workdir"],
                                               progress=False, seed=4, labels="balanced",
                                               batch_size=batch, **chosen)
  a, b = run(f"{solver}_8", 8), run(f"{solver}_16", 16)
  out = d / f"{solver}_cli"
  proc = _cli(f"--workdir={pixel_run['workdir']}", "--num_samples=10", f"--out={out}",
              f"--sampler={solver}", "--steps=20", "--cfg_scale=2.0", "--cfg_interval=100,261",
              "--batch_size=4", "--seed=4", "--labels=balanced", devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]

  objective = make_objective(sampling_config())
  times = objective_time_grid(objective, solver, 20)
  inside = int(np.sum((times >= 100) & (times <= 261)))
  assert 0 < inside < 20
  cost = {"evaluations_per_image": 20 + inside, "evaluations_counted": "time grid"}
  assert f"; {20 + inside} network evaluations per image" in proc.stdout
  for folder, summary in ((d / f"{solver}_8", a), (d / f"{solver}_16", b), (out, None)):
    settings = json.loads((folder / "sample_settings.json").read_text())
    assert settings["cost"] == cost, folder
    assert settings["sample"]["cfg_interval"] == [100.0, 261.0]
    assert summary is None or summary["cost"] == cost
  load = lambda folder: np.load(folder / "samples_10x8x8x3.npz")["arr_0"].astype(int)
  for other in (d / f"{solver}_16", out):
    diff = np.abs(load(d / f"{solver}_8") - load(other))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, other   # float rounding only
  again = run(f"{solver}_8", 8)   # complete: nothing sampled, the recorded cost returned
  assert again["generated"] == [] and again["cost"] == cost


@pytest.mark.slow
def test_adaptive_dopri5_records_its_measured_cost(tmp_path):
  """dopri5's evaluations depend on the data: none are recorded before it runs, its
  measured mean and maximum once the batch is complete."""
  workdir, _ = make_workdir(tmp_path / "run", sampling_config(objective="flow"), seed=1)
  out = tmp_path / "dopri5"
  summary = sampling_run.sample(str(out), 5, workdir=workdir, batch_size=8, progress=False,
                                sampler="ode", method="dopri5", cfg_scale=2.0,
                                cfg_interval="0.3,0.7")
  cost = summary["cost"]
  assert cost["evaluations_counted"] == "measured"
  # f(0) alone (0 is outside the interval) + 2 rows for each other evaluation, 6 per attempt.
  assert 1 + 2 * (1 + 6) <= cost["evaluations_per_image"] <= cost["evaluations_per_image_max"]
  assert json.loads((out / "sample_settings.json").read_text())["cost"] == cost


def objective_time_grid(objective, solver, steps):
  return samplers.get(solver, objective.name).model_times(
      objective, samplers.resolve(samplers.get(solver, objective.name), dict(steps=steps)))


def test_resume_recomputes_only_missing_parts(pixel_run):
  d = pixel_run["base"]
  out = d / "resume"
  run = lambda **kw: sampling_run.sample(str(out), 20, workdir=pixel_run["workdir"], batch_size=8,
                                   keep_parts=True, progress=False, seed=5, **kw)
  first = run()
  assert first["generated"] == [0, 1, 2]
  parts = sorted((out / "parts").iterdir())
  assert [p.name for p in parts] == ["part-00000000-00000008.npz", "part-00000008-00000016.npz",
                                     "part-00000016-00000020.npz"]
  before = np.load(first["npz"])["arr_0"]
  os.remove(first["npz"])
  os.remove(parts[1])
  for p in (parts[0], parts[2]):
    os.utime(p, ns=(1, 1))
  second = run()
  assert second["generated"] == [1] and second["kept"] == [0, 2]
  assert os.stat(parts[0]).st_mtime_ns == 1 and os.stat(parts[2]).st_mtime_ns == 1
  np.testing.assert_array_equal(np.load(second["npz"])["arr_0"], before)
  third = run(png=True)   # finished: nothing to sample, PNGs from the batch
  assert third["generated"] == [] and os.path.exists(third["npz"])
  assert len(os.listdir(out / "png")) == 20
  np.testing.assert_array_equal(np.asarray(Image.open(out / "png" / "000013.png")),
                                before[13, ..., 0])


def test_a_folder_recorded_before_sampler_settings_were_declared_resumes(pixel_run):
  """Sample folders record the settings the sampler runs with; one written when the config
  declared fewer keys (sampler, steps, cfg_scale, guide_all_eps, eta) samples alike and is
  taken as the same, while a real change is still refused."""
  out = pixel_run["base"] / "old_record"
  run = lambda **kw: sampling_run.sample(str(out), 4, workdir=pixel_run["workdir"], batch_size=8,
                                         progress=False, seed=2, **kw)
  first = run(sampler="ddpm", steps=3)
  record = out / "sample_settings.json"
  saved = json.loads(record.read_text())
  saved["sample"] = {"sampler": "ddpm", "steps": 3, "cfg_scale": saved["sample"]["cfg_scale"],
                     "guide_all_eps": False, "eta": 0.0}   # the record's form before
  record.write_text(json.dumps(saved))
  again = run(sampler="ddpm", steps=3)
  assert again["generated"] == [] and again["npz"] == first["npz"]
  with pytest.raises(ValueError, match="made with different settings"):
    run(sampler="ddpm", steps=4)


@pytest.mark.slow
def test_published_checkpoint_and_latent_model_with_vae(tmp_path):
  """A latent model's weights from its workdir and from a published-layout .safetensors file
  are the same, and its images are the VAE decode of its latents divided by vae_scale."""
  config = sampling_config(latent=True)
  workdir, ema = make_workdir(tmp_path / "run", config, seed=4)
  vae_dir = write_vae_dir(tmp_path / "vae", TINY_VAE)
  weights = str(tmp_path / "fcdm.safetensors")
  convert.save_torch_checkpoint(weights, ema, ema)
  # The same weights, whether from the run or from the published-layout file.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
  from_file = sampling_weights.load_model(*sampling_weights.resolve_model(None, weights, config, None), mesh)
  from_run = sampling_weights.load_model(*sampling_weights.resolve_model(workdir, None, None, None), mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_file),
               jax.device_get(from_run))

  result = sampling_run.sample(str(tmp_path / "a"), 5, torch_checkpoint=weights, config=config,
                         vae=vae_dir, batch_size=8, progress=False, seed=3, sampler="ddim",
                         steps=2)
  with np.load(result["npz"]) as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (5, 8, 8, 3)   # 4x4 latents, VAE factor 2
  decoder = sampling.image_decoder(config, vae_dir, mesh, "--vae")
  gen = sampling.Generator(config, sampler_settings(
      config, "sample", dict(sampler="ddim", steps=2)), mesh, decoder)
  again, lat = gen.generate(from_file, 3, np.arange(8), np.resize(labels, 8))
  np.testing.assert_array_equal(again[:5], images)
  model, params = vae_lib.load_vae(vae_dir)
  decoded = jax.jit(lambda p, z: model.apply(p, z / 0.5, method=model.decode))(params, lat[:5])
  want = np.asarray(sampling.to_uint8(decoded))
  assert lat.shape == (8, 4, 4, 4)
  assert np.abs(want.astype(int) - images.astype(int)).max() <= 1

  with pytest.raises(ValueError, match="--vae must name the SD-VAE directory"):
    sampling_run.sample(str(tmp_path / "c"), 2, workdir=workdir, progress=False)
  with pytest.raises(FileNotFoundError, match="VAE directory not found"):
    sampling_run.sample(str(tmp_path / "c"), 2, workdir=workdir, vae=str(tmp_path / "nope"),
                  progress=False)
  other = write_vae_dir(tmp_path / "vae8", dict(TINY_VAE, latent_channels=8))
  with pytest.raises(ValueError, match="8 latent channels, the model samples 4"):
    sampling_run.sample(str(tmp_path / "c"), 2, workdir=workdir, vae=other, progress=False)


def test_bad_input(pixel_run, tmp_path):
  workdir = pixel_run["workdir"]
  run = lambda out=str(tmp_path / "o"), n=2, **kw: sampling_run.sample(out, n, progress=False, **kw)
  with pytest.raises(ValueError, match="--num_samples must be a positive integer, got 0"):
    run(n=0, workdir=workdir)
  with pytest.raises(ValueError, match="--num_samples must be a positive integer, got -3"):
    run(n=-3, workdir=workdir)
  with pytest.raises(FileNotFoundError, match="workdir .*missing does not exist"):
    run(workdir=str(tmp_path / "missing"))
  (tmp_path / "empty_run").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty_run"):
    run(workdir=str(tmp_path / "empty_run"))
  assert not (tmp_path / "empty_run" / "checkpoints").exists()
  with pytest.raises(ValueError, match="exactly one of --workdir"):
    run()
  config = sampling_config()
  with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
    run(torch_checkpoint=str(tmp_path / "fcdm.pt"), config=config)
  with pytest.raises(ValueError, match="needs --config"):
    run(torch_checkpoint=str(tmp_path / "fcdm.pt"))
  from safetensors.numpy import save_file
  vae_like = str(tmp_path / "vae.safetensors")   # the weights of another model
  save_file({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)}, vae_like)
  with pytest.raises(ValueError, match="vae.safetensors: not an FCDM state_dict|does not fit"):
    run(torch_checkpoint=vae_like, config=config)
  assert not (tmp_path / "o").exists()   # nothing written before the weights loaded
  with pytest.raises(ValueError, match=r"labels \[5\] are outside \[0, 3\)"):
    run(workdir=workdir, labels="1,5")
  with pytest.raises(ValueError, match="sampler 'sde' does not serve the 'ddpm' objective"):
    run(workdir=workdir, sampler="sde")
  with pytest.raises(ValueError, match="--vae is for latent models only"):
    run(workdir=workdir, vae=str(tmp_path))

  # A finished batch of other settings is refused and left as it was.
  out = str(tmp_path / "done")
  done = run(out=out, n=3, workdir=workdir, seed=0, batch_size=8)
  stamp = os.stat(done["npz"]).st_mtime_ns
  with pytest.raises(ValueError, match=r"holds a finished sample batch .* different settings "
                                       r".*'seed': \(0, 1\)"):
    run(out=out, n=3, workdir=workdir, seed=1, batch_size=8)
  with pytest.raises(ValueError, match="different settings .*num_samples"):
    run(out=out, n=4, workdir=workdir, seed=0, batch_size=8)
  assert os.stat(done["npz"]).st_mtime_ns == stamp
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  np.savez(foreign / "samples_3x8x8x3.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="without sample_settings.json: refusing to overwrite"):
    run(out=str(foreign), n=3, workdir=workdir)


@pytest.mark.slow
def test_cli_help_and_errors(tmp_path):
  proc = _cli("--help")
  for flag in ("--workdir", "--torch_checkpoint", "--config", "--num_samples", "--sampler",
               "--steps", "--cfg_scale", "--cfg_interval", "--out", "--vae", "--labels",
               "--[no]png", "--seed", "--config.sample.cfg_interval=100,261"):
    assert flag in proc.stdout
  proc = _cli(f"--workdir={tmp_path}", "--num_samples=0", f"--out={tmp_path / 'o'}")
  assert proc.returncode != 0 and "error: --num_samples must be a positive integer" in proc.stderr


def test_out_refused_on_host0_stops_every_host(pixel_run, tmp_path, monkeypatch):
  """Host 0 alone reads --out; its refusal is broadcast, so the other hosts raise too
  rather than wait for host 0 at the next collective."""
  workdir = pixel_run["workdir"]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  np.savez(foreign / "samples_3x8x8x3.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
  shared = []

  def broadcast(value):  # host 0's side: record what it tells the others
    shared.append(int(value))
    return value

  monkeypatch.setattr(distributed, "broadcast_from_host0", broadcast)
  with pytest.raises(ValueError, match="refusing to overwrite"):
    sampling_run.sample(str(foreign), 3, workdir=workdir, progress=False)
  assert shared == [sample_output.OUT_REFUSED]

  # Another host: it never reads --out and gets host 0's verdict.
  monkeypatch.setattr(distributed, "broadcast_from_host0",
                      lambda value: np.int32(sample_output.OUT_REFUSED))
  monkeypatch.setattr(sampling_run.jax, "process_index", lambda: 1)
  out = tmp_path / "other_host"
  with pytest.raises(ValueError, match="host 0 refused --out .*other_host"):
    sampling_run.sample(str(out), 3, workdir=workdir, progress=False)
  assert not out.exists()
