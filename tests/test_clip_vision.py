"""Flax CLIP vision encoder and CLIP score against transformers' PyTorch models (small
random configs saved to local folders, no download): hidden states, pooled output,
projection, preprocessing, the score, and errors."""

import json

import jax
import numpy as np
import pytest

from fcdm_jax.evaluation.clip_score import CLIPScorer
from fcdm_jax.models import clip_vision

from helpers.model_files import CLIP_VISION as VISION, random_weights, write_whole_clip
from helpers.torch_compat import import_torchvision

TOL = 1e-4
# One uint8 level after normalising, at the smallest std: the unit of preprocessing error.
LEVEL = 1 / (255 * min(clip_vision.CLIP_STD))
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, digital art", "",
           " ".join(["photograph"] * 100), "café crème brûlée at the bistro"]


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  import_torchvision()   # transformers imports torchvision when it is installed
  return torch, pytest.importorskip("transformers")


def pixel_batch(seed=0, n=3):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def uint8_images(seed=0, sizes=((40, 48), (48, 40), (32, 32), (64, 50), (20, 27))):
  """Noise images of several sizes: smaller, equal to and larger than image_size."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def torch_pixels(torch, x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def compare(torch, tmodel, model, params, x):
  with torch.no_grad():
    want = tmodel(pixel_values=torch_pixels(torch, x))
  got = jax.jit(model.apply)(params, x)
  np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state.numpy(), atol=TOL)
  if hasattr(want, "image_embeds"):
    np.testing.assert_allclose(got.image_embeds, want.image_embeds.numpy(), atol=TOL)
  else:
    np.testing.assert_allclose(got.pooled, want.pooler_output.numpy(), atol=TOL)
    assert got.image_embeds is None
  return got


def test_vision_model_safetensors(hf, tmp_path):
  torch, transformers = hf
  tmodel = random_weights(torch, transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**VISION)))
  tmodel.save_pretrained(tmp_path)            # transformers 5: keys without vision_model.
  model, params = clip_vision.load_clip_vision(str(tmp_path))
  # config.json carries projection_dim, but a CLIPVisionModel has no projection.
  assert model.config.projection_dim is None and model.config.patch_size == 8
  got = compare(torch, tmodel, model, params, pixel_batch())
  assert got.last_hidden_state.shape == (3, 17, 32)


def test_with_projection_bin_in_the_v4_layout_in_a_pipeline(hf, tmp_path):
  torch, transformers = hf
  config = transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")
  tmodel = random_weights(torch, transformers.CLIPVisionModelWithProjection(config), seed=1)
  folder = tmp_path / "image_encoder"           # found as a diffusers pipeline's image_encoder/
  tmodel.config.save_pretrained(folder)
  sd = {k: v.clone() for k, v in tmodel.state_dict().items()}
  assert "vision_model.pre_layrnorm.weight" in sd and "visual_projection.weight" in sd
  sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]   # saved by old versions
  torch.save(sd, folder / "pytorch_model.bin")
  model, params = clip_vision.load_clip_vision(str(tmp_path))
  assert model.config.projection_dim == 24 and model.config.hidden_act == "gelu"
  x = pixel_batch(seed=2)
  got = compare(torch, tmodel, model, params, x)
  with torch.no_grad():
    pooled = tmodel.vision_model(pixel_values=torch_pixels(torch, x)).pooler_output.numpy()
  np.testing.assert_allclose(got.pooled, pooled, atol=TOL)


@pytest.fixture(scope="module")
def whole_clip(hf, tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip")
  return folder, write_whole_clip(*hf, folder)


def test_whole_clip_model_folder(hf, whole_clip):
  torch, _ = hf
  folder, tmodel = whole_clip
  model, params = clip_vision.load_clip_vision(str(folder))
  assert model.config.projection_dim == 20
  x = pixel_batch(seed=4)
  with torch.no_grad():
    hidden = tmodel.vision_model(pixel_values=torch_pixels(torch, x)).last_hidden_state.numpy()
    embeds = tmodel.get_image_features(pixel_values=torch_pixels(torch, x)).pooler_output
  got = jax.jit(model.apply)(params, x)
  np.testing.assert_allclose(got.last_hidden_state, hidden, atol=TOL)
  np.testing.assert_allclose(got.image_embeds, embeds.numpy(), atol=TOL)


def test_clip_score_equals_transformers(hf, whole_clip):
  torch, transformers = hf
  folder, tmodel = whole_clip
  images = uint8_images(seed=5)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                 crop_size={"height": 32, "width": 32})
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
  with torch.no_grad():
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")["input_ids"]
    image = tmodel.get_image_features(pixel_values=pixels).pooler_output
    text = tmodel.get_text_features(input_ids=ids).pooler_output
    raw = 100 * torch.nn.functional.cosine_similarity(image, text).numpy()
  assert (raw < 0).any() and (raw > 0).any()      # the clamp at 0 is exercised
  want = np.maximum(raw, 0)
  scorer = CLIPScorer(str(folder))
  got = scorer.score(images, PROMPTS, batch=2)    # 2 + 2 + 1, the last batch padded
  assert got.per_image.dtype == np.float32 and got.per_image.shape == (5,)
  np.testing.assert_allclose(got.per_image, want, atol=TOL)
  assert got.mean == pytest.approx(want.mean(), abs=TOL)
  np.testing.assert_allclose(scorer.score(images, PROMPTS).per_image, want, atol=TOL)
  same_size = np.stack([im[:20, :27] for im in images])      # one (N, H, W, 3) array
  np.testing.assert_allclose(scorer.score(same_size, PROMPTS, batch=5).per_image,
                             scorer.score(list(same_size), PROMPTS, batch=2).per_image,
                             atol=TOL)


def smooth_images(seed, sizes):
  """Images whose neighbouring pixels are close, as in photographs (little bicubic overshoot)."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in sizes:
    y, x = np.meshgrid(np.linspace(0, 3, h), np.linspace(0, 3, w), indexing="ij")
    phase = rng.uniform(0, 6, 3)
    out.append((127.5 + 120 * np.sin(x[..., None] * 1.3 + y[..., None] + phase))
               .round().astype(np.uint8))
  return out


def test_preprocess_against_clip_image_processor(hf):
  _, transformers = hf
  kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  pil = transformers.CLIPImageProcessorPil(**kw)
  default = transformers.CLIPImageProcessor(**kw)          # torchvision in transformers 5
  assert default.backend == "torchvision"
  sizes = ((40, 48), (48, 40), (32, 32), (64, 50), (20, 27), (100, 33))
  for images in (smooth_images(7, sizes), uint8_images(seed=6, sizes=sizes)):
    got = clip_vision.preprocess(images, 32)
    assert got.dtype == np.float32 and got.shape == (6, 32, 32, 3)
    want = pil(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    levels = np.abs(got - default(images, return_tensors="np")["pixel_values"]
                    .transpose(0, 2, 3, 1)) / LEVEL
    assert levels.mean() <= 0.1, levels.mean()
  # On noise, torchvision's other pass order (100x33 -> 96x32) clips overshoots elsewhere.
  assert levels[:5].max() <= 2.01 and 2.01 < levels[5].max() < 25
  smooth = clip_vision.preprocess(smooth_images(7, sizes), 32)
  want = default(smooth_images(7, sizes), return_tensors="np")["pixel_values"]
  assert np.abs(smooth - want.transpose(0, 2, 3, 1)).max() <= 2.01 * LEVEL
  assert clip_vision.resized_size(480, 640, 224) == (224, 298)
  assert clip_vision.resized_size(640, 480, 224) == (298, 224)


def test_default_config_is_vit_l14():
  cfg = clip_vision.CLIPVisionConfig()
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size,
          cfg.patch_size, cfg.num_patches, cfg.projection_dim) == (1024, 24, 16, 224, 14, 256,
                                                                   768)
  count = lambda c: sum(int(np.prod(s)) for _, s in clip_vision.torch_layout(c).values())
  assert count(cfg) == 303_179_776 + 1024 * 768       # openai/clip-vit-large-patch14's tower
  assert count(clip_vision.CLIPVisionConfig(projection_dim=None)) == 303_179_776


def _save_small(hf, path, **changes):
  torch, transformers = hf
  tmodel = random_weights(torch, transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**VISION)))
  tmodel.save_pretrained(path)
  if changes:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, **changes)))


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="CLIP vision encoder directory not found"):
    clip_vision.load_clip_vision(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    clip_vision.load_clip_vision(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    CLIPScorer(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(VISION))
  with pytest.raises(FileNotFoundError, match="expected model.safetensors or pytorch_model.bin"):
    clip_vision.load_clip_vision(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="config.json is not a readable JSON config"):
    clip_vision.load_clip_vision(str(tmp_path))


def test_weights_that_do_not_fit_the_config(hf, tmp_path):
  _save_small(hf, tmp_path, patch_size=16)
  with pytest.raises(ValueError) as e:
    clip_vision.load_clip_vision(str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / "model.safetensors") in msg
  assert "embeddings.patch_embedding.weight (32, 3, 8, 8) (expected (32, 3, 16, 16))" in msg
  assert "embeddings.position_embedding.weight (17, 32) (expected (5, 32))" in msg
  _save_small(hf, tmp_path, architectures=["CLIPVisionModelWithProjection"])
  with pytest.raises(ValueError, match="1 missing keys: visual_projection.weight"):
    clip_vision.load_clip_vision(str(tmp_path))


def test_config_and_input_errors(hf, tmp_path):
  _save_small(hf, tmp_path, model_type="clip_text_model")
  with pytest.raises(ValueError, match="config.json: config is for a 'clip_text_model'"):
    clip_vision.load_clip_vision(str(tmp_path))
  with pytest.raises(ValueError, match=r"\{'image_size': \[224, 224\]\} must be positive "
                                       r"integers \(square"):
    clip_vision.CLIPVisionConfig.from_dict(dict(VISION, image_size=[224, 224]))
  with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
    clip_vision.CLIPVisionConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
    clip_vision.CLIPVisionConfig(hidden_size=30, num_attention_heads=4)
  _save_small(hf, tmp_path)
  with pytest.raises(ValueError, match="not a whole CLIPModel's config .model_type "
                                       "'clip_vision_model'"):
    CLIPScorer(str(tmp_path))
  model, params = clip_vision.load_clip_vision(str(tmp_path))
  with pytest.raises(ValueError, match=r"must be NHWC \(batch, 32, 32, 3\) for this model, got "
                                       r"shape \(2, 3, 32, 32\)"):
    model.apply(params, np.zeros((2, 3, 32, 32), np.float32))
  with pytest.raises(ValueError, match="must be floats normalised"):
    model.apply(params, np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"image 1: expected uint8 \(H, W, 3\) RGB, got uint8 "
                                       r"of shape \(8, 8\)"):
    clip_vision.preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)], 32)
  with pytest.raises(ValueError, match="images must be uint8 .N, H, W, 3., got shape"):
    clip_vision.preprocess(np.zeros((8, 8, 3), np.uint8), 32)


def test_scorer_errors(hf, whole_clip, tmp_path):
  folder, _ = whole_clip
  scorer = CLIPScorer(str(folder))
  images = uint8_images(seed=8)[:2]
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    scorer.score(images, ["a cat"])
  with pytest.raises(TypeError, match="one per image, not one string"):
    scorer.score(images, "ab")
  with pytest.raises(ValueError, match="batch must be a positive integer"):
    scorer.score(images, ["a", "b"], batch=0)
  with pytest.raises(ValueError, match="no images to score"):
    scorer.score([], [])
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes((folder / name).read_bytes())
  with pytest.raises(FileNotFoundError, match="lacks vocab.json and merges.txt"):
    CLIPScorer(str(tmp_path))
