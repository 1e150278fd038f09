"""PyTorch state_dict <-> Flax params: exact round trips, the published manifest, bad files."""

import json

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from fcdm_jax import convert
from fcdm_jax.models import torch_weights
from fcdm_jax.models import FCDM, get_variant


@pytest.fixture(scope="module")
def tiny_state_dict(reference_dir):
  ref = np.load(reference_dir / "fcdm_tiny.npz")
  return {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}


@pytest.fixture(scope="module")
def manifest(reference_dir):
  return json.loads((reference_dir / "fcdm_state_dict_manifest.json").read_text())


def test_round_trip_is_exact(tiny_state_dict):
  back = convert.params_to_torch(convert.params_from_torch(tiny_state_dict))
  assert list(back) == list(tiny_state_dict)
  for k, v in tiny_state_dict.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_round_trip_of_a_published_size_checkpoint(manifest):
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(shape).astype(np.float32)
        for k, shape in manifest["FCDM-S"]["state_dict"]}
  params = convert.params_from_torch(sd)
  assert params["latent"]["pwconv1"]["kernel"].shape == (8, 512, 1536)
  back = convert.params_to_torch(params)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def _abstract_params(model):
  """Zero-memory stand-ins with the params' shapes (broadcast views)."""
  shapes = convert.expected_shapes(model)
  return convert._unflatten({p: np.broadcast_to(np.float32(0), s) for p, s in shapes.items()})


@pytest.mark.parametrize("variant", ["S", "B", "L", "XL"])
def test_export_matches_published_manifest(manifest, variant):
  published = manifest[f"FCDM-{variant}"]
  sd = convert.params_to_torch(_abstract_params(FCDM(**get_variant(variant))))
  assert [[k, list(v.shape)] for k, v in sd.items()] == published["state_dict"]
  assert sum(int(np.prod(v.shape)) for v in sd.values()) == published["num_params"]


def test_flax_param_count_matches_manifest(manifest):
  model = FCDM(**get_variant("S"))
  x, t, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, t, y)["params"]))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert count == manifest["FCDM-S"]["num_params"]


def test_infer_model_from_shapes(manifest):
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in manifest["FCDM-XL"]["state_dict"]}
  model = convert.infer_model(sd)
  assert (model.hidden_size, tuple(model.depth), model.num_classes) == (512, (3, 6, 12, 6, 3), 1000)
  assert model.learn_sigma and model.mlp_ratio == 3.0 and model.in_channels == 4


def test_missing_extra_and_misshaped_keys_are_listed(tiny_state_dict):
  sd = dict(tiny_state_dict)
  del sd["latent.1.grn.gamma"]
  sd["latent.1.grn.alpha"] = np.zeros((1, 192, 1, 1), np.float32)
  sd["reduce_chans_1.bias"] = np.zeros((31,), np.float32)
  with pytest.raises(ValueError) as err:
    convert.params_from_torch(sd)
  msg = str(err.value)
  assert "1 missing keys: latent.1.grn.gamma" in msg
  assert "1 unexpected keys: latent.1.grn.alpha" in msg
  assert "reduce_chans_1.bias (31,) (expected (32,))" in msg


def test_not_an_fcdm_state_dict():
  with pytest.raises(ValueError, match="not an FCDM state_dict: missing keys"):
    convert.params_from_torch({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3))})


def test_safetensors_round_trip(tmp_path, tiny_state_dict):
  params = convert.params_from_torch(tiny_state_dict)
  path = str(tmp_path / "fcdm.safetensors")
  convert.save_torch_checkpoint(path, params)
  loaded = torch_weights.load_torch_state_dict(path)
  assert set(loaded) == set(tiny_state_dict)
  for k, v in tiny_state_dict.items():
    np.testing.assert_array_equal(loaded[k], v)


def test_pt_round_trip_picks_ema(tmp_path, tiny_state_dict):
  pytest.importorskip("torch")
  params = convert.params_from_torch(tiny_state_dict)
  ema = jax.tree.map(lambda a: a * 0.5, params)
  path = str(tmp_path / "fcdm.pt")
  convert.save_torch_checkpoint(path, params, ema)
  for which, scale in (("ema", 0.5), ("model", 1.0)):
    loaded = torch_weights.load_torch_state_dict(path, which=which)
    np.testing.assert_array_equal(loaded["x_embedder.weight"],
                                  tiny_state_dict["x_embedder.weight"] * scale)


def test_pt_with_pickled_code_is_refused(tmp_path):
  torch = pytest.importorskip("torch")

  class Evil:
    def __reduce__(self):
      return (print, ("executed",))

  path = tmp_path / "evil.pt"
  torch.save({"model": Evil()}, str(path))
  with pytest.raises(ValueError, match="refusing to load .*evil.pt: it is a pickle holding "
                                       "Python objects.*Unsupported global"):
    torch_weights.load_torch_state_dict(str(path))


def test_missing_file_and_bad_extension(tmp_path, tiny_state_dict):
  with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
    torch_weights.load_torch_state_dict(str(tmp_path / "nope.pt"))
  params = convert.params_from_torch(tiny_state_dict)
  with pytest.raises(ValueError, match="use .pt or .safetensors"):
    convert.save_torch_checkpoint(str(tmp_path / "x.ckpt"), params)


def test_failed_write_keeps_existing_file(tmp_path, tiny_state_dict, monkeypatch):
  import safetensors.numpy

  def crash_midway(tensors, filename):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", crash_midway)
  path = tmp_path / "fcdm.safetensors"
  path.write_bytes(b"previous")
  with pytest.raises(OSError, match="disk full"):
    convert.save_torch_checkpoint(str(path), convert.params_from_torch(tiny_state_dict))
  assert path.read_bytes() == b"previous"
  assert [p.name for p in tmp_path.iterdir()] == ["fcdm.safetensors"]
