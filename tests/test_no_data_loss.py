"""Bad input never loses what is already written: refused before any work, files intact."""

import os
import subprocess
import sys

import pytest

from fcdm_jax import fileio
from fcdm_jax.train.loop import train_and_evaluate
from helpers.files import digests
from helpers.training import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_refuses_an_out_that_is_its_own_sample_batch(tmp_path):
  for name in ("samples.npz", "ref.npz", "inception.pth"):
    (tmp_path / name).write_bytes(os.urandom(256))
  before = digests(tmp_path)
  s = str(tmp_path / "samples.npz")
  result = subprocess.run(
      [sys.executable, "-m", "fcdm_jax.evaluate", f"--samples={s}",
       f"--ref={tmp_path / 'ref.npz'}", f"--inception={tmp_path / 'inception.pth'}",
       f"--out={s}", "--overwrite"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "error: --out=" in result.stderr and "is also an input" in result.stderr
  assert "Traceback" not in result.stderr
  assert digests(tmp_path) == before


def test_check_output_refuses_existing_folder_and_unwritable(tmp_path):
  existing = tmp_path / "metrics.json"
  existing.write_text("{}")
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    fileio.check_output(str(existing))
  fileio.check_output(str(existing), overwrite=True)   # asked for: allowed
  assert existing.read_text() == "{}"                  # the check itself writes nothing there
  with pytest.raises(ValueError, match="is a folder"):
    fileio.check_output(str(tmp_path), overwrite=True)
  with pytest.raises(ValueError, match="cannot be written"):
    fileio.check_output(str(existing / "under_a_file.json"))
  fileio.check_output(str(tmp_path / "new" / "metrics.json"))
  assert os.listdir(tmp_path / "new") == []            # the write probe is removed


def test_keep_checkpoints_zero_is_refused_with_checkpoints_intact(tmp_path):
  workdir = tmp_path / "run"
  for step in (2, 4):   # stand-ins for earlier checkpoints: any bytes must survive
    folder = workdir / "checkpoints" / str(step)
    folder.mkdir(parents=True)
    (folder / "state").write_bytes(os.urandom(64))
  before = digests(workdir)
  config = load_config(**{"data.path": str(tmp_path / "no_data"), "keep_checkpoints": 0})
  with pytest.raises(ValueError, match=r"config\.keep_checkpoints must be an integer >= 1, got 0"):
    train_and_evaluate(config, str(workdir))
  assert digests(workdir) == before
