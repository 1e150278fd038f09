"""Gradient accumulation (`config.grad_accum_steps`): a step over A micro-batches is the
step over the whole batch, to float rounding.

Every random draw of an example (latent posterior, time, noise, label dropout) is keyed by
the step and the example's position in the global batch, the micro-batches are split in
place on each device, and AdamW and the EMA update once per step. Runs on the 8 fake CPU
devices of conftest.py; the crash test runs the real command in subprocesses.
"""

import re
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax import config_checks, sharding
from fcdm_jax import data as data_lib
from fcdm_jax.diffusion.objectives import make_objective
from fcdm_jax.models import FCDM
from fcdm_jax.models.layers import LabelEmbedder
from fcdm_jax.train import loop
from fcdm_jax.train.state import create_train_state, make_optimizer, state_layout
from fcdm_jax.train.step import jit_train_step, make_train_step, micro_batches

from helpers.runs import mesh_of, restore_final, run_main, wait_for_checkpoint
from helpers.training import TESTS, load_config, make_latent_dataset, tiny_model_overrides

BATCH = 32          # 4 micro-batches x 8 devices x 1 example
COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce",
               "reduce-scatter")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_latent_dataset(tmp_path_factory.mktemp("latents"))


def class_config(dataset, **overrides):
  """tests/configs/tiny.py: DDPM with learned variance (MSE + VB), latent posteriors,
  label dropout 0.1."""
  return load_config(**{"data.path": dataset, "batch_size": BATCH, **overrides})


def text_config(**overrides):
  """configs/t2i_demo.py (flow matching, text embeddings, gradient clipping, warmup and
  cosine schedule) with tiny.py's model on 8x8 images."""
  return load_config(TESTS.parent / "configs" / "t2i_demo.py", None, **{
      **tiny_model_overrides(), "image_size": 8, "latent_size": 8, "batch_size": BATCH,
      "optimizer.warmup_steps": 1, **overrides})


def batches(config, dataset, count=3):
  """The first `count` batches: from the latent pipeline for a class config, random
  images and text embeddings for the text config."""
  if config.model.condition == "class":
    source = data_lib.make_source(config, process_index=0, process_count=1)
    return [source.batch(step) for step in range(count)]
  rng = np.random.default_rng(0)
  shape = (BATCH, config.latent_size, config.latent_size, config.model.in_channels)
  return [dict(x=rng.uniform(-1, 1, shape).astype(np.float32),
               y=rng.normal(size=(BATCH, config.model.text_dim)).astype(np.float32))
          for _ in range(count)]


def train(config, mesh, host_batches):
  model, tx = FCDM(**config.model), make_optimizer(config)
  shape = (config.latent_size, config.latent_size, config.model.in_channels)
  state, _, shardings = create_train_state(config, model, tx, mesh, shape)
  step = jit_train_step(make_train_step(config, model, make_objective(config), tx), mesh,
                        shardings, config)
  metrics = []
  for b in host_batches:
    state, m = step(state, sharding.global_batch(b, mesh))
    metrics.append(jax.device_get(m))
  device_batch = sharding.global_batch(host_batches[0], mesh)
  hlo = step.lower(state, device_batch).compile().as_text()
  return jax.device_get(state), metrics, hlo


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def collectives(hlo: str) -> dict[tuple[bool, str], int]:
  """{(in the entry computation, op): count} of the cross-device ops of a compiled module."""
  counts, entry = {}, False
  for line in hlo.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      entry = line.startswith("ENTRY")
    m = re.search(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
    if m and " = " in line:
      counts[(entry, m.group(1))] = counts.get((entry, m.group(1)), 0) + 1
  return counts


# --------------------------------------------------------------------- draws and the split


def test_time_and_noise_draws_are_keyed_by_position():
  """An example draws the same time and noise in any sub-batch that gives its position."""
  key, x = jax.random.key(4), jax.random.normal(jax.random.key(5), (8, 2, 2, 4))
  pick = np.array([6, 1, 3])
  for objective_name in ("ddpm", "flow"):
    objective = make_objective(load_config(arg=objective_name))
    if objective_name == "ddpm":
      model_fn = lambda x_t, t: jnp.concatenate([0.5 * x_t, jnp.tanh(x_t)], -1)
    else:
      model_fn = lambda x_t, t: 0.5 * x_t
    whole = objective.loss(model_fn, x, key)
    part = objective.loss(model_fn, x[pick], key, jnp.asarray(pick, jnp.uint32))
    for name in whole:
      np.testing.assert_allclose(np.asarray(whole[name])[pick], part[name], rtol=1e-6)
    assert len(set(np.round(np.asarray(whole["loss"]), 5))) == 8   # each its own draw


def test_label_dropout_is_keyed_by_position():
  embedder = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.5)
  labels = jnp.arange(64) % 10
  params = embedder.init(jax.random.key(0), labels, False)
  rngs = {"label_dropout": jax.random.key(1)}
  whole = embedder.apply(params, labels, True, rngs=rngs)
  null_row = np.asarray(nn.unbox(params)["params"]["embedding_table"][10])
  dropped = np.all(np.asarray(whole) == null_row, axis=-1)
  assert 16 < dropped.sum() < 48
  pick = np.arange(3, 64, 4)
  part = embedder.apply(params, labels[pick], True, positions=jnp.asarray(pick, jnp.uint32),
                        rngs=rngs)
  np.testing.assert_array_equal(np.asarray(whole)[pick], part)


@pytest.mark.parametrize("shape", [(8, 1), (1, 8), (2, 4)])
def test_micro_batches_stay_on_the_devices_of_their_examples(shape):
  """The split moves no data between devices: each device's micro-batch j is examples
  j, j + A, ... of its own block of the batch, and the compiled split has no collective."""
  mesh, accum = mesh_of(8, *shape), 4
  batch = np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3)
  split = jax.jit(lambda a: micro_batches(a, accum))
  array = jax.device_put(batch, sharding.batch_sharding(mesh))
  with sharding.sharding_context(mesh, load_config()):
    hlo = split.lower(array).compile().as_text()
    out = split(array)
  assert not collectives(hlo), collectives(hlo)
  assert out.shape == (accum, BATCH // accum, 3)
  whole = {s.device: s.data for s in array.addressable_shards}
  for s in out.addressable_shards:
    assert s.data.shape == (accum, BATCH // accum // 8, 3)
    np.testing.assert_array_equal(np.asarray(s.data),
                                  np.asarray(whole[s.device]).reshape(-1, accum, 3)
                                  .swapaxes(0, 1))


# -------------------------------------------------------------------------------- checks


def test_grad_accum_steps_is_checked_at_start_up(tmp_path, dataset):
  with pytest.raises(ValueError, match=r"config\.grad_accum_steps must be an integer >= 1, "
                     "got 0"):
    config_checks.check_config(class_config(dataset, grad_accum_steps=0), training=True)
  with pytest.raises(ValueError, match=r"config\.batch_size=30 is not divisible by "
                     r"config\.grad_accum_steps=4"):
    config_checks.check_config(class_config(dataset, batch_size=30, grad_accum_steps=4),
                               training=True)
  with pytest.raises(ValueError, match="batch_size 16 is not divisible by grad_accum_steps 4 "
                     "x the data-parallel size 8"):
    loop.train_and_evaluate(class_config(dataset, batch_size=16, grad_accum_steps=4),
                            str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------- the equivalence


# Each layout and each condition once (the full cross, 4 cases, took twice the time and
# passed alike): the layouts differ in the step's collectives, the conditions in the batch.
@pytest.mark.slow
@pytest.mark.parametrize("condition, params", [("class", "replicated"), ("text", "fsdp")])
def test_accumulated_steps_equal_the_whole_batch_steps(dataset, condition, params):
  """3 steps with grad_accum_steps 1 and 4 on 8 devices: parameters, EMA, AdamW moments
  and the logged (global-batch mean) metrics agree to 1e-5 relative."""
  mesh = mesh_of(8, 8, 1) if params == "replicated" else mesh_of(8, 1, 8)
  configs = {accum: (class_config(dataset, **{"grad_accum_steps": accum,
                                             "sharding.params": params})
                     if condition == "class" else
                     text_config(**{"grad_accum_steps": accum, "sharding.params": params}))
             for accum in (1, 4)}
  host_batches = batches(configs[1], dataset)
  (whole, whole_metrics, _), (accum, accum_metrics, hlo) = (
      train(configs[a], mesh, host_batches) for a in (1, 4))
  assert int(whole.step) == int(accum.step) == 3
  parts = {}   # 'params', 'ema_params', 'mu', 'nu' -> [(leaf without, leaf with accumulation)]
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(whole)[0],
                          jax.tree.leaves(accum)):
    name = jax.tree_util.keystr(path)
    if not np.issubdtype(np.asarray(a).dtype, np.floating):   # step, AdamW count, PRNG key
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    part = next(p for p in (".params[", ".ema_params[", ".mu[", ".nu[") if p in name)
    parts.setdefault(part.strip(".["), []).append((a, b))
    # A leaf that starts at zero (GRN beta, adaLN-zero) is a sum of a few +-lr Adam
    # steps that partly cancel, so its own relative rounding error can exceed 1e-5.
    assert relative_error(a, b) < 1e-4, name
  assert sorted(parts) == ["ema_params", "mu", "nu", "params"]
  errors = {}
  for part, pairs in parts.items():
    flat = [np.concatenate([np.ravel(pair[i]) for pair in pairs]) for i in (0, 1)]
    errors[part] = relative_error(*flat)
    assert errors[part] < 1e-5, part
  print("relative errors:", errors)
  for m1, m4 in zip(whole_metrics, accum_metrics):
    assert bool(m1["finite"]) and bool(m4["finite"])
    assert sorted(m1) == sorted(m4)
    for name in m1:
      if name != "finite":
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, err_msg=name)
  # The split and the per-example draws are local to each device: no data moves between
  # devices outside the micro-batch loop. With replicated parameters the step's only
  # collective is the gradient all-reduce; FSDP's all-gathers and the model's activation
  # reshards are the step's with or without accumulation.
  ops = collectives(hlo)
  for op in ("all-to-all", "collective-permute"):
    assert (True, op) not in ops, ops
  if params == "replicated":
    assert set(op for _, op in ops) == {"all-reduce"}, ops


# ---------------------------------------------------------------------------- the command


def logged(out: str, name: str) -> dict[int, float]:
  """{step: value} of a metric from a run's log lines ('... [4] grad_norm=..., loss=...')."""
  return {int(step): float(v) for step, v in
          re.findall(r"\[(\d+)\] [^\n]*?\b" + name + r"=([-+0-9.eE]+)", out)}


@pytest.mark.slow
def test_sigkill_then_resume_with_accumulation_is_bit_identical(tmp_path, dataset):
  """The crash test of test_train_system with grad_accum_steps 4 (2 devices x 4 micro-
  batches of 1): the killed and resumed run ends bit-identical to its uninterrupted twin,
  whose logged global-batch losses and weights equal the run without accumulation."""
  accum = "--config.grad_accum_steps=4"
  steps = "--config.num_train_steps=8"
  code, straight_out = run_main(tmp_path / "straight", dataset, steps, accum)
  assert code == 0, straight_out[-3000:]
  proc = run_main(tmp_path / "killed", dataset, steps, accum,
                  "--config.checkpoint_every_steps=4", wait=False, step_delay=0.5)
  wait_for_checkpoint(tmp_path / "killed", 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _, _, steps_after_kill = restore_final(tmp_path / "killed")
  assert max(steps_after_kill) < 8
  code, out = run_main(tmp_path / "killed", dataset, steps, accum,
                       "--config.checkpoint_every_steps=4")
  assert code == 0, out[-3000:]
  assert "resumed from checkpoint" in out
  a, meta_a, _ = restore_final(tmp_path / "straight")
  b, meta_b, _ = restore_final(tmp_path / "killed")
  assert int(a.step) == int(b.step) == 8 and meta_b["data_position"] == 8
  assert meta_a["config"]["grad_accum_steps"] == meta_b["config"]["grad_accum_steps"] == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  code, plain_out = run_main(tmp_path / "plain", dataset, steps)
  assert code == 0, plain_out[-3000:]
  plain, _, _ = restore_final(tmp_path / "plain")
  for x, y in zip(jax.tree.leaves(plain.params), jax.tree.leaves(a.params)):
    assert relative_error(x, y) < 1e-5
  for name in ("loss", "mse", "vb", "grad_norm"):
    accumulated, whole = logged(straight_out, name), logged(plain_out, name)
    assert sorted(accumulated) == sorted(whole) == [2, 4, 6, 8], name
    for step in whole:
      assert accumulated[step] == pytest.approx(whole[step], rel=1e-4), (name, step)
  # images/s counts whole global batches.
  assert logged(straight_out, "images_per_sec")
