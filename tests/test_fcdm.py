"""FCDM in Flax against the published PyTorch model's fixture, its init, MACs and errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax import convert
from fcdm_jax.config_base import get_config
from fcdm_jax.flops import fcdm_forward_macs
from fcdm_jax.models import FCDM, get_variant

# The published GMACs of one forward on one latent (the FCDM paper's table).
PUBLISHED_GMACS = {("S", 32): 3.07, ("S", 64): 12.27, ("B", 32): 12.14, ("B", 64): 48.44,
                   ("L", 32): 48.23, ("L", 64): 192.52, ("XL", 32): 64.53, ("XL", 64): 257.52}


def nhwc(a):
  return jnp.asarray(a).transpose(0, 2, 3, 1)


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def tiny(reference_dir):
  ref = np.load(reference_dir / "fcdm_tiny.npz")
  state_dict = {k[len("param/"):]: ref[k] for k in ref.files if k.startswith("param/")}
  return ref, state_dict, convert.params_from_torch(state_dict)


@pytest.mark.parametrize("dwconv_impl,remat,unroll", [
    ("xla", "none", False), ("shift", "none", False),
    pytest.param("shift", "block", True, marks=pytest.mark.slow), ("xla", "dots", False)])
def test_parity_with_published_forward(tiny, dwconv_impl, remat, unroll):
  ref, sd, params = tiny
  model = convert.infer_model(sd).clone(dwconv_impl=dwconv_impl, remat=remat,
                                        scan_unroll=unroll)
  forward = jax.jit(lambda p, x, t, y, drop: model.apply({"params": p}, x, t, y,
                                                          force_drop_ids=drop))
  x, y = nhwc(ref["x"]), jnp.asarray(ref["y"])
  none = jnp.zeros(4, jnp.int32)  # drop nothing: the same as no force_drop_ids
  out = nchw(forward(params, x, jnp.asarray(ref["t_ddpm"]), y, none))
  np.testing.assert_allclose(out, ref["out_ddpm"], atol=1e-4, rtol=0)
  out = nchw(forward(params, x, jnp.asarray(ref["t_flow"]), y, none))
  np.testing.assert_allclose(out, ref["out_flow"], atol=1e-4, rtol=0)
  out = nchw(forward(params, x, jnp.asarray(ref["t_ddpm"]), y, jnp.asarray(ref["force_drop_ids"])))
  np.testing.assert_allclose(out, ref["out_forced_drop"], atol=1e-4, rtol=0)
  guided = jax.jit(lambda p, x, t, y, s: model.apply({"params": p}, x, t, y, s,
                                                     method=FCDM.forward_with_cfg))
  out = nchw(guided(params, nhwc(ref["cfg_x"]), jnp.asarray(ref["cfg_t"]),
                    jnp.asarray(ref["cfg_y"]), float(ref["cfg_scale"])))
  np.testing.assert_allclose(out, ref["out_cfg"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_guidance_on_all_eps_channels(tiny):
  ref, sd, params = tiny
  model = convert.infer_model(sd)
  x, t, y, s = nhwc(ref["cfg_x"]), jnp.asarray(ref["cfg_t"]), jnp.asarray(ref["cfg_y"]), 4.0
  guided = jax.jit(lambda x, all_eps: model.apply({"params": params}, x, t, y, s, all_eps,
                                                  method=FCDM.forward_with_cfg),
                   static_argnums=1)
  out = guided(x, True)
  half = x[:2]
  raw = jax.jit(lambda x: model.apply({"params": params}, x, t, y))(jnp.concatenate([half, half]))
  expected = raw[2:, ..., :4] + s * (raw[:2, ..., :4] - raw[2:, ..., :4])
  np.testing.assert_allclose(out[:2, ..., :4], expected, atol=1e-5)
  np.testing.assert_allclose(out[2:, ..., :4], expected, atol=1e-5)
  np.testing.assert_allclose(out[..., 4:], raw[..., 4:], atol=1e-6)
  # The published rule leaves the 4th eps channel unguided; this option does not.
  published = guided(x, False)
  assert not np.allclose(published[..., 3], out[..., 3])


def test_label_dropout_in_training_uses_its_rng(tiny):
  ref, sd, params = tiny
  model = convert.infer_model(sd, class_dropout_prob=1.0)
  x, t, y = nhwc(ref["x"]), jnp.asarray(ref["t_ddpm"]), jnp.asarray([0, 1, 2, 3])
  dropped = jax.jit(lambda x: model.apply({"params": params}, x, t, y, train=True,
                                          rngs={"label_dropout": jax.random.key(1)}))(x)
  forced = jax.jit(lambda x: model.apply({"params": params}, x, t, y,
                                         force_drop_ids=jnp.ones(4, jnp.int32)))(x)
  np.testing.assert_allclose(dropped, forced, atol=1e-6)
  with pytest.raises(Exception, match="label_dropout"):
    model.apply({"params": params}, x, t, y, train=True)


@pytest.fixture(scope="module")
def small_init():
  model = FCDM(in_channels=4, hidden_size=32, depth=(1, 2, 2, 1, 1), num_classes=10)
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
  t, y = jnp.array([3.0, 700.0]), jnp.array([1, 10])
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), x, t, y)["params"]))()
  return model, params, (x, t, y)


def test_output_is_exactly_zero_at_init(small_init):
  model, params, (x, t, y) = small_init
  out = jax.jit(model.apply)({"params": params}, x, t, y)
  assert out.shape == (2, 16, 16, 8)
  assert np.all(np.asarray(out) == 0.0)


def test_zero_initialised_layers(small_init):
  _, params, _ = small_init
  sd = convert.params_to_torch(params)
  zero = [k for k in sd if k.endswith(".bias") or "adaLN_modulation" in k or ".grn." in k
          or k.startswith("final_layer.conv")]
  assert len(zero) > 40
  for k in zero:
    assert np.all(sd[k] == 0), k
  nonzero = [k for k in sd if k not in zero]
  for k in nonzero:
    assert np.any(sd[k] != 0), k


def _fans_torch(shape):
  receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
  return shape[1] * receptive, shape[0] * receptive


@pytest.mark.slow
def test_init_distributions():
  """Weight variances match their formulas within sampling error (published layouts)."""
  model = FCDM(**dict(get_variant("S"), num_classes=1000))
  x, t, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  init = jax.jit(lambda: nn.unbox(model.init(jax.random.key(7), x, t, y)["params"]))
  sd = convert.params_to_torch(init())

  def check(key, expected_var):
    w = np.asarray(sd[key], np.float64)
    n = w.size
    # Var of a sample variance: ~ var^2 * (kurtosis - 1) / n; allow 5 standard errors.
    # Uniform: kurtosis 1.8; normal: 3.
    tol = 5 * expected_var * math.sqrt(2.0 / n)
    assert abs(w.var() - expected_var) < tol, (key, w.var(), expected_var)
    assert abs(w.mean()) < 5 * math.sqrt(expected_var / n), key

  xavier = lambda shape: 2.0 / sum(_fans_torch(shape))
  for key in ("encoder_level_1.0.pwconv1.weight", "latent.3.pwconv2.weight",
              "encoder_level_2.1.dwconv.weight", "down1_2.conv.0.weight", "up3_2.conv.0.weight",
              "reduce_chans_2.weight", "output_layer.weight"):
    check(key, xavier(sd[key].shape))
  w = sd["x_embedder.weight"]  # a linear layer on the flattened 3x3 window
  check("x_embedder.weight", 2.0 / (w.shape[1] * 9 + w.shape[0]))
  for key in ("y_embedder_1.embedding_table.weight", "y_embedder_3.embedding_table.weight",
              "t_embedder_2.mlp.0.weight", "t_embedder_3.mlp.2.weight"):
    check(key, 0.02 ** 2)


@pytest.mark.parametrize("variant", ["S", "B", "L", "XL"])
def test_macs_match_published_table(variant):
  model = FCDM(**get_variant(variant))
  for size in (32, 64):
    gmacs = fcdm_forward_macs(model, size) / 1e9
    expected = PUBLISHED_GMACS[(variant, size)]
    assert abs(gmacs - expected) / expected < 0.01, (variant, size, gmacs, expected)


def test_configs_build_the_published_variants():
  import importlib.util, pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  for variant in ("s", "b", "l", "xl"):
    for res in (256, 512):
      spec = importlib.util.spec_from_file_location("cfg", root / f"{variant}_{res}.py")
      mod = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(mod)
      for objective in ("ddpm", "flow"):
        config = mod.get_config(objective)
        model = FCDM(**config.model)
        assert model.hidden_size == get_variant(variant)["hidden_size"]
        assert config.latent_size == res // 8 and config.batch_size == 256
        assert config.optimizer.learning_rate == 1e-4 and config.optimizer.weight_decay == 0
        assert config.ema_decay == 0.9999 and config.objective == objective
        assert model.learn_sigma == (objective == "ddpm")


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_have_clear_errors(small_init):
  model, params, (x, t, y) = small_init
  apply = lambda *a: model.apply({"params": params}, *a)
  with pytest.raises(ValueError, match="divisible by 4"):
    apply(jnp.zeros((2, 18, 16, 4)), t, y)
  with pytest.raises(ValueError, match="3 channels but the model takes in_channels=4"):
    apply(jnp.zeros((2, 16, 16, 3)), t, y)
  with pytest.raises(ValueError, match=r"labels \[11\] out of range \[0, 10\]"):
    apply(x, t, jnp.array([1, 11]))
  with pytest.raises(ValueError, match=r"labels \[-1\] out of range"):
    apply(x, t, jnp.array([-1, 0]))


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown FCDM variant 'XXL'"):
    get_variant("XXL")
  with pytest.raises(ValueError, match="unknown FCDM variant"):
    get_config("M", 256)
  with pytest.raises(ValueError, match="unknown objective 'edm'"):
    get_config("S", 256, "edm")


def test_unknown_remat_and_dwconv_impl(small_init):
  _, params, (x, t, y) = small_init
  with pytest.raises(ValueError, match="unknown remat 'all'"):
    FCDM(hidden_size=32, depth=(1, 2, 2, 1, 1), num_classes=10, remat="all").apply(
        {"params": params}, x, t, y)
  with pytest.raises(ValueError, match="unknown dwconv_impl 'fft'"):
    FCDM(hidden_size=32, depth=(1, 2, 2, 1, 1), num_classes=10, dwconv_impl="fft").apply(
        {"params": params}, x, t, y)


def test_cfg_needs_a_null_class(small_init):
  _, params, (x, t, y) = small_init
  model = FCDM(hidden_size=32, depth=(1, 2, 2, 1, 1), num_classes=10, class_dropout_prob=0.0)
  with pytest.raises(ValueError, match="null class"):
    model.apply({"params": params}, x, t, y, 4.0, method=FCDM.forward_with_cfg)
