"""A Google Cloud Storage emulator on 127.0.0.1 for the tests (the `gcp-storage-emulator`
package), and the environment that points every client at it.

gcsfs (behind etils.epath and so behind `fcdm_jax.fileio`) reads `STORAGE_EMULATOR_HOST`;
tensorstore (behind orbax's array files) reads `TENSORSTORE_GCS_HTTP_URL` and, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING`, asks for no credentials. TensorFlow's own GCS client has
no emulator setting; nothing in fcdm_jax writes a URL through it (TensorBoard events of a
remote workdir are uploaded through fileio, see `train/events.py`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """The variables that send gcsfs, epath and tensorstore to the emulator at `url`."""
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test",
          "EPATH_USE_TF": "false"}


class Emulator:
  """The emulator as a child process; `bucket` exists when `start` returns."""

  def __init__(self, data_dir: str, bucket: str = "bucket"):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.bucket = bucket
    self.data_dir = data_dir
    self.process = None

  def start(self, timeout: float = 60.0) -> "Emulator":
    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable))
    cmd = ([exe] if exe else [sys.executable, "-m", "gcp_storage_emulator"])
    cmd += ["--data-dir", self.data_dir, "start", "--host=127.0.0.1", f"--port={self.port}",
            f"--default-bucket={self.bucket}", "--quiet"]
    self.log = open(os.path.join(self.data_dir, "..", "emulator.log"), "wb")
    self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited with {self.process.returncode}: {cmd}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=2):
          return self
      except OSError:
        time.sleep(0.2)
    self.stop()
    raise RuntimeError(f"the GCS emulator did not answer on {self.url} in {timeout} s")

  def stop(self) -> None:
    if self.process is not None and self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(10)
      except subprocess.TimeoutExpired:
        self.process.kill()
    if getattr(self, "log", None):
      self.log.close()
