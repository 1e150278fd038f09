"""The published FCDM variants (S, B, L, XL)."""

from __future__ import annotations

VARIANTS = {
    "S": dict(hidden_size=128, depth=(2, 4, 8, 4, 2)),
    "B": dict(hidden_size=256, depth=(2, 4, 8, 4, 2)),
    "L": dict(hidden_size=512, depth=(2, 4, 8, 4, 2)),
    "XL": dict(hidden_size=512, depth=(3, 6, 12, 6, 3)),
}

PUBLISHED_DEFAULTS = dict(in_channels=4, mlp_ratio=3.0, class_dropout_prob=0.1,
                          num_classes=1000, learn_sigma=True)


def get_variant(name: str) -> dict:
  """Published constructor fields of a variant ('S', 'B', 'L', 'XL'; 'FCDM-' prefix ok)."""
  key = name.upper().removeprefix("FCDM-")
  if key not in VARIANTS:
    raise ValueError(f"unknown FCDM variant {name!r}; expected one of {sorted(VARIANTS)}")
  return dict(PUBLISHED_DEFAULTS, **VARIANTS[key])
