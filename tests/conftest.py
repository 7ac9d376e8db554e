"""Test set-up: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere.
"""

import os

# 8 simulated devices share 2 cores: a device's thread can wait minutes at a collective on a
# loaded machine, and XLA:CPU aborts the process when the rendezvous outlasts its timeouts
# (CI once died so in the sharded stage-3 test). Wait up to 30 minutes instead.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from train_runs import runs  # noqa: E402, F401 - the shared subprocess training runs (session-scoped)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("FIREEDIT_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def highest_precision():
    """Parity tests compare float32 outputs with full-precision matmuls."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def bucket(tmp_path_factory):
    """"gs://bucket" on a GCS API server started here (tests/gcs_emulator.py), with every
    client of this process and of its subprocesses pointed at it (storage.use_emulator), and
    local copies of data sets in it kept under the session's temporary directory."""
    import gcs_emulator

    from fireedit_jax import storage

    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
             "FIREEDIT_JAX_DATA_CACHE")  # fmt: skip
    saved = {name: os.environ.get(name) for name in names}
    process, url = gcs_emulator.start("bucket")
    storage.use_emulator(url)
    os.environ["FIREEDIT_JAX_DATA_CACHE"] = str(tmp_path_factory.mktemp("remote_data_cache"))
    yield "gs://bucket"
    process.kill()
    process.wait()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
