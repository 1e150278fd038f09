"""Benchmark FCDM training steps and sampling forwards, optionally side by side with PyTorch.

  python -m fcdm_jax.bench --config=configs/s_256.py --batch=8 --mode=both --vs-torch

Measured the same way every time: compile seconds (trace + lower + XLA compile), warm-up
steps, then `--repeats` timed steps (median, min and max), images/s, peak memory, FLOPs
and MFU. The training step is the real one (`fcdm_jax.train.step`: objective loss,
AdamW, EMA) on a state with the training layout and shardings (`state_layout`), filled
with random values on the host: compiling the random initialiser would only add minutes.

FLOPs, two ways:
  model FLOPs  = 2 x MACs per forward x batch (sample) or 3 x 2 x MACs x batch (train),
                 MACs from XLA per convolution/matmul (`fcdm_jax.flops`, the paper's count).
                 MFU uses these.
  XLA FLOPs    = XLA's cost analysis of the whole step, elementwise ops, recomputation
                 (remat) and the optimizer included. XLA counts the body of a scanned
                 (while) loop once, so it is taken from the step lowered with the block
                 scans unrolled (lowering only: nothing extra is compiled).

`--vs-torch` runs the published-structure PyTorch module (`fcdm_jax.torch_fcdm`) at the
same batch, precision (bf16 = autocast) and remat (any remat other than 'none' = the
published per-block checkpointing), alternating one JAX step and one PyTorch step so that
both see the same machine load, and prints JAX speed / PyTorch speed. PyTorch runs the
whole batch on one device: compare chips with `--num_devices=1`.

On a shared machine, pin the process (`taskset -c 1 python -m fcdm_jax.bench ...`): both
frameworks then get the same core, and OpenMP's synchronisation does not collapse when
another process takes a core (docs/performance.md). Each step also records how busy
other processes kept the machine, and ratios over quiet steps are reported.

`--mode=input` times the host side of the data sources instead (`input.py`): examples/s
per host at the run's batch and the cores used, for the config's data or synthetic
datasets of every kind, with grain's reader beside ours on the latent shards.

Layout: `report.run` (one benchmark and its table), `input.run_input`, `jax_side.JaxBench`, `torch_side.TorchBench`,
`measure` (timing, memory, FLOPs), `machine` (peaks, load), `dwconv_study`, `__main__` (CLI).
"""

from fcdm_jax.bench.dwconv_study import STUDY_IMPLS, dwconv_study
from fcdm_jax.bench.input import run_input
from fcdm_jax.bench.jax_side import JaxBench
from fcdm_jax.bench.machine import PEAK_TFLOPS, chip_peak_tflops, cpu_peak, machine_info
from fcdm_jax.bench.measure import QUIET, jax_memory, lowered_flops, summarize, xla_memory
from fcdm_jax.bench.report import DTYPES, MODES, apply_overrides, format_report, run
from fcdm_jax.bench.torch_side import TorchBench

__all__ = ["DTYPES", "JaxBench", "MODES", "PEAK_TFLOPS", "QUIET", "STUDY_IMPLS", "TorchBench",
           "apply_overrides", "chip_peak_tflops", "cpu_peak", "dwconv_study", "format_report",
           "jax_memory", "lowered_flops", "machine_info", "run", "run_input", "summarize",
           "xla_memory"]
