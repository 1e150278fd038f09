"""The first-run demo: a CPU-sized FCDM on the embedded MNIST-5k digits (32x32x1 pixels).

`python -m fcdm_jax.main --config=configs/demo.py --workdir=runs/demo` trains, writes
sample grids (one row per digit), and at the end judges class-conditional samples with a
small classifier trained on the same data (see fcdm_jax/demo/digit_judge.py).

The default objective is the published flow matching (SiT: linear path, velocity
prediction). `--config=configs/demo.py:ddpm` trains the published DDPM (epsilon, learned
variance, MSE + VB) instead: it learns these digits more slowly and needs a longer run
than this one to draw them (measured in the README, "The demo").
"""

from fcdm_jax import config_base


def get_config(objective: str = "flow"):
  objective = objective or "flow"
  config = config_base.get_config("S", 256, objective)
  config.name = f"demo_mnist_{objective}"
  config.image_size = 32
  config.latent_size = 32  # pixel space: the model sees the 32x32 images themselves
  config.model.update(in_channels=1, hidden_size=32, depth=(1, 1, 2, 1, 1), num_classes=10)
  config.data.update(source="embedded", random_flip=False)  # digits are not mirror-symmetric
  # Sized for 2 CPU cores: training, sample grids and evaluation in under 15 minutes.
  # Small batches, many steps: in a short run the number of updates matters more than the
  # batch (batch 16 costs half a batch-32 step here). A high peak learning rate with a
  # cosine decay and a short EMA window suit a run this short.
  config.batch_size = 16
  config.num_train_steps = 2000
  config.optimizer.update(learning_rate=2e-3, warmup_steps=100, schedule="cosine",
                          final_lr_fraction=0.05)
  config.ema_decay = 0.995
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2
  # Guided samples in 25 steps (each x2 for guidance): the previews' UniPC for DDPM, the
  # Euler ODE for flow matching (the sampler every measured flow demo figure used; UniPC
  # scores the same on it, README's sampler table).
  config.preview.update(every_steps=1000, num_classes_shown=10, per_class=8, steps=25)
  if objective == "flow":
    config.preview.update(sampler="ode", method="euler")
  # The end-of-run judgement with the preview's sampler: 50 samples per digit.
  config.eval.update(enabled=True, kind="demo", num_samples=500, sampler=config.preview.sampler, steps=25,
                     cfg_scale=4.0, batch_size=100, unguided=False)
  return config
