"""`python -m fcdm_jax.main` with every step slowed by STEP_DELAY seconds, process
START_DELAY_PROCESS reaching its first step START_DELAY seconds after the others (as a
slower compile would) and process END_DELAY_PROCESS reaching the command's end END_DELAY
seconds after the others.

The crash tests need a run that is still going when they signal it; the tiny test model
trains too fast for that. Only the test process is slowed; the code under test is the same.
It also counts the cross-host collectives issued by the loop's preemption checks and prints
the count at exit.
"""

import atexit
import os
import time

import jax
from jax.experimental import multihost_utils

from fcdm_jax import cli, main
from fcdm_jax import sharding
from fcdm_jax.train import loop, step

_delay = float(os.environ.get("STEP_DELAY", "0.5"))
_global_batch = sharding.global_batch


def _slow_global_batch(*args, **kwargs):
  time.sleep(_delay)
  return _global_batch(*args, **kwargs)


sharding.global_batch = _slow_global_batch

# Count the cross-host collectives issued while the loop decides whether to stop.
_stop_checks = {"steps": 0, "collectives": 0, "inside": False}


def _counting(collective):
  def counted(*args, **kwargs):
    if _stop_checks["inside"]:
      _stop_checks["collectives"] += 1
    return collective(*args, **kwargs)
  return counted


for _name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
  setattr(multihost_utils, _name, _counting(getattr(multihost_utils, _name)))
_should_stop = loop.PreemptionFlag.should_stop


def _counted_should_stop(self, step):
  _stop_checks["steps"] += 1
  _stop_checks["inside"] = True
  try:
    return _should_stop(self, step)
  finally:
    _stop_checks["inside"] = False


loop.PreemptionFlag.should_stop = _counted_should_stop
atexit.register(lambda: print("preemption checks: {steps} steps, {collectives} cross-host "
                              "collectives".format(**_stop_checks), flush=True))

_end_delay = float(os.environ.get("END_DELAY", "0"))
_end_delay_process = int(os.environ.get("END_DELAY_PROCESS", "-1"))


_start_delay = float(os.environ.get("START_DELAY", "0"))
_start_delay_process = int(os.environ.get("START_DELAY_PROCESS", "-1"))
_train_step_call = step.JittedTrainStep.__call__
_started = []


def _late_first_step(self, state, batch):
  if not _started and jax.process_index() == _start_delay_process:
    time.sleep(_start_delay)
  _started.append(True)
  return _train_step_call(self, state, batch)


step.JittedTrainStep.__call__ = _late_first_step


def _late_main(argv):
  status = main.main(argv)
  if jax.process_index() == _end_delay_process:
    time.sleep(_end_delay)
  return status


if __name__ == "__main__":
  cli.run(_late_main)
