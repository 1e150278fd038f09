"""The preflight's memory plan beside a benchmark's (`fcdm_jax.perf.plan_check`, the
bench's --preflight_json): parts and ratios, the tolerance verdict, refusal of reports of
different programs, and the command line on this CPU against a GPU preflight of the tiny
config (the gpu extra, which CI installs)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers.gpu_preflight import TINY, needs_gpu_extra, preflight_cli

from fcdm_jax.perf import plan_check

REPO = pathlib.Path(__file__).resolve().parents[1]
GiB = 2**30


def plan(argument, temp, output=None, alias=None, code=0):
  output = argument if output is None else output
  alias = argument if alias is None else alias
  planned = argument + output + temp - alias
  return dict(argument=argument, output=output, alias=alias, temp=temp, code=code,
              planned=planned, total=planned + code)


def reports(pre_temp, dev_temp, **bench_settings):
  settings = dict(config="fcdm_xl_256_ddpm", batch=256, grad_accum_steps=1,
                  dtype="bfloat16", remat="block")
  preflight = dict(settings, jax="0.10.2", topology=dict(name="1xh200",
                                                         device_kind="NVIDIA H200"),
                   programs=dict(train=dict(memory=plan(10 * GiB, pre_temp))))
  bench = dict(settings, machine=dict(device_kind="NVIDIA H200", jax="0.11.2"),
               results=dict(train=dict(memory=dict(
                   peak_bytes=int(11 * GiB + dev_temp), source="device memory_stats",
                   xla_plan=plan(10 * GiB, dev_temp)))))
  bench.update(bench_settings)
  return preflight, bench


def test_parts_ratios_and_the_verdict():
  c = plan_check.compare(*reports(20 * GiB, 21 * GiB))
  assert c["parts"]["argument"]["ratio"] == 1.0
  assert c["parts"]["temp"]["ratio"] == pytest.approx(21 / 20)
  assert c["parts"]["total"]["preflight"] == 30 * GiB
  assert c["parts"]["total"]["ratio"] == pytest.approx(31 / 30)
  assert c["within_tolerance"] is True
  assert c["peak_vs_preflight_total"] == pytest.approx(32 / 30)
  text = plan_check.format_comparison(c)
  assert "agree within 10%" in text and "NVIDIA H200" in text
  far = plan_check.compare(*reports(20 * GiB, 30 * GiB))
  assert far["parts"]["total"]["ratio"] == pytest.approx(40 / 30)
  assert far["within_tolerance"] is False
  assert "DO NOT agree" in plan_check.format_comparison(far)


@pytest.mark.parametrize("setting, value", [("batch", 128), ("remat", "none"),
                                            ("dtype", "float32"), ("grad_accum_steps", 4),
                                            ("config", "fcdm_l_256_ddpm")])
def test_reports_of_different_programs_are_refused(setting, value):
  with pytest.raises(ValueError, match=f"another program: {setting}"):
    plan_check.compare(*reports(GiB, GiB, **{setting: value}))


def test_a_report_without_the_program_is_refused():
  preflight, bench = reports(GiB, GiB)
  del bench["results"]["train"]
  with pytest.raises(ValueError, match="benchmark report has no XLA plan of 'train'"):
    plan_check.compare(preflight, bench)
  preflight["programs"] = {}
  with pytest.raises(ValueError, match="preflight report has no memory plan"):
    plan_check.compare(preflight, bench)


def bench_cli(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "fcdm_jax.bench", f"--config={TINY}", *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@needs_gpu_extra
@pytest.mark.slow
def test_bench_compares_its_plan_with_a_gpu_preflight(tmp_path):
  """The tiny step planned for an H200 without one, then benchmarked on this CPU with that
  report: the state and batch (arguments) are the same bytes on both backends; a report
  of another batch is refused before anything is compiled."""
  proc, pre = preflight_cli(tmp_path, "--topology=1xh200", "--programs=train", "--batch=8",
                            "--config.model.dtype=bfloat16", name="pre.json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "bench.json"
  proc = bench_cli("--mode=train", "--batch=8", "--dtype=bf16", "--repeats=1", "--warmup=0",
                   f"--preflight_json={tmp_path / 'pre.json'}", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  c = json.loads(out.read_text())["vs_preflight"]
  assert c["preflight"]["target"] == "NVIDIA H200" and c["device"]["kind"] != "NVIDIA H200"
  assert c["parts"]["argument"]["preflight"] == pre["programs"]["train"]["memory"]["argument"]
  assert c["parts"]["argument"]["ratio"] == 1.0
  assert "memory plan of train: preflight for NVIDIA H200" in proc.stdout
  bad = bench_cli("--mode=train", "--batch=16", f"--preflight_json={tmp_path / 'pre.json'}")
  assert bad.returncode == 1
  assert "another program: batch 8 (preflight) vs 16 (benchmark)" in bad.stderr
  assert "compiled in" not in bad.stdout + bad.stderr


def test_bench_refuses_a_preflight_report_without_the_training_step(tmp_path):
  pre = tmp_path / "pre.json"
  pre.write_text(json.dumps(dict(programs=dict(sample=dict(memory=plan(1, 1))))))
  proc = bench_cli("--mode=train", f"--preflight_json={pre}", timeout=300)
  assert proc.returncode == 1
  assert "no memory plan of the training step" in proc.stderr
  proc = bench_cli("--mode=sample", f"--preflight_json={pre}", timeout=300)
  assert proc.returncode == 1 and "needs --mode=train or both" in proc.stderr
