"""A damaged newest checkpoint is set aside and the run resumes from the previous one.

Damage as it happens on real disks and buckets: the checkpoint's JSON settings truncated,
or its largest array file truncated. The same command must report the step, move the
folder aside (never delete it), resume from the previous checkpoint and end in exactly the
state of a run that was never damaged.
"""

import pathlib

import jax
import numpy as np
import pytest

from fcdm_jax import checkpoint as ckpt_lib
from fcdm_jax.train import loop

from helpers.training import load_config, make_latent_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_latent_dataset(tmp_path_factory.mktemp("latents"))


def config_of(dataset, steps):
  return load_config(**{"data.path": dataset, "num_train_steps": steps})


@pytest.fixture(scope="module")
def undamaged(tmp_path_factory, dataset):
  workdir = str(tmp_path_factory.mktemp("undamaged"))
  return loop.train_and_evaluate(config_of(dataset, 6), workdir)["state"]


def truncate_meta(step_dir: pathlib.Path):
  meta = step_dir / "meta" / "metadata"
  meta.write_text(meta.read_text()[:10])


def truncate_largest_array(step_dir: pathlib.Path):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:16])


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_meta, truncate_largest_array])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes(tmp_path, dataset, undamaged,
                                                                    damage):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_of(dataset, 4), str(workdir))
  damage(workdir / "checkpoints" / "4")

  summary = loop.train_and_evaluate(config_of(dataset, 6), str(workdir))
  assert (summary["start_step"], summary["end_step"]) == (2, 6)
  set_aside = list((workdir / ckpt_lib.DAMAGED_DIR).iterdir())
  assert [p.name.split("-")[0] for p in set_aside] == ["4"]
  assert (set_aside[0] / "state").is_dir()  # kept, not deleted
  for a, b in zip(jax.tree.leaves(undamaged), jax.tree.leaves(summary["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_all_checkpoints_damaged_is_a_clear_error(tmp_path, dataset):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_of(dataset, 2), str(workdir))
  truncate_meta(workdir / "checkpoints" / "2")
  with pytest.raises(RuntimeError, match=r"every checkpoint in .* is damaged; moved aside: "
                                         r"\[.*checkpoints_damaged/2-"):
    loop.train_and_evaluate(config_of(dataset, 4), str(workdir))


@pytest.mark.slow
def test_a_readable_checkpoint_of_other_shapes_is_refused_not_moved(tmp_path, dataset):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config_of(dataset, 2), str(workdir))
  config = config_of(dataset, 4)
  config.optimizer.grad_clip_norm = 1.0  # adds a clipping state: another optimizer layout
  config.model.dwconv_impl = "xla"
  state_dir = workdir / "checkpoints" / "2"
  with pytest.raises(ValueError, match="holds a train state of other shapes"):
    loop.train_and_evaluate(config, str(workdir))
  assert state_dir.is_dir() and not (workdir / ckpt_lib.DAMAGED_DIR).exists()


def test_resume_checks_the_network_fields_old_configs_lack():
  """A config saved before the text-conditioning fields existed still resumes with a class
  model; a text model, or any other network field, is refused."""
  from fcdm_jax import provenance
  config = load_config()
  saved = provenance.as_json(config)
  for key in ("condition", "text_dim", "text_embedder"):
    del saved["model"][key]
  ckpt_lib.check_same_model(saved, config, "use a new --workdir")
  config.model.condition = "text"
  with pytest.raises(ValueError, match="other model fields.*condition"):
    ckpt_lib.check_same_model(saved, config, "use a new --workdir")
