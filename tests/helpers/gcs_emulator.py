"""A Google Cloud Storage emulator on 127.0.0.1 for the tests (the `gcp-storage-emulator`
package), and the environment that points every client at it.

gcsfs (behind etils.epath and so behind `fcdm_jax.fileio`) reads `STORAGE_EMULATOR_HOST`;
tensorstore (behind orbax's array files) reads `TENSORSTORE_GCS_HTTP_URL` and, with
`GOOGLE_AUTH_TOKEN_FOR_TESTING`, asks for no credentials. TensorFlow's own GCS client has
no emulator setting; nothing in fcdm_jax writes a URL through it (TensorBoard events of a
remote workdir are uploaded through fileio, see `train/events.py`).

One fix to the emulator: real GCS sends an object's generation with its bytes
(`x-goog-generation`), and tensorstore's conditional writes (orbax's OCDBT manifests)
depend on it; the emulator's media download omits it. `python tests/helpers/gcs_emulator.py`
serves the emulator with that header added.
"""

from __future__ import annotations

import os
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
          "EPATH_USE_TF": "false",
          # gcsfs's zonal-bucket probe needs Google credentials the emulator does not have.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class Emulator:
  """The emulator as a child process; `bucket` exists when `start` returns."""

  def __init__(self, data_dir: str, bucket: str = "bucket"):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.bucket = bucket
    self.data_dir = data_dir
    self.process = None

  def start(self, timeout: float = 60.0) -> "Emulator":
    cmd = [sys.executable, os.path.abspath(__file__), self.data_dir, str(self.port),
           self.bucket]
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


def _serve(data_dir: str, port: int, bucket: str) -> None:
  """The emulator on 127.0.0.1:`port`, media downloads carrying the object's generation."""
  import logging
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the 404 is already set
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  objects.download = download_with_generation   # objects.get(alt=media) calls it too
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is download:
        methods[method] = download_with_generation
  server.create_server("127.0.0.1", port, in_memory=False, default_bucket=bucket,
                       data_dir=data_dir).run()


if __name__ == "__main__":
  _serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
