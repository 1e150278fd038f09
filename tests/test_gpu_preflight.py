"""The GPU preflight: the tiny config compiled by XLA's GPU compiler for abstract NVIDIA GPUs
on this CPU, a config too large for them, and --fit.

Compiling needs the gpu extra (`pip install -e ".[gpu]"`: JAX's CUDA plugin and ptxas, no
GPU), which CI installs; those tests skip without it. Names, the target files and the
answers to bad input are checked without it.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from helpers.gpu_preflight import TINY, needs_gpu_extra, preflight_cli
from helpers.runs import run_without_module

from fcdm_jax import gpu_topology
from fcdm_jax.perf import targets

REPO = pathlib.Path(__file__).resolve().parents[1]
GiB = 2**30


# ----------------------------------------------------------------------------- no extra needed


@pytest.mark.parametrize("name, gpu, hosts, per_host, topology", [
    ("4x4090", "4090", 1, 4, "1x1x4"),
    ("8xh100", "h100", 1, 8, "1x1x8"),
    ("8xA100-80GB", "a100-80gb", 1, 8, "1x1x8"),
    ("2x8xh100", "h100", 2, 8, "1x2x8"),
    ("1xrtx4090", "4090", 1, 1, "1x1x1"),
    ("4xl40s", "l40s", 1, 4, "1x1x4"),
    ("8xh200", "h200", 1, 8, "1x1x8"),
    ("8xa100-40gb", "a100-40gb", 1, 8, "1x1x8"),
])
def test_gpu_topology_names(name, gpu, hosts, per_host, topology):
  t = gpu_topology.parse(name)
  assert (t.gpu.name, t.hosts, t.gpus_per_host, t.topology_name) == (gpu, hosts, per_host,
                                                                     topology)
  target = targets.parse(name)
  assert target.kind == "gpu" and target.count == hosts * per_host


@pytest.mark.parametrize("name", ["4x9090", "4xa100-20gb", "x4090", "4x", "0x4090", "4x4x4x4090"])
def test_bad_gpu_names_list_the_known_gpus(name):
  with pytest.raises(ValueError, match="4090, l40s, a100-40gb, a100-80gb, h100, h200"):
    targets.parse(name)


def test_gpu_table_and_targets():
  """The six GPUs with their vendor figures; every number of a target has its source."""
  gpus = gpu_topology.GPUS
  assert set(gpus) >= {"4090", "l40s", "a100-40gb", "a100-80gb", "h100", "h200"}
  expect = {"4090": (24, 1008e9, 165.2, "8.9"), "l40s": (48, 864e9, 362.05, "8.9"),
            "a100-40gb": (40, 1555e9, 312.0, "8.0"), "a100-80gb": (80, 2039e9, 312.0, "8.0"),
            "h100": (80, 3.35e12, 989.4, "9.0"), "h200": (141, 4.8e12, 989.4, "9.0")}
  for name, (gib, bandwidth, bf16, cc) in expect.items():
    g = gpus[name]
    assert (g.memory_bytes, g.bandwidth, g.peak_tflops["bfloat16"], g.compute_capability) == (
        gib * GiB, bandwidth, bf16, cc)
    assert g.peak_tflops["float32"] < g.peak_tflops["bfloat16"]
  assert gpus["4090"].device_kind == "NVIDIA GeForce RTX 4090"
  assert re.search(r"core_count: 128\b", gpus["4090"].target_config)
  for g in gpus.values():
    in_device_info = False
    for line in g.target_config.splitlines():
      in_device_info = in_device_info or line.startswith("gpu_device_info")
      if re.match(r"\s+\w+\s*:\s*[\d.]+", line) and in_device_info:
        assert "# [" in line, (g.target_file, line)   # a number without its source
  table = (gpu_topology.TARGETS_DIR / "gpus.csv").read_text()
  for source in ("Ada GPU Architecture whitepaper", "L40S datasheet", "A100 datasheet",
                 "H100 datasheet", "H200 datasheet"):
    assert source in table


def test_gpu_memory_fraction_is_what_jax_reads():
  assert targets.gpu_memory_fraction({}) == 0.75
  assert targets.gpu_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.9
  assert targets.gpu_memory_fraction({"XLA_CLIENT_MEM_FRACTION": "0.5",
                                      "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.5
  t = targets.parse("4x4090", memory_fraction=0.5)
  assert t.usable_bytes == 12 * GiB
  with pytest.raises(ValueError, match="fraction"):
    targets.parse("4x4090", memory_fraction=1.5)


@pytest.mark.slow
def test_bad_gpu_topology_exits_2_naming_the_known_ones(tmp_path):
  proc, report = preflight_cli(tmp_path, "--topology=4x9090", timeout=300)
  assert proc.returncode == 2 and report is None, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "unknown GPU topology '4x9090'" in lines[0]
  assert "4090, l40s, a100-40gb, a100-80gb, h100, h200" in lines[0]


@pytest.mark.slow
def test_without_the_extra_one_line_and_exit_2(tmp_path):
  """A Python that cannot find JAX's CUDA plugin (a shadowing stub of importlib's finder)."""
  proc = run_without_module('jax_plugins.xla_cuda12', ["-m", "fcdm_jax.preflight", f"--config={TINY}",
                                               "--topology=4x4090"], tmp_path, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip() == ("error: compiling for a GPU needs JAX's CUDA plugin "
                                 "(jax-cuda12-plugin), which is not installed: "
                                 'pip install -e ".[gpu]"')


# ----------------------------------------------------------------------------- compiled


@needs_gpu_extra
def test_every_target_file_is_a_gpu_target_xla_reads():
  """Each .txtpb parses as XLA's GpuTargetConfigProto and names the device it describes."""
  for g in gpu_topology.GPUS.values():
    devices = gpu_topology.abstract_devices(gpu_topology.parse(f"1x{g.name}"))
    assert [d.device_kind for d in devices] == [g.device_kind]
    assert devices[0].platform == "gpu"


@needs_gpu_extra
@pytest.mark.slow
def test_tiny_config_on_4x4090(tmp_path):
  """Train step, guided sampling forward and preview sampler, compiled for 4 RTX 4090s."""
  proc, report = preflight_cli(tmp_path, "--topology=4x4090", "--batch=16", "--sample_batch=6",
                               "--config.model.dtype=bfloat16",
                               "--config.preview.every_steps=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FITS" in proc.stdout and "roofline bound (derived, not measured)" in proc.stdout
  assert "of 18.00 GiB usable (24.00 GiB x 0.75" in proc.stdout
  topo, chip = report["topology"], report["chip"]
  assert (topo["chips"], topo["hosts"], topo["device_kind"], topo["kind"]) == (
      4, 1, "NVIDIA GeForce RTX 4090", "gpu")
  assert chip["hbm_bytes"] == 24 * GiB and chip["usable_bytes"] == 18 * GiB
  assert (chip["peak_tflops"], chip["hbm_bandwidth"]) == (165.2, 1008e9)
  assert report["mesh"] == {"data": 4, "fsdp": 1} and report["fits"] is True
  assert report["dwconv_impl"] == "xla"   # the config's own (tiny sets it)
  progs = report["programs"]
  for name in ("train", "sample", "preview"):
    r = progs[name]
    m = r["memory"]
    assert r["compiled"] and r["fits"]
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["code"] > 0
    resident = m["total"] if name != "preview" else m["with_train_state"]
    assert r["margin_bytes"] == 18 * GiB - resident
  assert progs["train"]["memory"]["alias"] > 0   # the state is donated
  macs = report["forward_gmacs_per_image"] * 1e9
  for name, factor, images in (("train", 6, 16), ("sample", 2, 16)):
    pc, rf = progs[name]["per_chip"], progs[name]["roofline"]
    assert pc["model_flops"] == pytest.approx(factor * macs * images / 4)
    assert pc["flops"] == pytest.approx(pc["cpu_lowered_flops"]["unrolled"] / 4)
    # The nominal 6 (2) x MACs per image counts the input latents' gradient, which the
    # step does not compute: with hidden size 8 the first and last convolutions are a
    # tenth of the work (the TPU test's deeper model comes within 5%).
    assert pc["flops"] >= 0.85 * pc["model_flops"]
    # The GPU program's own counts (its optimized module, loops once) are there too.
    assert pc["bytes_accessed"] > 0 and pc["compiled_flops_loops_once"] > 0
    assert rf["compute_s"] == pytest.approx(pc["flops"] / 165.2e12)
    assert rf["memory_s"] == pytest.approx(pc["bytes_accessed"] / 1008e9)
    assert rf["step_s_bound"] == max(rf["compute_s"], rf["memory_s"])


@needs_gpu_extra
@pytest.mark.slow
def test_huge_batch_on_4x4090_does_not_fit(tmp_path):
  """The GPU compiler plans it without complaint; the preflight says it does not fit."""
  proc, report = preflight_cli(tmp_path, "--topology=4x4090", "--batch=4194304",
                               "--programs=train")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "DOES NOT FIT" in proc.stdout
  train = report["programs"]["train"]
  assert report["fits"] is False and train["compiled"] and train["fits"] is False
  assert train["memory"]["total"] > 18 * GiB and train["margin_bytes"] < 0


@needs_gpu_extra
@pytest.mark.slow
def test_fit_overrides_fit(tmp_path):
  """With GPUs made small (a memory fraction of 13.5 MiB), the full micro-batch does not fit
  and --fit picks accumulation; its printed overrides, fed back, fit."""
  small = "--memory_fraction=0.00055"
  proc, result = preflight_cli(tmp_path, "--topology=4x4090", "--batch=1024", "--fit",
                               "--remats=none", small, name="fit.json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "candidates compared" in proc.stdout
  choice, candidates = result["choice"], result["candidates"]
  assert candidates[0]["grad_accum_steps"] == 1 and not candidates[0]["fits"]
  assert choice["remat"] == "none" and choice["grad_accum_steps"] > 1 and choice["fits"]
  assert choice["memory_bytes"] <= 0.9 * result["usable_bytes"]
  line = [s for s in proc.stdout.splitlines() if s.startswith("overrides: ")][-1]
  overrides = shlex.split(line.removeprefix("overrides: "))
  assert overrides == ["--config.batch_size=1024",
                       f"--config.grad_accum_steps={choice['grad_accum_steps']}",
                       "--config.model.remat=none"]
  proc, report = preflight_cli(tmp_path, "--topology=4x4090", "--programs=train", small,
                               *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["fits"] and report["grad_accum_steps"] == choice["grad_accum_steps"]
  train = report["programs"]["train"]
  assert train["memory"]["total"] == choice["memory_bytes"]
  # The micro-batch loop's bytes counted through: A - 1 more passes of its body (the
  # compiled count less two passes over the state), what --fit ranked the candidates by.
  pc, accum = train["per_chip"], choice["grad_accum_steps"]
  body = pc["bytes_accessed_loops_once"] - 2 * train["memory"]["argument"]
  assert pc["micro_batch_loop_estimated"] and body > 0
  assert pc["bytes_accessed"] == pytest.approx(pc["bytes_accessed_loops_once"]
                                               + (accum - 1) * body)
  assert train["roofline"]["memory_s"] == pytest.approx(pc["bytes_accessed"] / 1008e9)
