"""The path layer against a local folder and the GCS emulator alike."""

import numpy as np
import pytest

from fcdm_jax import fileio


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs")("fileio")


def test_urls_keep_their_scheme():
  assert fileio.join("gs://b/x", "y", "z.npy") == "gs://b/x/y/z.npy"
  assert fileio.is_remote("gs://b/x") and not fileio.is_remote("/tmp/x")
  assert fileio.absolute("gs://b/x") == "gs://b/x"
  with pytest.raises(ValueError, match="unsupported URL scheme"):
    fileio.path("ftp://host/x")
  with pytest.raises(ValueError, match="empty path"):
    fileio.path("")


def test_write_read_list_move(root):
  target = fileio.join(root, "a", "b.bin")
  fileio.atomic_write_bytes(target, b"one")
  assert fileio.read_bytes(target) == b"one"
  fileio.atomic_write_bytes(target, b"two")           # replaced whole
  assert fileio.read_bytes(target) == b"two"
  assert fileio.listdir(fileio.join(root, "a")) == ["b.bin"]  # no temporary left behind
  with fileio.open_read(target) as f:
    f.seek(1)
    assert f.read(2) == b"wo"
  with fileio.local_file(target) as local:
    assert open(local, "rb").read() == b"two"
  img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  fileio.write_png(fileio.join(root, "a", "img.png"), img)
  fileio.makedirs(fileio.join(root, "tree", "sub"))
  fileio.atomic_write_bytes(fileio.join(root, "tree", "sub", "f"), b"x")
  fileio.atomic_write_bytes(fileio.join(root, "tree", "g"), b"y")
  fileio.move(fileio.join(root, "tree"), fileio.join(root, "aside", "tree"))
  assert not fileio.exists(fileio.join(root, "tree"))
  assert fileio.read_bytes(fileio.join(root, "aside", "tree", "sub", "f")) == b"x"
  assert fileio.read_bytes(fileio.join(root, "aside", "tree", "g")) == b"y"


def test_failed_write_keeps_the_old_file(root):
  target = fileio.join(root, "keep.txt")
  fileio.atomic_write_bytes(target, b"old")

  def broken(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    fileio.atomic_write(target, broken)
  assert fileio.read_bytes(target) == b"old"
  assert fileio.listdir(root) == ["keep.txt"]


def test_local_lock_excludes_other_processes(tmp_path):
  """A second process waits for the lock: its line comes after the holder's release."""
  import subprocess
  import sys
  import time
  lock, log = tmp_path / "x.lock", tmp_path / "log"
  child = ("import sys\nfrom fcdm_jax import fileio\n"
           "open(sys.argv[2] + '.started', 'w').close()\n"
           "with fileio.local_lock(sys.argv[1]):\n"
           "  open(sys.argv[2], 'a').write('child\\n')\n")
  with fileio.local_lock(lock):
    proc = subprocess.Popen([sys.executable, "-c", child, str(lock), str(log)])
    deadline = time.time() + 60
    while not (tmp_path / "log.started").exists() and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(0.5)   # the child is now blocked on the lock
    with open(log, "a") as f:
      f.write("holder\n")
  assert proc.wait(timeout=60) == 0
  assert log.read_text().splitlines() == ["holder", "child"]
  with pytest.raises(ValueError, match="local file system"):
    with fileio.local_lock("gs://bucket/x.lock"):
      pass


def test_atomic_writes_get_the_umask_mode_or_keep_the_old_one(tmp_path):
  """Not mkstemp's private 0600: a new file as open() would make it, a replaced one keeps
  its mode."""
  import os
  import stat
  out = tmp_path / "table.json"
  fileio.atomic_write_bytes(str(out), b"1")
  assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~fileio._UMASK
  os.chmod(out, 0o640)
  fileio.atomic_write_bytes(str(out), b"2")
  assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_bytes() == b"2"
