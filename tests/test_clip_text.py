"""Flax CLIP text encoder against transformers' PyTorch models (small random configs saved
to local folders, no download): hidden states, pooled output, projection, and errors."""

import json

import jax
import numpy as np
import pytest

from fcdm_jax.models import clip_text

from helpers.model_files import random_weights
from helpers.torch_compat import import_torchvision

VOCAB, BOS, EOS = 300, 298, 299
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77, projection_dim=24,
             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  import_torchvision()   # transformers imports torchvision when it is installed
  return torch, pytest.importorskip("transformers")


def token_rows(seed=0, eos=EOS, length=77):
  """Rows like the tokenizer's: start, words, end-of-text, then padding (= end-of-text)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB - 2, (4, length))
  ids[:, 0] = BOS
  for row, end in enumerate((5, 30, 76, 12)):
    ids[row, end:] = eos
  return ids


def compare(torch, tmodel, model, params, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
    want = tmodel(input_ids=torch.from_numpy(ids), **kw)
  got = jax.jit(model.apply)(params, ids, mask)
  np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state.numpy(), atol=TOL)
  if hasattr(want, "text_embeds"):
    np.testing.assert_allclose(got.text_embeds, want.text_embeds.numpy(), atol=TOL)
  else:
    np.testing.assert_allclose(got.pooled, want.pooler_output.numpy(), atol=TOL)
    assert got.text_embeds is None
  return got


def test_text_model_safetensors(hf, tmp_path):
  torch, transformers = hf
  tmodel = random_weights(torch, transformers.CLIPTextModel(transformers.CLIPTextConfig(**SMALL)))
  tmodel.save_pretrained(tmp_path)            # transformers 5: keys without text_model.
  model, params = clip_text.load_clip_text(str(tmp_path))
  assert model.config.projection_dim is None and model.config.hidden_size == 32
  got = compare(torch, tmodel, model, params, token_rows())
  # Pooled at the first end-of-text of each row (padding repeats it).
  np.testing.assert_allclose(got.pooled, got.last_hidden_state[np.arange(4), [5, 30, 76, 12]])


def test_with_projection_bin_in_the_v4_layout(hf, tmp_path):
  torch, transformers = hf
  config = transformers.CLIPTextConfig(**SMALL, hidden_act="gelu")
  tmodel = random_weights(torch, transformers.CLIPTextModelWithProjection(config), seed=1)
  tmodel.config.save_pretrained(tmp_path)
  sd = {k: v.clone() for k, v in tmodel.state_dict().items()}
  assert "text_model.embeddings.token_embedding.weight" in sd and "text_projection.weight" in sd
  sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]   # saved by old versions
  torch.save(sd, tmp_path / "pytorch_model.bin")
  model, params = clip_text.load_clip_text(str(tmp_path))
  assert model.config.projection_dim == 24 and model.config.hidden_act == "gelu"
  ids = token_rows(seed=2)
  got = compare(torch, tmodel, model, params, ids)
  with torch.no_grad():
    pooled = tmodel.text_model(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
  np.testing.assert_allclose(got.pooled, pooled, atol=TOL)
  mask = (np.arange(77)[None] <= np.array([5, 30, 76, 12])[:, None]).astype(np.int64)
  compare(torch, tmodel, model, params, ids, mask)            # padding masked as keys


def test_whole_clip_model_folder_and_legacy_eos(hf, tmp_path):
  torch, transformers = hf
  # Configs from before transformers PR #24773 say eos_token_id=2: pooling at the largest id.
  text = dict(SMALL, eos_token_id=2)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, image_size=32, patch_size=16)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
  tmodel = random_weights(torch, transformers.CLIPModel(config), seed=3)
  tmodel.save_pretrained(tmp_path / "text_encoder")   # found as a pipeline's text_encoder/
  model, params = clip_text.load_clip_text(str(tmp_path))
  assert model.config.projection_dim == 20 and model.config.eos_token_id == 2
  ids = token_rows(seed=4, eos=VOCAB - 1)
  ids[0, 2] = VOCAB - 1                     # an earlier end-of-text: argmax takes the first
  with torch.no_grad():
    hidden = tmodel.text_model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    embeds = tmodel.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
  got = jax.jit(model.apply)(params, ids)
  np.testing.assert_allclose(got.last_hidden_state, hidden, atol=TOL)
  np.testing.assert_allclose(got.text_embeds, embeds, atol=TOL)
  np.testing.assert_allclose(got.pooled[0], got.last_hidden_state[0, 2])


def test_default_config_is_vit_l14():
  cfg = clip_text.CLIPTextConfig()
  assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size,
          cfg.max_position_embeddings, cfg.projection_dim) == (768, 12, 12, 49408, 77, 768)
  layout = clip_text.torch_layout(cfg)
  assert sum(int(np.prod(shape)) for _, shape in layout.values()) == 123_650_304


def test_pool_positions_rule():
  ids = np.array([[5, 9, 7, 9], [5, 6, 7, 8]])
  assert clip_text.pool_positions(ids, 9).tolist() == [1, 0]     # first eos; none -> 0
  assert clip_text.pool_positions(ids, 2).tolist() == [1, 3]     # legacy: the largest id


def _save_small(hf, path, **changes):
  torch, transformers = hf
  tmodel = random_weights(torch, transformers.CLIPTextModel(transformers.CLIPTextConfig(**SMALL)))
  tmodel.save_pretrained(path)
  if changes:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, **changes)))


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="CLIP text encoder directory not found"):
    clip_text.load_clip_text(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    clip_text.load_clip_text(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(SMALL))
  (tmp_path / "model.safetensors.index.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"expected model.safetensors or "
                                              r"pytorch_model.bin \(model.safetensors.index"):
    clip_text.load_clip_text(str(tmp_path))


def test_weights_that_do_not_fit_the_config(hf, tmp_path):
  _save_small(hf, tmp_path, intermediate_size=48)
  with pytest.raises(ValueError) as e:
    clip_text.load_clip_text(str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / "model.safetensors") in msg
  assert "encoder.layers.0.mlp.fc1.weight (64, 32) (expected (48, 32))" in msg
  _save_small(hf, tmp_path, architectures=["CLIPTextModelWithProjection"])
  with pytest.raises(ValueError, match="1 missing keys: text_projection.weight"):
    clip_text.load_clip_text(str(tmp_path))


def test_config_and_input_errors(hf, tmp_path):
  _save_small(hf, tmp_path, model_type="clip_vision_model")
  with pytest.raises(ValueError, match="config.json: config is for a 'clip_vision_model'"):
    clip_text.load_clip_text(str(tmp_path))
  with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
    clip_text.CLIPTextConfig(hidden_act="relu")
  with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
    clip_text.CLIPTextConfig(hidden_size=30, num_attention_heads=4)
  with pytest.raises(ValueError, match="one integer eos_token_id"):
    clip_text.CLIPTextConfig.from_dict(dict(SMALL, eos_token_id=[1, 2]))
  _save_small(hf, tmp_path)
  model, params = clip_text.load_clip_text(str(tmp_path))
  with pytest.raises(ValueError, match=r"token ids \[300\] out of range \[0, 299\]"):
    model.apply(params, np.array([[1, 300]]))
  with pytest.raises(ValueError, match="78 positions but the model has 77"):
    model.apply(params, np.zeros((1, 78), np.int32))
  with pytest.raises(ValueError, match="must be \\(batch, length\\) integers"):
    model.apply(params, np.zeros((1, 77), np.float32))
