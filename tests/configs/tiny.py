"""A tiny FCDM on an 8x8x4 latent dataset: the training-system tests' config.

The dataset path is given on the command line (`--config.data.path=DIR`);
`tests/helpers/training.make_latent_dataset` writes one.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  config = config_base.get_config("S", 64, objective or "ddpm")
  config.name = "tiny_test"
  # The grouped-conv formulation compiles fastest; the system tests do not depend on it.
  config.model.update(hidden_size=8, depth=(1, 1, 1, 1, 1), num_classes=4, dwconv_impl="xla")
  config.data.update(source="latents", path="", prefetch=1)
  config.batch_size = 8
  config.num_train_steps = 6
  config.optimizer.learning_rate = 1e-3
  config.ema_decay = 0.9
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.preview.update(every_steps=0, num_classes_shown=4, per_class=2, steps=4)
  return config
