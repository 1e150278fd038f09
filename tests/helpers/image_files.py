"""Small image sources written here: a class-per-folder image tree with odd files, and a tiny
MS-COCO 2014 tree in its official layout (images and captions JSON)."""

import json
import os

import numpy as np
from PIL import Image


def write_image_folder(root):
  """Three classes, eight image files (one corrupt, one CMYK, one grayscale, one RGBA) and
  a text file that is not an image. Listing order: ants/*, bees/*, cats/*."""
  rng = np.random.default_rng(1)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  for name in ("ants", "bees", "cats", "empty_class"):
    os.makedirs(os.path.join(root, name), exist_ok=True)
  Image.fromarray(rgb(20, 30)).save(os.path.join(root, "ants", "a0.jpg"), quality=95)
  Image.fromarray(rgb(40, 18)).save(os.path.join(root, "ants", "a1.png"))
  Image.fromarray(rgb(16, 16)).convert("CMYK").save(os.path.join(root, "ants", "a2_cmyk.jpg"))
  Image.fromarray(rgb(24, 24)[..., 0]).save(os.path.join(root, "bees", "b0_gray.jpg"))
  with open(os.path.join(root, "bees", "b1_corrupt.jpg"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(100))
  Image.fromarray(np.concatenate([rgb(17, 33), np.full((17, 33, 1), 128, np.uint8)], -1),
                  "RGBA").save(os.path.join(root, "bees", "b2_rgba.png"))
  os.makedirs(os.path.join(root, "cats", "nested"), exist_ok=True)
  Image.fromarray(rgb(64, 48)).save(os.path.join(root, "cats", "c0.bmp"))
  Image.fromarray(rgb(33, 21)).save(os.path.join(root, "cats", "nested", "c1.png"))
  with open(os.path.join(root, "cats", "notes.txt"), "w") as f:
    f.write("not an image")
  return str(root)


# ------------------------------------------------------------------------- a tiny COCO

SPLIT = "train2014"
# image id -> (height, width) and its captions as (annotation id, caption); the JSON lists
# images and annotations out of id order, some captions carry stray whitespace.
IMAGES = {
    42: ((20, 24), [(310, "a red zero on a table"), (12, "  the digit zero in red\n")]),
    7: ((24, 18), [(5, "a green one"), (900, "one green digit"), (77, "green, one.")]),
    19: ((16, 16), [(40, "a corrupt image's caption"), (41, "never encoded")]),   # corrupt
    3: ((30, 20), [(8, "a blue two"), (2, "two in blue "), (600, "blue two"),
                   (601, "the digit two"), (9, "a two")]),
    88: ((18, 26), [(1000, "yellow three"), (999, " a yellow three ")]),
    25: ((22, 22), [(61, "zero"), (60, "red"), (62, "red zero"), (3, "a red thing")]),
}
CORRUPT = 19
KEPT = [i for i in sorted(IMAGES) if i != CORRUPT]   # the COCO images that decode, by id


def file_name(image_id, split=SPLIT):
  return f"COCO_{split}_{image_id:012d}.jpg"


def captions_of(image_id):
  return [c.strip() for _, c in sorted(IMAGES[image_id][1])]


def write_coco(root, split=SPLIT, seed=3):
  """ROOT/<split>/*.jpg and ROOT/annotations/captions_<split>.json, as COCO ships them."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, split))
  for image_id, ((h, w), _) in IMAGES.items():
    path = os.path.join(root, split, file_name(image_id, split))
    if image_id == CORRUPT:
      with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG" + bytes(64))
    else:
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=95)
  notes = [{"image_id": i, "id": a, "caption": c} for i, (_, cs) in IMAGES.items() for a, c in cs]
  notes = [notes[k] for k in rng.permutation(len(notes))]
  data = {"info": {"description": "tiny COCO 2014"}, "licenses": [],
          "images": [{"license": 1, "file_name": file_name(i, split), "height": hw[0], "width": hw[1],
                      "id": i, "coco_url": "", "date_captured": ""}
                     for i, (hw, _) in IMAGES.items()],
          "annotations": notes}
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
    json.dump(data, f)
  return str(root)
