"""Importing the PyTorch reference implementations (pytorch-fid, diffusers) in tests.

PyPI's torchvision wheels link CUDA libraries that the CPU build of torch does not ship,
so torchvision's C++ operators (nms, roi_align, ...) cannot load here, and torchvision
0.28 then fails at import: it registers fake kernels for `nms` and `qnms` without first
checking that the operators exist. pytorch-fid builds its Inception from
`torchvision.models.inception` (pure Python), and diffusers imports torchvision when it
is installed; neither uses the C++ operators. `import_torchvision` therefore declares the
schemas of those two operators (no kernels: calling them still fails) and imports again.
"""

from __future__ import annotations

import sys

import pytest

_LIBRARIES = []  # keeps the operator declarations alive


def import_torchvision():
  torch = pytest.importorskip("torch")
  try:
    import torchvision
    return torchvision
  except RuntimeError as e:
    if "torchvision::nms does not exist" not in str(e):
      raise
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]
  lib = torch.library.Library("torchvision", "DEF")
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
  _LIBRARIES.append(lib)
  import torchvision
  return torchvision
