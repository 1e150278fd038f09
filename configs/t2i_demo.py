"""The text-to-image demo: a CPU-sized text-conditioned FCDM on the colour digits (32x32x3).

`python -m fcdm_jax.main --config=configs/t2i_demo.py --workdir=runs/t2i_demo` prepares
the data once (a small CLIP-architecture text encoder trained on the captions, and the
caption embeddings; `fcdm_jax/demo/colour_digits.py`), trains, and at the end judges
samples for 60 prompts the model never trained on ("a handwritten seven coloured red")
for digit and colour, with and without guidance (`fcdm_jax/demo/colour_digit_judge.py`).
Then `python -m fcdm_jax.sample --workdir=runs/t2i_demo --prompt="a green four" ...`.

The recipe is the class demo's (configs/demo.py): flow matching, batch 16, a short cosine
schedule, plus gradient clipping; the text enters through the same adaLN conditioning as a
class label, projected per level by one linear layer (model.text_embedder). `:mlp` takes
the two-layer MLP instead: it learned more slowly here (README, "The text-to-image demo").
"""

import importlib.util
import pathlib

from fcdm_jax.demo import colour_digits


def _class_demo():
  """configs/demo.py, loaded by path (configs are files, not an installed package)."""
  spec = importlib.util.spec_from_file_location("fcdm_jax_demo_config",
                                                pathlib.Path(__file__).with_name("demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(text_embedder: str = "linear"):
  config = _class_demo().get_config("flow")
  config.name = f"t2i_demo_colour_digits_{text_embedder or 'linear'}"
  config.model.update(in_channels=3, condition="text", text_dim=colour_digits.TEXT_DIM,
                      text_embedder=text_embedder or "linear")
  # The demo encoder's projected embedding (data/colour_digits.py: what a caption says).
  config.data.update(source="colour_digits", path="", caption_dropout=0.1,
                     text_pooling=colour_digits.POOLING)
  # The class demo's peak learning rate diverged here near the end of warmup (step 122,
  # non-finite loss); clipping the gradient norm keeps the recipe otherwise the same.
  config.optimizer.grad_clip_norm = 1.0
  config.preview.update(num_classes_shown=10, per_class=8)
  # 60 held-out prompts x 4 samples, with guidance and without, from the same noise.
  config.eval.update(kind="colour_digits", num_samples=240, batch_size=120, unguided=True)
  return config
