"""Test setup: 8 fake CPU devices (set before JAX starts), the reference fixtures in
`tests/reference/` and the session-wide fixtures (GCS emulator, judge classifier). Markers
and paths are in pyproject.toml."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole run, shared with the subprocesses the
# tests start: the same tiny programs are compiled by many tests.
import shutil  # noqa: E402
import tempfile  # noqa: E402

_OWN_CACHE = None   # the cache this run made (removed at the end), unless one was given
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="fcdm_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
REFERENCE_FILES = ("fcdm_tiny.npz", "fcdm_state_dict_manifest.json", "gaussian_diffusion.npz",
                   "flow_matching.npz", "adm_metrics.npz")


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """The fixtures computed by the published code (tests/reference/README.md). A missing
  file is an error of every test that needs it, never a skip."""
  missing = [name for name in REFERENCE_FILES if not (REFERENCE / name).is_file()]
  if missing:
    raise FileNotFoundError(f"reference fixtures missing from {REFERENCE}: {missing}; they are "
                            "part of the repository (git checkout -- tests/reference)")
  return REFERENCE


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A GCS emulator on 127.0.0.1 with bucket `bucket`; every client of this process and of
  the subprocesses the tests start is pointed at it (tests/helpers/gcs_emulator.py). Yields a
  function giving a fresh `gs://bucket/<test>-<n>` prefix per call."""
  from helpers.gcs_emulator import Emulator, client_env
  root = tmp_path_factory.mktemp("gcs")
  (root / "data").mkdir()
  emulator = Emulator(str(root / "data")).start()
  saved = {k: os.environ.get(k) for k in client_env(emulator.url)}
  os.environ.update(client_env(emulator.url))
  counter = iter(range(1 << 30))

  def prefix(name: str = "t") -> str:
    return f"gs://{emulator.bucket}/{name}-{next(counter)}"

  prefix.emulator = emulator
  try:
    yield prefix
  finally:
    emulator.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture(scope="session")
def digit_classifier(tmp_path_factory):
  """A folder holding the demo judge's digit classifier (`eval_classifier/`), trained once
  per test run with the real recipe: tests that run a demo copy it into their workdir, as
  a rerun of the demo finds its own cache there."""
  from fcdm_jax import fileio
  from fcdm_jax.demo import digit_judge as demo_eval
  folder = _shared_between_workers(tmp_path_factory, "digit_classifier")
  with fileio.local_lock(folder.parent / "digit_classifier.lock"):
    # The first worker trains and writes the cache; the others find it.
    demo_eval.load_or_train_classifier(str(folder))
  return folder / demo_eval.CLASSIFIER_DIR


def _shared_between_workers(tmp_path_factory, name: str) -> pathlib.Path:
  """A folder every pytest-xdist worker of this run sees (their base temp folders' parent),
  or this process's own when the run is not distributed."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  folder = root / name
  folder.mkdir(exist_ok=True)
  return folder

