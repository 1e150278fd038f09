"""Small model folders and files written with random weights, in the layouts the loaders read:
a two-level SD-VAE (diffusers), FID-Inception weights (pytorch-fid's keys), CLIP tokenizer
folders with a BPE vocabulary learned here, and a whole CLIP model (transformers). Nothing is
downloaded."""

import json
import os

import numpy as np

from fcdm_jax.models import clip_tokenizer as ct
from fcdm_jax.models import inception
from fcdm_jax.models import vae as vae_lib

# A two-level SD-VAE (downsampling x2), random weights: 16 px images -> 8x8x4 latents.
TINY_VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, latent_channels=4,
                block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.5)
RESOLUTION = 16


def write_vae_dir(path, config=TINY_VAE, seed=0):
  """A diffusers-format VAE directory (config.json + safetensors) with random weights."""
  from safetensors.numpy import save_file
  model = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(config))
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, (_, shape) in vae_lib.torch_layout(model).items():
    if len(shape) > 1:   # conv / linear weight, fan-in scaled
      a = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
    elif "norm" in key and key.endswith("weight"):
      a = rng.uniform(0.8, 1.2, shape)
    else:
      a = rng.uniform(-0.2, 0.2, shape)
    state_dict[key] = a.astype(np.float32)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(state_dict, os.path.join(path, "diffusion_pytorch_model.safetensors"))
  return str(path)


def write_inception(path, seed=0):
  """Random FID-Inception weights in pytorch-fid's key layout, as .safetensors."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, (_, shape) in inception.torch_layout().items():
    if key.endswith(("running_var", "bn.weight")):
      a = rng.uniform(0.5, 1.5, shape)
    elif key.endswith(("running_mean", ".bias")):
      a = rng.uniform(-0.2, 0.2, shape)
    else:
      a = rng.uniform(-1, 1, shape) * np.sqrt(3.0 / int(np.prod(shape[1:])))
    state_dict[key] = a.astype(np.float32)
  save_file(state_dict, str(path))
  return str(path)


# ------------------------------------------------------------------------------ CLIP

# The texts the tokenizer folders' BPE vocabularies are learned from.
CORPUS = [
    "a photo of a cat sitting on the mat", "the quick brown fox jumps over the lazy dog",
    "an astronaut riding a horse on mars, digital art", "café crème brûlée at the bistro",
    "portrait of a woman, 4k, highly detailed, trending on artstation",
    "it's a dog's life, isn't it? they're here, we've seen, i'm sure, you'll see, he'd go",
    "東京の夜景 beautiful night", "a red car and a blue bicycle", "oil painting of mountains",
]


def learn_bpe(corpus, num_merges):
  return ct.learn_merges(corpus, num_merges)


def write_folder(path, merges, drop=(), **config):
  """A CLIP tokenizer folder (vocab.json, merges.txt, ...) of `merges`."""
  ct.write_tokenizer_folder(str(path), merges, drop, **config)
  return path


def random_weights(torch, model, seed=0):
  """Every parameter moved off its init (LayerNorms off 1/0, biases off 0), so that a
  misplaced or untransposed tensor shows."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.2)
  return model.eval()


# The towers of the small CLIP models (transformers' CLIPVisionConfig / CLIPTextConfig fields).
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8, projection_dim=24)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77)


def write_whole_clip(torch, transformers, folder, seed=3):
  """A whole CLIPModel folder (random weights) with a tokenizer learned here; the text
  tower's vocabulary and special ids are the tokenizer's. Returns the torch model."""
  write_folder(folder, learn_bpe(CORPUS, 100))
  vocab = json.loads((folder / "vocab.json").read_text())
  text = dict(CLIP_TEXT, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
              eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
  # vision_config's own projection_dim (24) is not what CLIPModel builds (20).
  config = transformers.CLIPConfig(text_config=text, vision_config=CLIP_VISION,
                                   projection_dim=20)
  torch.manual_seed(seed)   # transformers' init draws from the global generator
  tmodel = random_weights(torch, transformers.CLIPModel(config), seed=seed)
  tmodel.save_pretrained(folder)
  return tmodel
