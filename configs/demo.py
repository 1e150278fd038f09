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
  # Sized for 2 CPU cores: the whole run (training, sample grids, evaluation) in about
  # 10 minutes. Short run, so a higher learning rate and a short EMA window.
  config.batch_size = 32
  config.num_train_steps = 1500
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.ema_decay = 0.995
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2
  config.preview.update(every_steps=750, num_classes_shown=10, per_class=8, steps=25)
  # The end-of-run judgement: guided 25-step samples (DDIM; ODE for flow), 50 per class.
  config.eval.update(enabled=True, num_samples=500, sampler=config.preview.sampler, steps=25,
                     cfg_scale=4.0,
                     batch_size=100, unguided=False)
  return config
