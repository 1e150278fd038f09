"""The data sources `config.data.source` may name: one line each in `SOURCES`.

A source is a `pipeline.Source` subclass with a classmethod
`from_config(data, **common)` (data = `config.data`; common = the checked facts every
source takes, `make_source` builds them). Its spec says what the rest of the code needs to
know without loading it:
  latent     the model samples SD-VAE latents, decoded to images by a VAE; the element
             is `config.latent_size` square (else pixels, `config.image_size` square)
  posterior  batches carry 'x_std', the posterior's std, sampled on the device
The class is named by `module:Class` and imported only when the source is built, so
naming a source loads none of the others (nor tensorflow_datasets or zarr), and sources
outside `data/` (the demo's coloured digits) register here without an import cycle.

To add a source: write its module (a `Source` subclass with `from_config`) and one line
below.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """What the code knows of a source by its name (see the module docstring)."""
  name: str
  target: str               # "package.module:Class", a pipeline.Source subclass
  latent: bool = False
  posterior: bool = False

  @property
  def size_key(self) -> str:
    """The config key of the element's height and width."""
    return "latent_size" if self.latent else "image_size"

  def element_shape(self, config) -> tuple[int, int, int]:
    """(H, W, C) the model trains on, from the config."""
    size = int(config[self.size_key])
    return (size, size, int(config.model.in_channels))

  def load(self) -> type:
    """The Source class (imports its module)."""
    module, _, attr = self.target.partition(":")
    return getattr(importlib.import_module(module), attr)


SOURCES: dict[str, SourceSpec] = {s.name: s for s in (
    SourceSpec("latents", "fcdm_jax.data.latents:LatentSource", latent=True, posterior=True),
    SourceSpec("tfds", "fcdm_jax.data.tfds_images:TfdsSource"),
    SourceSpec("embedded", "fcdm_jax.data.embedded:EmbeddedSource"),
    SourceSpec("npz", "fcdm_jax.data.npz_images:NpzImageSource"),
    SourceSpec("colour_digits", "fcdm_jax.demo.colour_digits:ColourDigitsSource"),
    SourceSpec("torch_features", "fcdm_jax.data.torch_latents:TorchFeatureSource", latent=True),
    SourceSpec("torch_zarr", "fcdm_jax.data.torch_latents:TorchZarrSource", latent=True),
)}


def source_spec(name: str) -> SourceSpec:
  """The spec of source `name`; ValueError listing the registered names otherwise."""
  try:
    return SOURCES[name]
  except KeyError:
    raise ValueError(f"unknown config.data.source {name!r}; expected one of "
                     f"{tuple(SOURCES)}") from None
