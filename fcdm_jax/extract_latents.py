"""Encode an image dataset once into SD-VAE latents: the `latents` training source.

    python -m fcdm_jax.extract_latents --source=folder:/data/imagenet/train \
        --resolution=256 --vae=/models/sd-vae-ft-ema --out=/data/latents/in256

Sources, resuming, captions and hosts: `fcdm_jax.extraction`. Exit status 0 when the
dataset is complete, 1 on an error (one `error:` line naming the problem).
"""


from absl import flags

from fcdm_jax import cli
from fcdm_jax import extraction

flags.DEFINE_string("source", None, "What to encode: folder:PATH (ImageFolder layout, "
                    "PATH/CLASS/IMAGE; labels by sorted class folder), coco:ROOT (MS-COCO "
                    "2014: ROOT/<split>/*.jpg and ROOT/annotations/captions_<split>.json, "
                    "with --split=train2014 or val2014; captioned, labels 0) or tfds:NAME (a "
                    "prepared TFDS dataset in --data_dir, e.g. tfds:imagenet2012, or "
                    "tfds:coco_captions with --captions_key=captions/text).", required=True)
flags.DEFINE_string("data_dir", "", "TFDS data_dir for tfds: sources (nothing is downloaded).")
flags.DEFINE_string("split", "train", "Split: of a tfds: source (e.g. train; coco_captions: "
                    "train, val, test, restval), or of coco: (train2014 or val2014: the "
                    "image folder and the captions_<split>.json read).")
flags.DEFINE_string("image_key", "image", "TFDS image feature name.")
flags.DEFINE_string("label_key", "label", "TFDS ClassLabel feature name (not used with "
                    "--captions_key: labels are then 0).")
flags.DEFINE_string("captions_key", "", "tfds: sources: the feature path of the captions, "
                    "'/'-separated through Sequences (coco_captions: captions/text); each "
                    "shard's captions go to a shard-XXXXX.captions.json sidecar. Empty: no "
                    "captions.")
flags.DEFINE_string("text_encoder", "", "Local Hugging Face CLIP folder (text model and "
                    "tokenizer): after the latents, encode the captions of a captioned source "
                    "into the caption folder <out>/captions (config.data.captions). A "
                    "finished one made by the same encoder is kept, another is refused. "
                    "Empty: only the sidecars are written (rerun with it later to add the "
                    "folder without encoding any image).")
flags.DEFINE_enum("text_pooling", "pooled", ["pooled", "projected"], "Caption embedding: "
                  "the end-of-text state ('pooled') or its text_projection ('projected'); "
                  "give the run the same config.data.text_pooling (sampling's --prompt).")
flags.DEFINE_integer("text_batch_size", 256, "Captions per text encoder step.")
flags.DEFINE_integer("resolution", 256, "Image size after ADM's centre crop (256 -> 32x32x4 "
                     "latents with the SD-VAE).")
flags.DEFINE_string("vae", None, "Local diffusers AutoencoderKL directory (config.json + "
                    "diffusion_pytorch_model.safetensors or .bin), e.g. sd-vae-ft-ema.",
                    required=True)
flags.DEFINE_string("out", None, "Output directory of the latent dataset; an unfinished one "
                    "with the same settings is resumed.", required=True)
flags.DEFINE_integer("batch_size", 64, "Images per encoder step on this host, split over its "
                     "local devices (rounded up to a multiple of their count); each is "
                     "encoded with its mirror, so the VAE sees twice as many.")
flags.DEFINE_integer("shard_size", 1000, "Examples per shard file: the unit of resuming and "
                     "of splitting the work between hosts.")
flags.DEFINE_integer("num_workers", 8, "Threads decoding and cropping images.")
flags.DEFINE_enum("dtype", "float16", list(extraction.STORAGE_DTYPES), "Storage dtype of the posterior "
                  "mean and std.")
flags.DEFINE_enum("precision", "default", list(extraction.PRECISIONS), "Matmul/conv precision of the "
                  "encoder ('default': TF32/bf16 passes on GPU/TPU, like PyTorch's cuDNN "
                  "default; 'highest': full float32).")
cli.define_distributed_flag()


def main(argv):
  del argv   # cli.run refuses positional arguments
  f = flags.FLAGS
  summary = extraction.extract(f.source, f.resolution, f.vae, f.out, batch_size=f.batch_size,
                    shard_size=f.shard_size, num_workers=f.num_workers, dtype=f.dtype,
                    precision=f.precision, data_dir=f.data_dir, split=f.split,
                    image_key=f.image_key, label_key=f.label_key,
                    captions_key=f.captions_key, text_encoder=f.text_encoder,
                    text_pooling=f.text_pooling, text_batch_size=f.text_batch_size)
  if summary["manifest"] is not None:
    m = summary["manifest"]
    print(f"{summary['out']}: {m['count']} examples of {tuple(m['shape'])} in "
          f"{summary['num_shards']} shards ({len(summary['written'])} written now); "
          f"stats {m['stats']}")
  if summary.get("captions") is not None:
    c = summary["captions"]
    print(f"{summary['out']}/{extraction.CAPTIONS_DIR}: {c['count']} captions of {c['num_examples']} "
          f"examples, dim {c['dim']} ({'written now' if summary['captions_written'] else 'kept'})")


if __name__ == "__main__":
  cli.run(main)
