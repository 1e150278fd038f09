"""The first-run demo: a CPU-sized FCDM on the embedded MNIST-5k digits (32x32x1 pixels).

`python -m fcdm_jax.main --config=configs/demo.py --workdir=runs/demo` trains, writes
sample grids (one row per digit), and at the end judges class-conditional samples with a
small classifier trained on the same data (see fcdm_jax/evaluation/demo_eval.py).
`--config=configs/demo.py:flow` trains the flow-matching objective instead.
"""

from fcdm_jax import config_base


def get_config(objective: str = "ddpm"):
  objective = objective or "ddpm"
  config = config_base.get_config("S", 256, objective)
  config.name = f"demo_mnist_{objective}"
  config.image_size = 32
  config.latent_size = 32  # pixel space: the model sees the 32x32 images themselves
  config.model.update(in_channels=1, hidden_size=32, depth=(1, 1, 2, 1, 1), num_classes=10)
  config.data.update(source="embedded", random_flip=False)  # digits are not mirror-symmetric
  config.batch_size = 64
  config.num_train_steps = 3000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.ema_decay = 0.999
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.preview.update(every_steps=1000, num_classes_shown=10, per_class=10, steps=50)
  config.eval.update(enabled=True, num_samples=1000, sampler=config.preview.sampler,
                     steps=50, cfg_scale=4.0)
  return config
