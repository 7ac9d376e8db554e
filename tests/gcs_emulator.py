"""A Google Cloud Storage API server on a loopback port, for the tests and for trying gs:// runs.

    python tests/gcs_emulator.py --port 9023 [--bucket bucket]
    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 fireedit-jax train --workdir gs://bucket/run ...

It is gcp-storage-emulator (pure Python, in memory, no credentials) with two gaps filled:
- its media downloads lack the `x-goog-generation` header, which GCS sends and TensorStore
  reads (without it TensorStore's next conditional read of an OCDBT manifest fails with
  "Malformed StorageGeneration"): the download handler adds it from the object's metadata;
- it has no objects.moveTo (what gcsfs renames with; its 501 made gcsfs retry for ~30 s
  before falling back to copy + delete): added as copy + delete.
What it still does not do that a real bucket does: it accepts every request (no
credentials, no permissions) and ignores ifGenerationMatch preconditions (TensorStore's
guard against concurrent writers: one writer is fine).
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import subprocess
import sys
import time
import urllib.request

from http import HTTPStatus

from gcp_storage_emulator import server, settings
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _with_generation(download):
    def handler(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        except NotFound:
            pass  # the handler answers 404
        return download(request, response, storage, *args, **kwargs)

    return handler


def _move(request, response, storage, *args, **kwargs):
    bucket, source, target = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, target)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    objects._delete(storage, bucket, source)
    response.json(moved)


def serve(port: int, bucket: str) -> None:
    original = objects.download
    objects.download = _with_generation(original)  # objects.get calls it for ?alt=media
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            if handler is original:
                methods[method] = objects.download
    move = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
            r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
    server.HANDLERS = ((move, {server.POST: _move}), *server.HANDLERS)  # before the plain object route
    socketserver.TCPServer.request_queue_size = 256  # TensorStore opens many connections at once
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(bucket: str = "bucket", timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """(the server process, its URL for STORAGE_EMULATOR_HOST), once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--bucket", bucket],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the storage emulator did not start on {url}") from None
            time.sleep(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--bucket", default="bucket", help="a bucket created at start")
    args = parser.parse_args()
    serve(args.port, args.bucket)
