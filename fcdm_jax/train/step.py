"""One training step: objective loss (summed over micro-batches when accumulating), AdamW
update, EMA, and a finiteness flag for the loop."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
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


def micro_batches(a: jax.Array, count: int) -> jax.Array:
  """(B, ...) -> (count, B / count, ...); micro-batch j holds the examples j, j + count, ...

  The batch is split over the devices in contiguous blocks, and this split divides each
  block in place (reshape to (B / count, count), then swap the two axes), so every
  micro-batch stays sharded as the batch was, with no data moved between devices.
  """
  b = a.shape[0]
  split = jnp.moveaxis(a.reshape((b // count, count) + a.shape[1:]), 1, 0)
  return nn.with_logical_constraint(split, (None, "activation_batch") + (None,) * (a.ndim - 1))


def make_train_step(config, model: FCDM, objective, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure step function. `batch` = {'x': NHWC float32, 'y': labels or text embeddings},
  plus 'x_std' for latent posteriors (`posterior_sample`).

  With `config.grad_accum_steps` = A > 1 the batch is split into A micro-batches
  (`micro_batches`) whose gradients a `lax.scan` sums, for one AdamW and one EMA update
  per step. Every random draw of an example (posterior, time, noise, label dropout) is
  keyed by the step and its position in the global batch, so the step equals the A = 1
  step to float rounding; metrics are global-batch means.

  `metrics['finite']` says whether loss and gradient were finite: the training loop
  checks it for every step before each checkpoint save and stops at the first bad step,
  so no checkpoint ever holds a state that saw one. (Selecting the old state on device
  instead would hold two copies of params, AdamW state and EMA: too much for XL.)
  """
  decay = float(config.ema_decay)
  lr_fn = learning_rate_fn(config)
  accum = int(config.grad_accum_steps)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, dropout_rng = jax.random.split(step_rng)
    x0 = posterior_sample(batch, jax.random.fold_in(step_rng, _POSTERIOR_TAG))
    examples = dict(x=x0, y=batch["y"],
                    position=jnp.arange(x0.shape[0], dtype=jnp.uint32))

    def loss_fn(params, part):
      def model_fn(x_t, t):
        return model.apply({"params": params}, x_t, t, part["y"], train=True,
                           positions=part["position"], rngs={"label_dropout": dropout_rng})
      terms = objective.loss(model_fn, part["x"], loss_rng, part["position"])
      terms = {k: jnp.mean(v) for k, v in terms.items()}
      return terms["loss"], terms

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
      grads, terms = grad_fn(state.params, examples)
    else:
      def accumulate(total, part):
        grads, terms = grad_fn(state.params, part)
        return jax.tree.map(jnp.add, total, grads), terms

      parts = jax.tree.map(lambda a: micro_batches(a, accum), examples)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grads, terms = jax.lax.scan(accumulate, zeros, parts)
      # Equal micro-batches: the mean of their means is the global-batch mean.
      grads = jax.tree.map(lambda g: g / accum, grads)
      terms = jax.tree.map(lambda v: jnp.mean(v, axis=0), terms)
    loss = terms["loss"]
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
