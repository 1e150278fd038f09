"""Launch scripts (launch/): shellcheck-clean, and their dry runs issue the right commands.

The dry runs need neither gcloud, GPUs nor SLURM: each script prints its commands
instead of running them, after the same argument checks a real run does.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from fcdm_jax import gpu_topology

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
REPO = LAUNCH.parent
SCRIPTS = ["tpu_pod.sh", "gpu_single_node.sh", "slurm_multinode.sbatch", "gpu_bench.sh"]
# A word each script's --help must explain: where its output goes.
HELP_WORD = {"gpu_bench.sh": "--OUT=DIR"}


def run(script, *args, env=None):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
  full_env.update(env or {})
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  result = subprocess.run(["shellcheck", "--shell=bash", str(LAUNCH / script)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_syntax(script):
  assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
  result = run(script, "--help")
  assert result.returncode == 0, result.stderr
  assert HELP_WORD.get(script, "WORKDIR") in result.stdout.upper()


def test_tpu_pod_dry_run_creates_installs_runs_everywhere_and_deletes():
  result = run("tpu_pod.sh", "--project=proj", "--zone=us-east5-a", "--accelerator=v5p-64",
               "--name=pod1", "--config=configs/xl_512.py", "--workdir=gs://bucket/xl",
               "--spot", "--", "--config.batch_size=512", env={"DRY_RUN": "1"})
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines() if l.startswith("+ ")]
  # First the preflight, for the accelerator and config, with the --config.* overrides.
  assert lines[0] == ("+ python3 -m fcdm_jax.preflight --config=configs/xl_512.py "
                      "--topology=v5p-64 --config.batch_size=512")
  assert "tpu-vm create pod1 --project=proj --zone=us-east5-a --accelerator-type=v5p-64" \
      in lines[1] and lines[1].endswith("--spot")
  assert any(" scp " in l and "--worker=all" in l for l in lines)
  # The workers install the tpu extra: the jax and libtpu the preflight compiled with.
  assert any("pip\\ install\\ -q\\ -e\\ \\\"\\$HOME/fcdm_jax\\[tpu\\]" in l for l in lines)
  train = [l for l in lines if "fcdm_jax.main" in l]
  assert len(train) == 1 and "--worker=all" in train[0]
  for flag in ("--config=configs/xl_512.py", "--workdir=gs://bucket/xl",
               "--config.distributed=True", "--config.batch_size=512"):
    assert flag in train[0]
  assert "tpu-vm delete pod1" in lines[-1]  # always last, also after a failure
  kept = run("tpu_pod.sh", "--project=p", "--workdir=gs://b/r", "--keep",
             "--code=https://example.com/fcdm_jax.git", "--ref=v1", env={"DRY_RUN": "1"})
  assert kept.returncode == 0 and " delete " not in kept.stdout
  assert "git\\ clone\\ --depth=1\\ --branch=v1" in kept.stdout
  skipped = run("tpu_pod.sh", "--project=p", "--workdir=gs://b/r", "--skip-preflight",
                env={"DRY_RUN": "1"})
  assert skipped.returncode == 0 and "fcdm_jax.preflight" not in skipped.stdout
  assert "tpu-vm create" in skipped.stdout.splitlines()[0]


def fake_python(tmp_path, status, text):
  """A `python3` whose `-m fcdm_jax.preflight` prints `text` and exits with `status`."""
  script = tmp_path / "python3"
  script.write_text(f"#!/usr/bin/env bash\necho {text!r}\nexit {status}\n")
  script.chmod(0o755)
  return str(script)


@pytest.mark.parametrize("status, message", [
    (1, "configs/xl_256.py does not fit on v5e-8 (preflight figures above)"),
    (2, "the preflight could not run (exit 2"),
])
def test_tpu_pod_stops_before_creating_when_the_preflight_refuses(tmp_path, status, message):
  """No dry run: a refusing preflight stops the script before gcloud is called (a gcloud
  on PATH that records its calls shows it never ran), its output shown."""
  calls = tmp_path / "gcloud_calls"
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir()
  gcloud.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
  gcloud.chmod(0o755)
  env = {"PYTHON": fake_python(tmp_path, status, "[train] total 20.1 GiB of 16.0 GiB HBM"),
         "PATH": f"{gcloud.parent}{os.pathsep}{os.environ['PATH']}"}
  result = run("tpu_pod.sh", "--project=p", "--workdir=gs://b/r", "--accelerator=v5e-8",
               "--reuse", env=env)
  assert result.returncode == 2 and message in result.stderr
  assert "20.1 GiB of 16.0 GiB" in result.stdout
  assert not calls.exists()  # nothing created, and the reused VM was not deleted


@pytest.mark.parametrize("args, message", [
    (["--project=p"], "--workdir is required"),
    (["--project=p", "--workdir=/local/dir"], "must be on GCS"),
    (["--project=p", "--workdir=gs://b/r", "--config=configs/none.py"], "not found"),
    (["--bogus"], "unknown argument: --bogus"),
])
def test_tpu_pod_rejects_bad_arguments(args, message):
  result = run("tpu_pod.sh", *args, env={"DRY_RUN": "1"})
  assert result.returncode == 2 and message in result.stderr
  assert "gcloud" not in result.stdout  # nothing was started


def test_gpu_single_node_dry_run():
  result = run("gpu_single_node.sh", "--dry-run", "--workdir=/tmp/run", "--gpus=0,1",
               "--", "--config.seed=3")
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == ("+ python3 -m fcdm_jax.main --config=configs/xl_256.py "
                                   "--workdir=/tmp/run --config.seed=3")
  assert run("gpu_single_node.sh", "--dry-run").returncode == 2


def test_gpu_single_node_dry_run_with_accumulation_shows_the_preflight_first():
  result = run("gpu_single_node.sh", "--dry-run", "--workdir=/tmp/run", "--gpus=0,1,2,3",
               "--gpu-type=4090", "--accum=4", "--", "--config.seed=3", "--verbose_errors")
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      "+ python3 -m fcdm_jax.preflight --config=configs/xl_256.py --topology=4x4090 "
      "--programs=train --config.grad_accum_steps=4 --config.seed=3",
      "+ python3 -m fcdm_jax.main --config=configs/xl_256.py --workdir=/tmp/run "
      "--config.grad_accum_steps=4 --config.seed=3 --verbose_errors"]
  skipped = run("gpu_single_node.sh", "--dry-run", "--workdir=/tmp/run", "--gpus=0,1",
                "--gpu-type=4090", "--skip-preflight")
  assert skipped.returncode == 0 and "fcdm_jax.preflight" not in skipped.stdout
  bad = run("gpu_single_node.sh", "--dry-run", "--workdir=/tmp/run", "--accum=0")
  assert bad.returncode == 2 and "--accum must be a positive integer" in bad.stderr


@pytest.mark.parametrize("status, message", [
    (1, "configs/xl_256.py does not fit on 2x4090 (preflight figures above)"),
    (2, "the preflight could not run (exit 2"),
])
def test_gpu_single_node_stops_before_training_when_the_preflight_refuses(tmp_path, status,
                                                                        message):
  """No dry run: the GPU model comes from nvidia-smi, the preflight compiles for it, and a
  refusal stops the script before training (the fake python records every call)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  smi = bin_dir / "nvidia-smi"
  # The second GPU's line comes late, after a reader taking the first may have gone: the
  # script must not die of SIGPIPE under pipefail (it did, under load, with `head -n 1`).
  smi.write_text("#!/usr/bin/env bash\n"
                 "if [[ \"$*\" == *name,* ]]; then echo '0, NVIDIA GeForce RTX 4090, 24564 MiB'\n"
                 "else echo 'NVIDIA GeForce RTX 4090'; sleep 0.3; "
                 "echo 'NVIDIA GeForce RTX 4090'; fi\n")
  smi.chmod(0o755)
  calls = tmp_path / "python_calls"
  python = tmp_path / "python3"
  python.write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                    f"echo '[train] total 30.1 GiB of 18.0 GiB usable'\nexit {status}\n")
  python.chmod(0o755)
  env = {"PYTHON": str(python), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  result = run("gpu_single_node.sh", "--workdir=/tmp/run", env=env)
  assert result.returncode == 2 and message in result.stderr
  assert "30.1 GiB of 18.0 GiB" in result.stdout
  called = calls.read_text().splitlines()
  assert called == ["-m fcdm_jax.preflight --config=configs/xl_256.py --topology=2x4090 "
                    "--programs=train"]   # and fcdm_jax.main never ran


def test_slurm_sets_jax_device_ids_per_layout():
  env = {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "4", "WORKDIR": "/shared/run",
         "DRY_RUN": "1"}
  per_node = run("slurm_multinode.sbatch", "--config.seed=1", env=env)
  assert per_node.returncode == 0, per_node.stderr
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in per_node.stdout
  srun = [l for l in per_node.stdout.splitlines() if l.startswith("+ srun")]
  assert len(srun) == 1 and "--config.distributed=True --config.seed=1" in srun[0]
  per_gpu = run("slurm_multinode.sbatch", env={**env, "SLURM_NTASKS_PER_NODE": "4"})
  assert per_gpu.returncode == 0 and "one process per GPU" in per_gpu.stdout
  bad = run("slurm_multinode.sbatch", env={**env, "SLURM_NTASKS_PER_NODE": "3"})
  assert bad.returncode == 2 and "use 1 (per node) or 4 (per GPU)" in bad.stderr
  outside = run("slurm_multinode.sbatch", env={"WORKDIR": "/shared/run"})
  assert outside.returncode == 2 and "submit it with sbatch" in outside.stderr


def test_slurm_takes_the_accumulation_and_preflights_the_job_gpus():
  env = {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NUM_NODES": "2",
         "WORKDIR": "/shared/run", "DRY_RUN": "1", "GPU_TYPE": "h100", "GRAD_ACCUM_STEPS": "2"}
  result = run("slurm_multinode.sbatch", "--config.seed=1", env=env)
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines() if l.startswith("+ ")]
  assert lines[0] == ("+ python3 -m fcdm_jax.preflight --config=configs/xl_256.py "
                      "--topology=2x8xh100 --programs=train --config.grad_accum_steps=2 "
                      "--config.seed=1")
  assert lines[1].startswith("+ srun") and lines[1].endswith(
      "--config.distributed=True --config.grad_accum_steps=2 --config.seed=1")
  skipped = run("slurm_multinode.sbatch", env={**env, "SKIP_PREFLIGHT": "1"})
  assert skipped.returncode == 0 and "fcdm_jax.preflight" not in skipped.stdout


def test_gpu_bench_dry_run_lists_every_run():
  result = run("gpu_bench.sh", "--dry-run", "--out=/tmp/b", "--", "--repeats=10")
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines() if l.startswith("+ ")]
  assert len(lines) == 5 and all("--config=configs/xl_256.py --batch=32 --dtype=bf16" in l
                                 and l.endswith("--repeats=10") for l in lines)
  assert "--mode=both --remat=block --vs-torch --json=/tmp/b/vs_torch.json" in lines[0]
  assert [l.split("--dwconv_impl=")[1].split()[0] for l in lines[1:4]] == \
      ["xla", "shift", "shift_vjp"]
  assert "--mode=dwconv --json=/tmp/b/dwconv_study.json" in lines[4]
  with_plan = run("gpu_bench.sh", "--dry-run", "--out=/tmp/b", "--batch=256", "--topology=1xh200")
  lines = [l for l in with_plan.stdout.splitlines() if l.startswith("+ ")]
  assert len(lines) == 6 and "-m fcdm_jax.preflight --config=configs/xl_256.py" in lines[0]
  assert ("--topology=1xh200 --batch=256 --programs=train --config.model.dtype=bfloat16 "
          "--config.model.remat=block --json=/tmp/b/preflight.json") in lines[0]
  assert "--vs-torch --preflight_json=/tmp/b/preflight.json" in lines[1]
  assert "--preflight_json" not in " ".join(lines[2:])
  assert run("gpu_bench.sh", "--dry-run", "--batch=0").returncode == 2
  assert run("gpu_bench.sh", "--dry-run", "--dtype=fp16").returncode == 2
  assert run("gpu_bench.sh", "--dry-run", "--impls=xla,conv").returncode == 2


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_a_tiny_config(tmp_path):
  """No GPU here: the same script on the CPU with a tiny config (one formulation's training
  run of the three; the dry run above checks that all three are there by default)."""
  out = tmp_path / "bench"
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHON": sys.executable}
  # With the gpu extra (CI installs it), the deviceless plan for an H200 comes first and the
  # CPU's plan is printed beside it.
  gpu_plan = gpu_topology.missing_packages() is None
  if gpu_plan:
    env["TOPOLOGY"] = "1xh200"
  result = subprocess.run(
      ["bash", str(LAUNCH / "gpu_bench.sh"), "--config=tests/configs/tiny.py", "--batch=2",
       "--remat=none", "--dtype=fp32", "--impls=shift_vjp", f"--out={out}", "--", "--repeats=1", "--warmup=1",
       "--count_flops=false"], cwd=REPO,
      env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  machine = (out / "machine.txt").read_text()
  assert "commit: " in machine and "jax " in machine and "torch " in machine
  vs = json.loads((out / "vs_torch.json").read_text())
  assert vs["batch"] == 2 and vs["machine"]["num_devices"] == 1
  for mode in ("train", "sample"):
    assert vs["results"][mode]["speedup_vs_torch"] > 0
  if gpu_plan:
    assert vs["vs_preflight"]["preflight"]["target"] == "NVIDIA H200"
    assert vs["vs_preflight"]["parts"]["argument"]["ratio"] == 1.0
    assert "memory plan of train: preflight for NVIDIA H200" in result.stdout
  r = json.loads((out / "train_dwconv_shift_vjp.json").read_text())
  assert r["dwconv_impl_resolved"] == "shift_vjp" and r["results"]["train"]["step_s"]["median"] > 0
  assert "sample" not in r["results"] and not (out / "train_dwconv_xla.json").exists()
  study = json.loads((out / "dwconv_study.json").read_text())
  assert len(study["levels"]) == 3 and "shift_vjp" in study["levels"][0]
  for name in ("vs_torch", "train_dwconv_shift_vjp", "dwconv_study"):
    assert (out / f"{name}.log").exists()
