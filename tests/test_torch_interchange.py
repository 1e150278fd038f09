"""Whole training checkpoints both ways between this project and the published PyTorch code.

Export: a tiny run is exported with `fcdm_jax.export_torch`; the `.pt` is loaded into the
PyTorch FCDM, an EMA copy and `torch.optim.AdamW(model.parameters(), weight_decay=0)` with
`load_state_dict` on all three, as the published `train.py --ckpt` does. One training step
in PyTorch and one in JAX (the project's own train step) on the same batch, times and
noise must leave the same parameters, EMA and moments.

Import: a PyTorch run of a few AdamW steps saved as the published `train.py` saves it is
taken over with `config.init_from`; again one step in each must agree.
"""

import argparse
import copy
import fractions
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fcdm_jax import convert, torch_fcdm  # noqa: E402
from fcdm_jax.diffusion import flow  # noqa: E402
from fcdm_jax.models import FCDM  # noqa: E402
from fcdm_jax import checkpoint as ckpt_lib  # noqa: E402
from fcdm_jax.train import loop, torch_state  # noqa: E402
from fcdm_jax.train.state import make_optimizer, state_layout  # noqa: E402
from fcdm_jax.train.step import make_train_step  # noqa: E402

from helpers.training import load_config, make_latent_dataset  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5
BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_latent_dataset(tmp_path_factory.mktemp("latents"))


def flow_config(dataset, **overrides):
  """The tiny test model with the flow objective and no label dropout, so both frameworks
  see exactly the same labels (the dropout draws are framework-specific)."""
  fields = {"data.path": dataset, "model.class_dropout_prob": 0.0, "num_train_steps": 4,
            "optimizer.learning_rate": 1e-3}
  fields.update(overrides)
  return load_config(arg="flow", **fields)


def fixed_batch(config, seed=1):
  rng = np.random.default_rng(seed)
  shape = (BATCH, config.latent_size, config.latent_size, config.model.in_channels)
  return dict(x1=rng.standard_normal(shape).astype(np.float32),
              x0=rng.standard_normal(shape).astype(np.float32),
              t=rng.uniform(0, 1, BATCH).astype(np.float32),
              y=rng.integers(0, config.model.num_classes, BATCH).astype(np.int32))


class FixedFlowObjective:
  """The flow-matching loss at given times and noise instead of drawn ones."""

  def __init__(self, x0, t):
    self.x0, self.t = x0, t

  def loss(self, model_fn, x_start, rng, positions=None):
    del rng, positions
    return dict(loss=flow.training_loss(model_fn, x_start, self.x0, self.t))


def jax_step(config, state, batch):
  """One step of the project's train step (AdamW from the config, EMA) on device."""
  model = FCDM(**config.model)
  step = make_train_step(config, model, FixedFlowObjective(batch["x0"], batch["t"]),
                         make_optimizer(config))
  new_state, metrics = jax.jit(step)(jax.device_put(state),
                                     {"x": batch["x1"], "y": batch["y"]})
  return jax.device_get(new_state), float(metrics["loss"])


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)))


def torch_step(model, ema, opt, batch, decay):
  """The published training step for the flow objective: loss, backward, AdamW, EMA."""
  model.train()
  x1, x0 = nchw(batch["x1"]), nchw(batch["x0"])
  t = torch.from_numpy(batch["t"])
  te = t[:, None, None, None]
  out = model(te * x1 + (1 - te) * x0, t, torch.from_numpy(batch["y"].astype(np.int64)))
  loss = ((out - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
  opt.zero_grad()
  loss.backward()
  opt.step()
  with torch.no_grad():  # the published update_ema
    for e, p in zip(ema.parameters(), model.parameters()):
      e.mul_(decay).add_(p.detach(), alpha=1 - decay)
  return float(loss.detach())


def assert_state_dicts_close(ours, theirs, what):
  assert list(ours) == list(theirs), f"{what}: key order differs"
  for key in ours:
    a = np.asarray(ours[key], np.float64)
    b = theirs[key].detach().numpy().astype(np.float64)
    assert a.shape == b.shape, f"{what} {key}: shape {a.shape} vs {b.shape}"
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * max(np.abs(b).max(), 1e-30),
                               err_msg=f"{what} {key}")


def torch_moments(opt, model, which):
  return {k: opt.state[p][which] for k, p in zip(model.state_dict(), model.parameters())}


def assert_same_training_state(config, jax_state, model, ema, opt):
  assert_state_dicts_close(convert.params_to_torch(jax_state.params), model.state_dict(), "params")
  assert_state_dicts_close(convert.params_to_torch(jax_state.ema_params), ema.state_dict(), "EMA")
  adam = torch_state._adam_state(jax_state.opt_state)
  assert_state_dicts_close(convert.params_to_torch(adam.mu),
                           torch_moments(opt, model, "exp_avg"), "exp_avg")
  assert_state_dicts_close(convert.params_to_torch(adam.nu),
                           torch_moments(opt, model, "exp_avg_sq"), "exp_avg_sq")
  steps = {float(opt.state[p]["step"]) for p in model.parameters()}
  assert steps == {float(adam.count)} == {float(jax_state.step)}


def step_both_and_compare(config, state, torch_modules, batch):
  """The two states agree; one step in each on the same batch; they still agree."""
  model, ema, opt = torch_modules
  assert_same_training_state(config, state, model, ema, opt)
  torch_loss = torch_step(model, ema, opt, batch, config.ema_decay)
  new_state, jax_loss = jax_step(config, state, batch)
  assert jax_loss == pytest.approx(torch_loss, rel=1e-5)
  assert_same_training_state(config, new_state, model, ema, opt)


def published_modules(config, lr):
  model = torch_fcdm.from_config(config.model)
  ema = copy.deepcopy(model)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
  return model, ema, opt


def abstract_state(config):
  """The run's abstract train state on one device."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  shape = (config.latent_size, config.latent_size, config.model.in_channels)
  return state_layout(config, FCDM(**config.model), make_optimizer(config), mesh, shape)[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dataset):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = flow_config(dataset)
  summary = loop.train_and_evaluate(config, workdir)
  assert summary["end_step"] == 4
  return config, workdir


@pytest.mark.slow
def test_exported_pt_resumes_in_the_published_training_step(trained_run, tmp_path):
  config, workdir = trained_run
  out = str(tmp_path / "run.pt")
  summary = torch_state.export_checkpoint(workdir, out)
  assert summary["step"] == 4

  ckpt = torch.load(out)  # the published default: weights_only=True
  assert set(ckpt) == {"model", "ema", "opt", "args"}
  group = ckpt["opt"]["param_groups"][0]
  assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
  assert group["weight_decay"] == 0 and group["lr"] == pytest.approx(1e-3)
  model, ema, opt = published_modules(config, lr=1e-3)
  model.load_state_dict(ckpt["model"])
  ema.load_state_dict(ckpt["ema"])
  opt.load_state_dict(ckpt["opt"])

  state, _, _ = torch_state.restore_on_host(workdir)
  step_both_and_compare(config, state, (model, ema, opt), fixed_batch(config))


@pytest.mark.slow
def test_exported_safetensors_holds_the_ema_weights(trained_run, tmp_path):
  config, workdir = trained_run
  out = str(tmp_path / "ema.safetensors")
  torch_state.export_checkpoint(workdir, out, step=2)
  from safetensors.torch import load_file
  state, _, _ = torch_state.restore_on_host(workdir, step=2)
  model = torch_fcdm.from_config(config.model)
  model.load_state_dict(load_file(out), strict=True)
  assert_state_dicts_close(convert.params_to_torch(state.ema_params), model.state_dict(), "EMA")


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory, dataset):
  """Three AdamW steps of the published PyTorch code, saved as its train.py saves them."""
  config = flow_config(dataset)
  torch.manual_seed(0)
  model, ema, opt = published_modules(config, lr=1e-3)
  with torch.no_grad():  # random values everywhere, zero-initialised layers too
    for p in model.parameters():
      p.normal_(0, 0.1)
  ema.load_state_dict(model.state_dict())
  for i in range(3):
    torch_step(model, ema, opt, fixed_batch(config, seed=10 + i), config.ema_decay)
  path = str(tmp_path_factory.mktemp("torch") / "published.pt")
  args = argparse.Namespace(model="FCDM-tiny", image_size=64, global_batch_size=8, lr=1e-3)
  torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
              "args": args}, path)
  return config, path, (model, ema, opt)


@pytest.mark.slow
def test_init_from_takes_over_weights_ema_and_adamw(published_checkpoint):
  config, path, (model, ema, opt) = published_checkpoint
  config = flow_config(config.data.path, init_from=path)
  abstract = abstract_state(config)
  state = jax.device_get(torch_state.state_from_torch(path, config, abstract))
  assert int(state.step) == 3
  step_both_and_compare(config, state, (model, ema, opt), fixed_batch(config, seed=99))


@pytest.mark.slow
def test_init_from_in_the_loop_continues_at_the_torch_step(published_checkpoint, tmp_path):
  config, path, _ = published_checkpoint
  workdir = str(tmp_path / "continued")
  config = flow_config(config.data.path, init_from=path, num_train_steps=5)
  summary = loop.train_and_evaluate(config, workdir)
  assert (summary["start_step"], summary["end_step"]) == (3, 5)
  assert ckpt_lib.Checkpointer(workdir, keep=10, read_only=True).all_steps() == [4, 5]
  # A workdir with checkpoints resumes them; init_from is ignored.
  config = flow_config(config.data.path, init_from=path, num_train_steps=6)
  summary = loop.train_and_evaluate(config, workdir)
  assert (summary["start_step"], summary["end_step"]) == (5, 6)


def test_init_from_weights_only_files_start_a_fresh_optimizer(published_checkpoint, tmp_path):
  config, path, (model, _, _) = published_checkpoint
  st = str(tmp_path / "weights.safetensors")
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
  config = flow_config(config.data.path, init_from=st)
  abstract = abstract_state(config)
  state = jax.device_get(torch_state.state_from_torch(st, config, abstract))
  assert int(state.step) == 0
  assert_state_dicts_close(convert.params_to_torch(state.params), model.state_dict(), "params")
  assert_state_dicts_close(convert.params_to_torch(state.ema_params), model.state_dict(), "EMA")
  adam = torch_state._adam_state(state.opt_state)
  assert int(adam.count) == 0 and not any(np.any(m) for m in jax.tree.leaves(adam.mu))


# ----------------------------------------------------------------------------- refusals


class NotATensor:
  """A Python object in a pickle: weights-only loading must refuse it."""


def test_init_from_refuses_bad_files(published_checkpoint, tmp_path):
  config, path, _ = published_checkpoint
  abstract = abstract_state(config)
  load = lambda p: torch_state.host_state_from_torch(str(p), config, abstract)

  with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
    load(tmp_path / "missing.pt")
  other = torch_fcdm.FCDM(in_channels=4, hidden_size=16, depth=(1, 1, 1, 1, 1), mlp_ratio=3.0,
                          class_dropout_prob=0.0, num_classes=4, learn_sigma=False)
  torch.save({"model": other.state_dict(), "ema": other.state_dict()}, tmp_path / "other.pt")
  with pytest.raises(ValueError,
                     match=r"does not fit the config.s model.*keys of the wrong shape"):
    load(tmp_path / "other.pt")
  data = pathlib.Path(path).read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"cut.pt is damaged \(truncated\?\)"):
    load(tmp_path / "cut.pt")
  (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
  with pytest.raises(ValueError, match=r"cut.safetensors is damaged \(truncated\?\)"):
    load(tmp_path / "cut.safetensors")
  torch.save({"model": {}, "hook": NotATensor(), "f": fractions.Fraction(1, 3)},
             tmp_path / "code.pt")
  with pytest.raises(ValueError, match=r"refusing to load .*code.pt: it is a pickle holding "
                                       "Python objects"):
    load(tmp_path / "code.pt")
  with torch.serialization.safe_globals([argparse.Namespace]):
    ckpt = torch.load(path)
  ckpt["opt"]["state"].pop(0)
  torch.save(ckpt, tmp_path / "partial_opt.pt")
  with pytest.raises(ValueError, match="optimizer has no moments for 1 parameters"):
    load(tmp_path / "partial_opt.pt")


@pytest.mark.slow
def test_export_refuses_bad_requests(trained_run, tmp_path):
  config, workdir = trained_run
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    torch_state.export_checkpoint(str(tmp_path / "empty_run"), str(tmp_path / "x.pt"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3 .* it has steps \[2, 4\]"):
    torch_state.export_checkpoint(workdir, str(tmp_path / "x.pt"), step=3)
  with pytest.raises(ValueError, match="must end in .pt"):
    torch_state.export_checkpoint(workdir, str(tmp_path / "x.ckpt"))
  existing = tmp_path / "exists.pt"
  existing.write_bytes(b"keep me")
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    torch_state.export_checkpoint(workdir, str(existing))
  assert existing.read_bytes() == b"keep me"
  torch_state.export_checkpoint(workdir, str(existing), overwrite=True)
  assert set(torch.load(existing)) == {"model", "ema", "opt", "args"}


@pytest.mark.slow
def test_export_reports_a_damaged_checkpoint(trained_run, tmp_path):
  import shutil
  _, workdir = trained_run
  copy_dir = tmp_path / "damaged_run"
  shutil.copytree(workdir, copy_dir)
  step_dir = copy_dir / "checkpoints" / "4" / "state"
  biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:7])
  with pytest.raises(ValueError, match=r"checkpoint at step 4 in .* cannot be read"):
    torch_state.export_checkpoint(str(copy_dir), str(tmp_path / "x.pt"))


@pytest.mark.slow
def test_export_command_line(trained_run, tmp_path):
  _, workdir = trained_run
  run = lambda *a: subprocess.run([sys.executable, "-m", "fcdm_jax.export_torch", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
  proc = run("--help")  # absl prints the usage and exits with status 1
  assert "train.py --ckpt" in proc.stdout and "--overwrite" in proc.stdout
  out = tmp_path / "cli.safetensors"
  proc = run(f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert f"{out}: step 4 (EMA weights)" in proc.stdout
  proc = run(f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 1 and "exists; pass --overwrite" in proc.stderr
