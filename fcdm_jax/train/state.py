"""The train state (params, AdamW state, EMA, step, PRNG key) and how it is created sharded."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fcdm_jax.models import FCDM
from fcdm_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken = the data position
  params: Any            # float32, whatever the compute dtype
  opt_state: Any
  ema_params: Any        # EMA of params, initialised from them
  rng: jax.Array         # uint32[2] key data (checkpoints as a plain array)


def learning_rate_fn(config) -> Callable[[jax.Array], jax.Array]:
  """Published: constant 1e-4. Optional linear warmup from 0 over `warmup_steps`, and
  `schedule='cosine'`: after warmup, cosine decay to `learning_rate * final_lr_fraction`
  at `num_train_steps` (short runs such as the demo end sharper with it)."""
  opt = config.optimizer
  schedule = opt.get("schedule", "constant")
  warmup = int(opt.warmup_steps)
  if warmup < 0:
    raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
  if schedule == "constant":
    if warmup > 0:
      return optax.linear_schedule(0.0, opt.learning_rate, warmup)
    return optax.constant_schedule(opt.learning_rate)
  if schedule == "cosine":
    fraction = float(opt.get("final_lr_fraction", 0.0))
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"optimizer.final_lr_fraction must be in [0, 1], got {fraction}")
    if config.num_train_steps <= warmup:
      raise ValueError(f"optimizer.schedule='cosine' needs num_train_steps "
                       f"({config.num_train_steps}) > warmup_steps ({warmup})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
        decay_steps=config.num_train_steps, end_value=opt.learning_rate * fraction)
  raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {schedule!r}")


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW (published betas, eps, weight decay 0), optional global-norm clipping."""
  opt = config.optimizer
  if opt.learning_rate <= 0:
    raise ValueError(f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_fn(config), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay))
  return optax.chain(*parts)


def _init_boxed(model: FCDM, tx, rng, input_shape) -> TrainState:
  """A state whose param-like leaves are still `nn.Partitioned` (logical axis names)."""
  init_rng, state_rng = jax.random.split(rng)
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  y = model.example_y(1)
  params = model.init({"params": init_rng}, x, t, y)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=state_rng)


def state_layout(config, model: FCDM, tx, mesh: Mesh, input_shape):
  """(abstract unboxed state with shardings attached, the shardings tree)."""
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: _init_boxed(model, tx, r, input_shape), rng)
  shardings = sharding.state_shardings(boxed, config, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(config, model: FCDM, tx, mesh: Mesh, input_shape):
  """Initialises the state directly into its shardings (never whole on one device)."""
  abstract, shardings = state_layout(config, model, tx, mesh, input_shape)
  init = jax.jit(lambda r: nn.unbox(_init_boxed(model, tx, r, input_shape)),
                 out_shardings=shardings)
  with jax.set_mesh(mesh):
    state = init(jax.random.PRNGKey(config.seed))
  return state, abstract, shardings
