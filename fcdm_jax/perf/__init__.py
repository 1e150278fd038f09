"""Performance measurement: what the benchmark and the preflight commands compute.

  machine        the machine's facts: vendor peak FLOP/s per chip, the CPU's estimated peak,
                 load and other processes' busy time, peak memory
  measure        timing with the other processes' load, summaries, XLA's memory plan and
                 FLOP count
  jax_bench      the programs of `fcdm_jax.programs` compiled and stepped on host-filled inputs
  torch_bench    the published-structure PyTorch module's step and forward (`--vs-torch`)
  benchmark      one benchmark of a config (`run`) and its report
  input_bench    the host side of the data sources: examples/s per host
  dwconv_study   the depthwise conv formulations at a config's level shapes
  targets        what the preflight compiles for: TPU slices and GPUs by name (their facts)
  preflight_run  the run's programs compiled for a TPU slice or GPUs: fits or not, roofline bound
  fit            the preflight's --fit: the fastest (remat, accumulation) that fits
  table_rows     what the preflight tables share: rows saved as they finish, one process each
  tpu_table      the TPU preflight table of docs/performance.md and the defaults chosen from it
  gpu_table      the GPU preflight table: per config and GPU node, the fastest layout that fits

Nothing here imports a command module (`fcdm_jax.bench`, `preflight`, `preflight_table`).
"""
