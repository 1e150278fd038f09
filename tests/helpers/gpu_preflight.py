"""The GPU preflight as the tests run it: the tiny config, the skip mark for machines without
the gpu extra, and the command line on the CPU with a JSON report."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fcdm_jax import gpu_topology

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.py"
needs_gpu_extra = pytest.mark.skipif(gpu_topology.missing_packages() is not None,
                                     reason='the gpu extra is not installed '
                                            '(pip install -e ".[gpu]")')


def preflight_cli(tmp_path, *args, name="report.json", timeout=900):
  """(the finished process, its --json report or None) of the preflight of the tiny config."""
  out = tmp_path / name
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  env.pop("XLA_CLIENT_MEM_FRACTION", None)
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.preflight", f"--config={TINY}",
                         f"--json={out}", *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO, env=env)
  return proc, (json.loads(out.read_text()) if out.exists() else None)
