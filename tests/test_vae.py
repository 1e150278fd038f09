"""Flax SD-VAE against diffusers' PyTorch AutoencoderKL (random weights, no download)."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from fcdm_jax.models import vae

from helpers.torch_compat import import_torchvision

SMALL = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
             layers_per_block=1, norm_num_groups=8,
             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
# stabilityai/sd-vae-ft-ema's config.json (the fields that shape the network).
SD_VAE_FT_EMA = dict(in_channels=3, out_channels=3, latent_channels=4,
                     block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                     norm_num_groups=32, sample_size=256, act_fn="silu",
                     down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4)


@pytest.fixture(scope="module")
def torch_modules():
  torch = pytest.importorskip("torch")
  import_torchvision()   # diffusers imports torchvision when it is installed
  diffusers = pytest.importorskip("diffusers")
  return torch, diffusers.AutoencoderKL


def _torch_vae(torch, cls, config, seed=0):
  """A diffusers AutoencoderKL with random weights, biases and norm affines included."""
  torch.manual_seed(seed)
  model = cls(**config).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        offset = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
        p.copy_(torch.empty_like(p).uniform_(-0.5, 0.5, generator=g) + offset)
  return model


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def _check_parity(torch, tmodel, model, params, size):
  g = torch.Generator().manual_seed(2)
  x = torch.rand(2, tmodel.config.in_channels, size, size, generator=g) * 2 - 1
  with torch.no_grad():
    posterior = tmodel.encode(x).latent_dist
    z = torch.randn(posterior.mean.shape, generator=g)
    decoded = tmodel.decode(z).sample
  post = jax.jit(lambda p, v: model.apply(p, v, method=model.encode))(params, _nhwc(x))
  out = jax.jit(lambda p, v: model.apply(p, v, method=model.decode))(params, _nhwc(z))
  for got, want in ((post.mean, _nhwc(posterior.mean)), (post.logvar, _nhwc(posterior.logvar)),
                    (out, _nhwc(decoded))):
    assert got.shape == want.shape
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(post.std), _nhwc(posterior.std), rtol=1e-4, atol=1e-6)


def test_small_config_from_a_diffusers_directory(torch_modules, tmp_path):
  torch, cls = torch_modules
  tmodel = _torch_vae(torch, cls, SMALL)
  tmodel.save_pretrained(tmp_path / "vae", safe_serialization=True)
  model, params = vae.load_vae(str(tmp_path))   # finds the pipeline-style vae/ subfolder
  assert model.config.block_out_channels == (32, 64)
  _check_parity(torch, tmodel, model, params, size=16)


def test_sd_vae_ft_ema_config_at_64px(torch_modules):
  torch, cls = torch_modules
  tmodel = _torch_vae(torch, cls, SD_VAE_FT_EMA)
  model = vae.AutoencoderKL(vae.VAEConfig.from_dict(SD_VAE_FT_EMA))
  params = vae.params_from_torch(tmodel.state_dict(), model)
  _check_parity(torch, tmodel, model, params, size=64)


def test_old_attention_names_in_a_bin_file(torch_modules, tmp_path):
  torch, cls = torch_modules
  tmodel = _torch_vae(torch, cls, SMALL, seed=3)
  new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old_sd = {}
  for key, value in tmodel.state_dict().items():
    for n, o in new.items():
      key = key.replace(f".attentions.0.{n}.", f".attentions.0.{o}.")
    old_sd[key] = value
  assert any(".query.weight" in k for k in old_sd)
  torch.save(old_sd, tmp_path / "diffusion_pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, _class_name="AutoencoderKL")))
  model, params = vae.load_vae(str(tmp_path))
  expected = vae.params_from_torch(tmodel.state_dict(), model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="VAE directory not found"):
    vae.load_vae(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae.load_vae(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(SMALL))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or "
                                              "diffusion_pytorch_model.bin"):
    vae.load_vae(str(tmp_path))


def test_weights_of_another_model(tmp_path):
  from safetensors.numpy import save_file
  model = vae.AutoencoderKL(vae.VAEConfig.from_dict(SMALL))
  layout = vae.torch_layout(model)
  sd = {k: np.zeros(shape, np.float32) for k, (_, shape) in layout.items()}
  sd["encoder.down_blocks.0.resnets.1.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
  del sd["decoder.conv_out.bias"]
  sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
  (tmp_path / "config.json").write_text(json.dumps(SMALL))
  save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError) as e:
    vae.load_vae(str(tmp_path))
  msg = str(e.value)
  assert "1 missing keys: decoder.conv_out.bias" in msg
  assert "1 unexpected keys: encoder.down_blocks.0.resnets.1.conv1.weight" in msg
  assert "quant_conv.weight (8, 8, 3, 3) (expected (8, 8, 1, 1))" in msg


def test_config_validation():
  with pytest.raises(ValueError, match="unsupported block types"):
    vae.VAEConfig.from_dict(dict(SMALL, down_block_types=["AttnDownEncoderBlock2D"] * 2))
  with pytest.raises(ValueError, match="not an AutoencoderKL"):
    vae.VAEConfig.from_dict(dict(SMALL, _class_name="UNet2DModel"))
  with pytest.raises(ValueError, match="act_fn"):
    vae.VAEConfig.from_dict(dict(SMALL, act_fn="gelu"))
  model = vae.AutoencoderKL(vae.VAEConfig.from_dict(SMALL))
  with pytest.raises(ValueError, match="not a multiple of 2"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 15, 16, 3)))
