"""fcdm_jax: FCDM (Reviving ConvNeXt for Efficient Convolutional Diffusion Models) in JAX/Flax."""

from setuptools import find_namespace_packages, setup

setup(
    name="fcdm_jax",
    version="0.1.0",
    description="FCDM convolutional diffusion models in JAX/Flax: train, sample, evaluate, "
                "and exchange checkpoints with the published PyTorch code.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["fcdm_jax", "fcdm_jax.*"]),
    include_package_data=True,
    package_data={"fcdm_jax.data.embedded": ["*"]},
    install_requires=[
        # Lower bounds are the versions the test suite was run with.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "clu>=0.0.12",
        # clu.metric_writers imports TensorFlow and TensorBoard.
        "tensorflow-cpu>=2.21.0",
        "tensorboard>=2.21.0",
        "tensorflow-datasets>=4.9.10",
        "numpy>=2.0",
        "scipy>=1.13",
        "absl-py>=2.1",
        "pillow>=10.0",
        "safetensors>=0.4",
        "tqdm>=4.66",
        # Paths: etils.epath (what orbax and TFDS use) with gcsfs for gs:// URLs.
        "etils[epath]>=1.15",
        "gcsfs>=2026.10.1",
        # The CLIP tokenizer's word pattern needs Unicode classes (\p{L}, \p{N}).
        "regex>=2026.11.19",
    ],
    extras_require={
        # The export and interchange tests load our checkpoints in PyTorch. torch 2.13.0 is
        # the version they were run with; on the project's CI machines pip takes a local CPU
        # wheel, elsewhere PyPI's torch for Linux x86_64 is the multi-GB CUDA build (install
        # torch from PyTorch's CPU wheel index first to avoid it).
        "test": [
            "pytest>=8.0", "torch==2.13.0",
            # Parity tests build the reference PyTorch networks with random weights:
            # diffusers' AutoencoderKL and pytorch-fid's FID Inception (which imports
            # torchvision; 0.28.0 is the release that pairs with torch 2.13.0).
            "diffusers>=0.42.1", "pytorch-fid>=0.3.0", "torchvision==0.28.0",
            "zarr>=3.1",
            # The input benchmark's comparison reader (bench --mode=input).
            "grain>=0.2.18",
            # A GCS emulator on 127.0.0.1 for the cloud-storage tests.
            "gcp-storage-emulator>=2026.7.19",
            # The CLIP text encoder and tokenizer tests compare with transformers' models.
            "transformers>=5.24.0",
        ],
        "torch": ["torch>=2.2"],
        # The published PyTorch code's zarr latent store.
        "zarr": ["zarr>=3.1"],
        # libtpu: `fcdm_jax.preflight` compiles for TPU slices on any machine, and TPU VMs
        # run with it. Pinned to the jax the suite was run with: libtpu pairs with one jax.
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
