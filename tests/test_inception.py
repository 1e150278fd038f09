"""Flax FID InceptionV3 against pytorch-fid's (random weights, no download)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fcdm_jax.models import inception

from helpers.torch_compat import import_torchvision


def _randomize_batchnorm(model, seed):
  """Random affine and running statistics, so a wrong BatchNorm mapping shows."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.2, 0.2, generator=g)
        m.running_mean.uniform_(-0.2, 0.2, generator=g)
        m.running_var.uniform_(0.5, 1.5, generator=g)


@pytest.fixture(scope="module")
def torch_reference(monkeypatch_module):
  """pytorch-fid's FID Inception (the pool3 wrapper and the full classifier), random weights."""
  torch = pytest.importorskip("torch")
  torchvision = import_torchvision()
  pfi = pytest.importorskip("pytorch_fid.inception")
  torch.manual_seed(0)
  # The FID variant keeps torchvision's parameter names: its state_dict is the template.
  source = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                           init_weights=False)
  _randomize_batchnorm(source, seed=1)
  state_dict = {k: v.clone() for k, v in source.state_dict().items()}
  monkeypatch_module.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
  full = pfi.fid_inception_v3().eval()
  pool3 = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()
  return torch, pfi, full, pool3, state_dict


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def test_matches_pytorch_fid(torch_reference, tmp_path):
  torch, _, full, pool3, state_dict = torch_reference
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 64, 80, 3)).astype(np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  spatial = {}
  full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.setdefault("out", o))
  with torch.no_grad():
    ref_pool = pool3(x)[0][:, :, 0, 0].numpy()
    net_in = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                 align_corners=False) - 1
    ref_logits = full(net_in).numpy()
  ref_spatial = spatial["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()

  path = tmp_path / "pt_inception-random.pth"
  torch.save(state_dict, path)
  model, variables = inception.load_inception(str(path), preprocess="pytorch_fid")
  out = jax.jit(model.apply)(variables, jnp.asarray(images))

  def rel(a, b):
    return np.abs(np.asarray(a) - b).max() / np.abs(b).max()

  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert out["spatial"].shape == (2, 17 * 17 * 7)
  assert rel(out["pool"], ref_pool) < 1e-4
  assert rel(out["logits"], ref_logits) < 1e-4
  assert rel(out["spatial"], ref_spatial) < 1e-4
  # ADM's Inception Score logits: the fc weight without its bias.
  unbiased = ref_pool @ state_dict["fc.weight"].numpy().T
  assert rel(out["logits_unbiased"], unbiased) < 1e-4


def test_adm_preprocessing_is_tf_legacy_resize():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  for shape in [(2, 256, 256, 3), (1, 64, 80, 3), (1, 512, 512, 3)]:
    x = rng.integers(0, 256, size=shape).astype(np.float32)
    expected = tf.compat.v1.image.resize_bilinear(x, [299, 299], align_corners=False,
                                                  half_pixel_centers=False).numpy()
    got = inception.resize_bilinear(jnp.asarray(x), 299, legacy=True)
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_allclose(np.asarray(inception.preprocess(x, "adm")),
                               (expected - 128) / 128, rtol=0, atol=1e-6)


def _random_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.uniform(0.5, 1.0, size=shape).astype(np.float32)
          for k, (_, shape) in inception.torch_layout().items()}


def test_weights_of_another_model_are_rejected(tmp_path):
  sd = _random_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:1000]   # torchvision's 1000-class head
  sd["fc.bias"] = sd["fc.bias"][:1000]
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  del sd["Mixed_7c.branch_pool.conv.weight"]
  with pytest.raises(ValueError) as e:
    inception.variables_from_torch(sd, source="other.pth")
  msg = str(e.value)
  assert "1 missing keys: Mixed_7c.branch_pool.conv.weight" in msg
  assert "1 unexpected keys: AuxLogits.fc.weight" in msg
  assert "fc.weight (1000, 2048) (expected (1008, 2048))" in msg

  path = tmp_path / "vae.safetensors"
  from safetensors.numpy import save_file
  save_file({"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)}, str(path))
  with pytest.raises(ValueError, match="does not hold pytorch-fid's FID InceptionV3"):
    inception.load_inception(str(path))


def test_missing_weights_file():
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    inception.load_inception("/nonexistent/pt_inception.pth")


def test_bad_preprocess_and_input():
  with pytest.raises(ValueError, match="preprocess must be one of"):
    inception.preprocess(np.zeros((1, 8, 8, 3)), "bicubic")
  with pytest.raises(ValueError, match="NHWC RGB"):
    inception.InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))
