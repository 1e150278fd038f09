"""What the bad-input tests compare before and after a command: every file's sha256."""

import hashlib
import os


def digests(folder) -> dict:
  """{path relative to `folder`: sha256 hex} of every file below `folder`."""
  out = {}
  for base, _, files in os.walk(folder):
    for name in files:
      p = os.path.join(base, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out
