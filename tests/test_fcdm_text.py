"""Text-conditioned FCDM (condition='text'): embedder parameters per level, where the
embedding enters, guidance with the empty caption, errors; class models unchanged."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcdm_jax import conditions
from fcdm_jax.config_base import get_config
from fcdm_jax.flops import fcdm_forward_macs
from fcdm_jax.models import FCDM

TINY = dict(in_channels=4, hidden_size=16, depth=(1, 1, 1, 1, 1), num_classes=3,
            dwconv_impl="xla")
TEXT_DIM = 12
WIDTHS = (16, 32, 64)


def text_model(embedder="linear", **kw):
  return FCDM(**TINY, condition="text", text_dim=TEXT_DIM, text_embedder=embedder, **kw)


def inputs(n=2, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, 8, 8, 4))
  return x, jnp.linspace(10.0, 900.0, n), jax.random.normal(ky, (n, TEXT_DIM))


def param_shapes(model, y):
  x, t, _ = inputs(y.shape[0])
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, t, y)["params"]))


def random_params(model, y, seed=1):
  """Random values in the model's parameter shapes: none is zero, so the zero-initialised
  output layers pass the condition through (and compiling init would take ~20 s here)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape),
                                                      jnp.float32), param_shapes(model, y))


@pytest.mark.parametrize("embedder", ["linear", "mlp"])
def test_embedder_parameters_per_level(embedder):
  model = text_model(embedder)
  params = param_shapes(model, inputs()[2])
  assert not any(k.startswith("y_embedder") for k in params)
  for k, width in enumerate(WIDTHS, start=1):
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params[f"text_embedder_{k}"])
    if embedder == "linear":
      assert shapes == {"proj": {"kernel": (TEXT_DIM, width), "bias": (width,)}}
    else:
      assert shapes == {"mlp_0": {"kernel": (TEXT_DIM, width), "bias": (width,)},
                        "mlp_2": {"kernel": (width, width), "bias": (width,)}}


@pytest.fixture(scope="module")
def mlp_model():
  model = text_model("mlp")
  params = random_params(model, inputs()[2])
  return model, params, jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))


def test_shapes_and_embeddings_change_the_output(mlp_model):
  model, params, forward = mlp_model
  x, t, y = inputs()
  out = forward(params, x, t, y)
  assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
  other = forward(params, x, t, y + 0.5)
  assert np.abs(np.asarray(out - other)).max() > 1e-3
  np.testing.assert_array_equal(forward(params, x, t, y), out)
  # Each row sees its own embedding only.
  mixed = forward(params, x, t, y.at[1].add(0.5))
  np.testing.assert_array_equal(mixed[0], out[0])
  assert np.abs(np.asarray(mixed[1] - out[1])).max() > 1e-3


def test_the_embedding_enters_where_the_class_row_does():
  """A linear text embedder with zero kernel and bias = class row c is the class model
  given label c, whatever the caption: same place, same arithmetic."""
  x, t, y = inputs()
  labels = jnp.array([2, 2])
  class_model = FCDM(**TINY)
  class_params = random_params(class_model, labels)
  params = {k: v for k, v in class_params.items() if not k.startswith("y_embedder")}
  for k, width in enumerate(WIDTHS, start=1):
    row = class_params[f"y_embedder_{k}"]["embedding_table"][2]
    params[f"text_embedder_{k}"] = {"proj": {"kernel": jnp.zeros((TEXT_DIM, width)),
                                             "bias": row}}
  model = text_model("linear")
  got = jax.jit(lambda: model.apply({"params": params}, x, t, y))()
  want = jax.jit(lambda: class_model.apply({"params": class_params}, x, t, labels))()
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_guided_forward_mixes_caption_and_empty_caption(mlp_model):
  model, params, forward = mlp_model
  x, t, y = inputs(2, seed=2)
  empty = jax.random.normal(jax.random.key(9), (1, TEXT_DIM))
  y = jnp.concatenate([y[:1], empty])          # [caption; empty caption]
  t = jnp.concatenate([t[:1], t[:1]])
  scale = 3.0
  guided = jax.jit(lambda p: model.apply({"params": p}, x, t, y, scale,
                                         method=FCDM.forward_with_cfg))(params)
  raw = forward(params, jnp.concatenate([x[:1], x[:1]]), t, y)   # both halves on x[0]
  cond, uncond = raw[:1], raw[1:]
  mixed = uncond[..., :3] + scale * (cond[..., :3] - uncond[..., :3])
  np.testing.assert_allclose(guided[:1, ..., :3], mixed, atol=1e-5)
  np.testing.assert_allclose(guided[1:, ..., :3], mixed, atol=1e-5)
  np.testing.assert_array_equal(guided[..., 3:], raw[..., 3:])
  assert np.abs(np.asarray(cond - uncond)).max() > 1e-3     # the empty caption matters


def test_guidance_needs_no_null_class_for_text():
  model = text_model("linear", class_dropout_prob=0.0)
  x, t, y = inputs(2)
  out = jax.jit(lambda p: model.apply({"params": p}, x, t, y, 2.0,
                                     method=FCDM.forward_with_cfg))(random_params(model, y))
  assert out.shape == (2, 8, 8, 8)


def test_class_models_ignore_the_text_fields():
  """The published tree and outputs, whatever text_dim and text_embedder say."""
  x, t, _ = inputs()
  labels = jnp.array([0, 3])
  plain, other = FCDM(**TINY), FCDM(**TINY, text_dim=5, text_embedder="mlp")
  params = random_params(plain, labels)
  shapes = lambda p: jax.tree_util.tree_map(lambda a: a.shape, p)
  assert shapes(param_shapes(other, labels)) == shapes(params)
  assert {k for k in params if k[1:].startswith("_embedder_") or k.startswith("text_")} == {
      f"{kind}_embedder_{k}" for kind in ("t", "y") for k in (1, 2, 3)}
  apply = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, t, labels))(params)
  np.testing.assert_array_equal(apply(plain), apply(other))


def test_config_fields_and_macs():
  config = get_config("S", 256)
  assert (config.model.condition, config.model.text_dim, config.model.text_embedder) == \
      ("class", 768, "linear")
  config.model.update(condition="text", hidden_size=16, depth=(1, 1, 1, 1, 1))
  model = FCDM(**config.model)
  assert model.example_y(3).shape == (3, 768)
  base = FCDM(**dict(config.model, condition="class"))
  assert base.example_y(3).dtype == jnp.int32
  # The class rows are gathers (no MACs); the text projection is one matmul per level.
  extra = fcdm_forward_macs(model, 8) - fcdm_forward_macs(base, 8)
  assert extra == 768 * sum(WIDTHS)


def test_errors(mlp_model):
  model, params, _ = mlp_model
  x, t, y = inputs()
  apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
  with pytest.raises(ValueError, match=r"takes y as \(2, text_dim=12\) float .* int32 of "
                                       r"shape \(2,\) \(class labels\?"):
    apply(x, t, jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"shape \(2, 768\)"):
    apply(x, t, jnp.zeros((2, 768)))
  with pytest.raises(ValueError, match=r"shape \(2, 1, 12\)"):
    apply(x, t, y[:, None])
  with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
    apply(x, t[:1], y)
  with pytest.raises(ValueError, match="force_drop_ids applies to class labels"):
    apply(x, t, y, force_drop_ids=jnp.ones(2, jnp.int32))
  with pytest.raises(ValueError, match=r"unknown condition 'image'; expected one of "
                                       r"\('class', 'text'\)"):
    FCDM(**TINY, condition="image").init(jax.random.key(0), x, t, y)
  with pytest.raises(ValueError, match="unknown text_embedder 'attention'"):
    text_model("attention").init(jax.random.key(0), x, t, y)


def test_the_condition_kind_answers_for_the_model_the_data_and_the_sampler():
  """One object per condition says what y is, whether the data carries captions, the
  PyTorch layout's embedder, and (bound to a model) the guidance null and padding."""
  text, labels = text_model("mlp"), FCDM(**TINY)
  assert text.condition_kind is conditions.TextEmbeddings
  assert labels.condition_kind is conditions.ClassLabels
  y = conditions.abstract_y(text, 6)
  assert (y.shape, y.dtype) == ((6, TEXT_DIM), jnp.float32)
  assert text.example_y(2).shape == (2, TEXT_DIM) and labels.example_y(2).dtype == jnp.int32
  config = get_config("S", 256)
  assert not conditions.of_config(config).uses_captions
  config.model.condition = "text"
  assert conditions.of_config(config).uses_captions
  assert (text.condition_kind.torch_text_embedder(text),
          labels.condition_kind.torch_text_embedder(labels)) == ("mlp", None)

  empty = np.full((TEXT_DIM,), 0.5, np.float32)
  bound = conditions.condition_of(text, empty)
  padded = bound.pad(bound.check(np.ones((2, TEXT_DIM))), 4)
  np.testing.assert_array_equal(padded, np.stack([np.ones(TEXT_DIM)] * 2 + [empty] * 2))
  with pytest.raises(ValueError, match="pass empty_embedding"):
    conditions.condition_of(text)
  bound = conditions.condition_of(labels)
  assert bound.null == 3 and bound.pad(bound.check([2, 1]), 3).tolist() == [2, 1, 0]
  assert conditions.condition_of(FCDM(**dict(TINY, class_dropout_prob=0.0))).null is None
  with pytest.raises(ValueError, match=r"labels \[3\] are outside \[0, 3\)"):
    bound.check([0, 3])
