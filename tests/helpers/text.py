"""A tiny CLIP text encoder folder (random weights, a BPE vocabulary learned from a corpus)
and captions for the tiny latent dataset: what the text-to-image tests train and sample with."""

import json

import numpy as np

from fcdm_jax.data.captions import write_captions
from fcdm_jax.models import clip_text
from fcdm_jax.models.text_encoder import load_text_encoder

from helpers.model_files import learn_bpe, write_folder

COLOURS = ["red", "green", "blue", "yellow"]
DIGITS = ["zero", "one", "two", "three"]


def captions_of(label: int) -> list[str]:
  return [f"a {COLOURS[label]} {DIGITS[label]}", f"the digit {DIGITS[label]} in {COLOURS[label]}"]


def write_text_encoder(path, width=16, seed=0):
  """A transformers-layout CLIPTextModel folder: config.json, model.safetensors, tokenizer."""
  from safetensors.numpy import save_file
  corpus = [c for label in range(4) for c in captions_of(label)]
  folder = write_folder(path, learn_bpe(corpus, 60))
  vocab = json.loads((folder / "vocab.json").read_text())
  config = dict(model_type="clip_text_model", vocab_size=len(vocab), hidden_size=width,
                intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"], architectures=["CLIPTextModel"])
  (folder / "config.json").write_text(json.dumps(config))
  layout = clip_text.torch_layout(clip_text.CLIPTextConfig.from_dict(config,
                                                                      with_projection=False))
  rng = np.random.default_rng(seed)
  weights = {k: (rng.normal(size=shape) * (0.5 if len(shape) > 1 else 0.1)
                 + (1.0 if k.endswith("norm1.weight") or k.endswith("norm2.weight")
                    or k == "final_layer_norm.weight" else 0.0)).astype(np.float32)
             for k, (_, shape) in layout.items()}
  save_file(weights, str(folder / "model.safetensors"))
  return str(folder)


def write_dataset_captions(out, labels, encoder_dir):
  """Two captions per example, naming its label's colour and digit."""
  encoder = load_text_encoder(encoder_dir)
  write_captions(str(out), [captions_of(int(label)) for label in labels], encoder, batch=16)
  return str(out)
