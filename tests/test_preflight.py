"""The TPU preflight on a tiny config: compiled for a real TPU topology on this CPU.

Needs libtpu (`pip install -e ".[tpu]"`, which CI installs); skipped without it. The
report's fields and their relations are checked, and a model too big for a v5e chip's HBM
is reported as not fitting. Topology names are checked without libtpu.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers.runs import run_without_module

from fcdm_jax import tpu_topology
from fcdm_jax.perf import preflight_run

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
needs_libtpu = pytest.mark.skipif(not tpu_topology.libtpu_available(),
                                  reason='libtpu not installed (pip install -e ".[tpu]")')


def preflight_cli(tmp_path, *args, config=TINY):
  out = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run([sys.executable, "-m", "fcdm_jax.preflight", f"--config={config}",
                         f"--json={out}", *args], capture_output=True, text=True,
                        timeout=600, cwd=REPO, env=env)
  return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("name, grid, chips_per_host", [
    ("v4-8", (2, 2, 1), (2, 2, 1)),        # 8 TensorCores = 4 chips, one host
    ("v5p-64", (2, 4, 4), (2, 2, 1)),      # 32 chips on 8 hosts
    ("v5e-8", (2, 4), (2, 4, 1)),          # one host with 8 chips
    ("v5litepod-16", (4, 4), (2, 2, 1)),
    ("v6e-8", (2, 4), (2, 4, 1)),
    ("v5e-1", (1, 1), (1, 1, 1)),
    ("v5e:4x4", (4, 4), None),             # raw: libtpu's host layout
    ("V4:2x2x2", (2, 2, 2), None),
])
def test_topology_names(name, grid, chips_per_host):
  s = tpu_topology.parse(name)
  assert s.grid == grid and s.chips_per_host == chips_per_host
  assert s.num_chips == (int(name.split("-")[1]) // s.chip.cores_per_chip if "-" in name
                         else grid[0] * grid[1] * (grid[2] if len(grid) > 2 else 1))
  assert ("chip_config_name" in s.topology_kwargs()) == (s.chip.family == "v4")


@pytest.mark.parametrize("name", ["v7-8", "v5e-6", "v5p-4", "v5e-2", "v5e:2x2x1", "v4:2x2",
                                  "tpu", "v5e-16x"])
def test_bad_topology_names_list_the_accepted_forms(name):
  with pytest.raises(ValueError, match="accepted: accelerator types"):
    tpu_topology.parse(name)


def test_out_of_memory_messages():
  new = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (45.75G) exceeds available HBM (15.75G).")
  assert preflight_run.parse_oom(new) == dict(required_bytes=int(45.75 * 2**30),
                                          available_bytes=int(15.75 * 2**30))
  old = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 17.5G of 15.5G hbm."
  assert preflight_run.parse_oom(old)["required_bytes"] == int(17.5 * 2**30)
  assert preflight_run.parse_oom("INVALID_ARGUMENT: bad shape") is None


def test_roofline_picks_the_binding_resource():
  r = preflight_run.roofline(flops=197e12, nbytes=819e9 / 2, peak_tflops=197.0, bandwidth=819e9,
                         model_flops=98.5e12, images=256)
  assert r["binds"] == "compute" and r["step_s_bound"] == pytest.approx(1.0)
  assert r["img_per_s_bound"] == pytest.approx(256) and r["mfu_bound"] == pytest.approx(0.5)
  r = preflight_run.roofline(flops=197e12, nbytes=1e9, peak_tflops=197.0, bandwidth=819e9,
                         model_flops=1.02 * 197e12, images=256)   # nominal > counted
  assert r["mfu_bound"] == 1.0
  r = preflight_run.roofline(flops=1e12, nbytes=819e9 * 2, peak_tflops=197.0, bandwidth=819e9,
                         model_flops=1e12, images=8)
  assert r["binds"] == "HBM bandwidth" and r["step_s_bound"] == pytest.approx(2.0)


@pytest.mark.slow
def test_without_libtpu_one_line_and_nonzero_exit(tmp_path):
  """A Python that cannot find libtpu (a shadowing stub of importlib's finder)."""
  proc = run_without_module('libtpu', ["-m", "fcdm_jax.preflight", f"--config={TINY}",
                                               "--topology=v5e:2x2"], tmp_path, timeout=120)
  assert proc.returncode == 2
  assert 'pip install -e ".[tpu]"' in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_input_exits_2(tmp_path):
  """Exit 1 means 'does not fit' (launch/tpu_pod.sh tells them apart): a missing or unknown
  flag, a bad topology or an impossible batch is bad input, 2, with a one-line reason."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  tiny = f"--config={TINY}"
  cases = [(["--topology=v5e-8"], "--config and --topology are required"),
           ([tiny, "--topology=v5e-8", "--no_such_flag=1"], "no_such_flag"),
           ([tiny, "--topology=v5e-8", "--config.model.no_such_field=1"], "no_such_field"),
           (["--config=no_such_config.py", "--topology=v5e-8"], "no_such_config.py"),
           ([tiny, "--topology=v7-8"], "unknown TPU topology 'v7-8'")]
  if tpu_topology.libtpu_available():
    cases.append(([tiny, "--topology=v5e:2x2", "--batch=6"],
                  "batch 6 must be positive and divisible by the 4 data-parallel devices"))
  for args, reason in cases:
    proc = subprocess.run([sys.executable, "-m", "fcdm_jax.preflight", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2, (args, proc.stderr[-3000:])
    assert reason in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])


@needs_libtpu
@pytest.mark.slow
def test_tiny_config_on_v5e_2x2(tmp_path):
  """Train step, guided sampling forward and preview sampler, compiled for 4 v5e chips."""
  proc, report = preflight_cli(tmp_path, "--topology=v5e:2x2", "--batch=16", "--sample_batch=6",
                               "--config.model.depth=(2,2,2,2,2)",
                               "--config.model.dtype=bfloat16",
                               "--config.preview.every_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FITS" in proc.stdout and "roofline bound (derived, not measured)" in proc.stdout
  topo = report["topology"]
  assert (topo["chips"], topo["hosts"], topo["device_kind"]) == (4, 1, "TPU v5 lite")
  assert report["mesh"] == {"data": 4, "fsdp": 1} and report["fits"] is True
  assert report["dwconv_impl"] == "xla"  # 'auto' resolved for the TPU, not this CPU
  chip = report["chip"]
  assert chip["hbm_bytes"] == 16 * 2**30 and chip["peak_tflops"] == 197.0
  progs = report["programs"]
  assert progs["train"]["batch"] == 16
  assert progs["sample"]["batch"] == 8  # rounded up to the 4 chips, as fcdm_jax.sample does
  assert progs["sample"]["forward_batch"] == 16  # guided: [x; x]
  for name in ("train", "sample", "preview"):
    r = progs[name]
    m = r["memory"]
    assert r["compiled"] and r["compile_s"] > 0 and r["fits"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"] > 0
    resident = m["total"] if name != "preview" else m["with_train_state"]
    assert r["margin_bytes"] == chip["hbm_bytes"] - resident
  assert progs["train"]["memory"]["alias"] > 0  # the state is donated
  # The preview runs beside the train state (its EMA params are the preview's arguments).
  train_m, prev_m = progs["train"]["memory"], progs["preview"]["memory"]
  assert prev_m["with_train_state"] == (train_m["argument"] + train_m["code"] + prev_m["output"]
                                        + prev_m["temp"] + prev_m["code"]) > prev_m["total"]
  macs = report["forward_gmacs_per_image"] * 1e9
  for name, factor, images in (("train", 6, 16), ("sample", 2, 16)):
    pc, rf = progs[name]["per_chip"], progs[name]["roofline"]
    assert pc["model_flops"] == pytest.approx(factor * macs * images / 4)
    # Depth 2 per level: the compiled count sees one block of each scan; the whole step
    # (lowered unrolled) has more work, at least the model's multiply-adds, shared by 4 chips.
    cpu = pc["cpu_lowered_flops"]
    assert cpu["unrolled"] > 1.2 * cpu["scanned"]
    assert pc["flops"] == pytest.approx(cpu["unrolled"] / 4)
    assert pc["flops"] >= 0.95 * pc["model_flops"] and pc["flops"] > pc["compiled_flops_loops_once"]
    assert pc["bytes_accessed"] > 0
    assert rf["step_s_bound"] == max(rf["compute_s"], rf["memory_s"])
    assert rf["compute_s"] == pytest.approx(pc["flops"] / 197e12)
    assert rf["memory_s"] == pytest.approx(pc["bytes_accessed"] / 819e9)
    assert rf["binds"] == ("compute" if rf["compute_s"] > rf["memory_s"] else "HBM bandwidth")
    assert rf["img_per_s_bound"] == pytest.approx(progs[name]["batch"] / rf["step_s_bound"])
    assert 0 < rf["mfu_bound"] <= 1
  assert report["command"].startswith("python -m fcdm_jax.preflight --config=")


@needs_libtpu
@pytest.mark.slow
def test_model_beyond_hbm_does_not_fit(tmp_path):
  """Hidden size 2048: parameters, AdamW state and EMA alone exceed a v5e chip's 16 GiB."""
  proc, report = preflight_cli(tmp_path, "--topology=v5e:2x2", "--batch=8",
                               "--programs=train", "--config.model.hidden_size=2048")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout
  train = report["programs"]["train"]
  assert report["fits"] is False and train["fits"] is False
  if train["compiled"]:
    assert train["memory"]["total"] > 16 * 2**30 and train["margin_bytes"] < 0
  else:  # the compiler refused: its own figures
    assert train["required_bytes"] > train["available_bytes"] > 0
    assert train["margin_bytes"] < 0 and "RESOURCE_EXHAUSTED" in train["compiler_error"]


@needs_libtpu
@pytest.mark.slow
def test_text_to_image_config_on_v5e_8(tmp_path):
  """configs/t2i_s_256.py (text embeddings as y, latents with their posterior std): its
  train step, guided sampling forward and preview sampler compile for a v5e-8 (a smaller
  batch than the config's, to keep the test short)."""
  proc, report = preflight_cli(tmp_path, "--topology=v5e-8", "--batch=16", "--sample_batch=8",
                               config=REPO / "configs" / "t2i_s_256.py")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["model"]["condition"] == "text" and report["fits"] is True
  progs = report["programs"]
  assert set(progs) == {"train", "sample", "preview"}
  assert all(r["compiled"] and r["fits"] for r in progs.values())
  assert progs["sample"]["forward_batch"] == 16   # guided with the empty caption: [x; x]
  assert progs["train"]["per_chip"]["flops"] >= 0.95 * progs["train"]["per_chip"]["model_flops"]
