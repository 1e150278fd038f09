"""One training step: objective loss, AdamW update, EMA, and a finiteness flag for the loop."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fcdm_jax.models import FCDM
from fcdm_jax import distributed, sharding
from fcdm_jax.train.state import TrainState, learning_rate_fn


# fold_in tag of the posterior noise: the loss and label-dropout keys stay what they were.
_POSTERIOR_TAG = 0x9057


def posterior_sample(batch: dict, key: jax.Array) -> jax.Array:
  """`x`, or with a posterior batch (`x_std` present: `x` is its mean) `x + x_std * eps`.

  eps of the example at position p of the global batch is `normal(fold_in(key, p))`: the
  same whatever the number of hosts or devices, and, with `key` derived from the step,
  the same again when a resumed run repeats the step.
  """
  x = batch["x"]
  if "x_std" not in batch:
    return x
  draw = lambda p: jax.random.normal(jax.random.fold_in(key, p), x.shape[1:], x.dtype)
  eps = jax.vmap(draw)(jnp.arange(x.shape[0], dtype=jnp.uint32))
  return x + batch["x_std"] * eps


def make_train_step(config, model: FCDM, objective, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure step function. `batch` = {'x': NHWC float32, 'y': int32 labels}, plus
  'x_std' for latent posteriors (`posterior_sample`).

  `metrics['finite']` says whether loss and gradient were finite: the training loop
  checks it for every step before each checkpoint save and stops at the first bad step,
  so no checkpoint ever holds a state that saw one. (Selecting the old state on device
  instead would hold two copies of params, AdamW state and EMA: too much for XL.)
  """
  decay = float(config.ema_decay)
  lr_fn = learning_rate_fn(config)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, dropout_rng = jax.random.split(step_rng)
    x0 = posterior_sample(batch, jax.random.fold_in(step_rng, _POSTERIOR_TAG))

    def loss_fn(params):
      def model_fn(x_t, t):
        return model.apply({"params": params}, x_t, t, batch["y"], train=True,
                           rngs={"label_dropout": dropout_rng})
      terms = objective.loss(model_fn, x0, loss_rng)
      terms = {k: jnp.mean(v) for k, v in terms.items()}
      return terms["loss"], terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    metrics = dict(terms, grad_norm=grad_norm, learning_rate=lr_fn(state.step), finite=finite)
    return new_state, metrics

  return train_step


class JittedTrainStep:
  """`train_step` jitted with explicit in/out shardings and the state donated.

  Calls (and `lower`) run under the mesh and logical axis rules, so the model's
  activation constraints apply. On several processes the first step starts on all of them
  together (`distributed.StartTogether`).
  """

  def __init__(self, train_step, mesh: Mesh, state_shardings, config):
    self.mesh, self.config = mesh, config
    self.jitted = jax.jit(train_step,
                          in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                          out_shardings=(state_shardings, sharding.replicated(mesh)),
                          donate_argnums=0)
    self._run = distributed.StartTogether(self.jitted, "train_step")

  def __call__(self, state, batch):
    with sharding.sharding_context(self.mesh, self.config):
      return self._run(state, batch)

  def lower(self, state, batch):
    with sharding.sharding_context(self.mesh, self.config):
      return self.jitted.lower(state, batch)


def jit_train_step(train_step, mesh: Mesh, state_shardings, config) -> JittedTrainStep:
  return JittedTrainStep(train_step, mesh, state_shardings, config)
