"""Runs, checkpoints and data in a bucket, against a real GCS API server on a loopback port
(tests/gcs_emulator.py; conftest's `bucket`): gcsfs, TensorStore (Orbax) and
google-cloud-storage (tensorboardX) all talk HTTP to it.

  bucket_run  `fireedit-jax train --workdir gs://bucket/run`, train_runs' command, SIGKILLed
              once a checkpoint is committed in the bucket, then resumed from the bucket
Then: its losses against the local uninterrupted run's (train_runs' `full`), its logs in the
bucket, export and edit from the bucket, a half-written checkpoint there, the data sources
read from it, an evaluation log resuming there, and one clear error for a workdir that
cannot be written or a data path that is not there, before anything compiles.
"""

import contextlib
import http.server
import json
import os
import signal
import threading
import time

import grain
import jax
import numpy as np
import pytest
import train_runs
from micro import micro_config
from PIL import Image
from test_data_sources import png_bytes, write_ip2p_parquet
from train_runs import STEPS

from fireedit_jax import cli, images, storage
from fireedit_jax.data.pipeline import make_iterator
from fireedit_jax.data.records import EditRecord, Task
from fireedit_jax.data.tfds_builder import build_triplets
from fireedit_jax.data.transforms import EditTransform, decode_image
from fireedit_jax.eval.result_log import ResultLog, RunSettingsError
from fireedit_jax.pipeline import Editor
from fireedit_jax.train import checkpoints as ckpt_lib
from fireedit_jax.train import inputs
from fireedit_jax.train import mesh as mesh_lib
from fireedit_jax.train import run
from fireedit_jax.train.step import Trainer

TINY = os.path.join(train_runs.ROOT, "configs", "tiny.py")


@pytest.fixture(scope="module")
def bucket_run(bucket, runs, tmp_path_factory):
    """(workdir, the lines metrics.jsonl held when the run was killed)."""
    workdir, log = f"{bucket}/run", str(tmp_path_factory.mktemp("bucket_run") / "train.log")
    process = train_runs.start(workdir, log=log)
    while ckpt_lib.find_training_checkpoint(workdir) is None:  # committed: commit_success.txt written
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint:\n{train_runs.finish(process, log)}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = train_runs.logged(workdir)
    resumed = train_runs.start(workdir, log=log)
    out = train_runs.finish(resumed, log)
    assert resumed.returncode == 0, out
    return workdir, before


def test_bucket_run_resumes_exactly_after_sigkill(bucket_run, runs):
    workdir, before = bucket_run
    full = {line["step"]: line["loss"] for line in train_runs.logged(runs["full"][0])}
    lines = train_runs.logged(workdir)
    assert before and lines[: len(before)] == before  # the resumed run appended to the object
    after = lines[len(before) :]
    assert before[-1]["step"] < STEPS, "the run finished before it was killed"
    assert after and after[0]["step"] > 1 and after[-1]["step"] == STEPS
    for line in before + after:  # the local uninterrupted run's losses, bit for bit
        assert line["loss"] == full[line["step"]], line["step"]

    run_dir = storage.as_path(workdir)
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [STEPS - 4, STEPS - 2, STEPS]  # keep = 3 (a save the kill interrupted: <step>.broken)
    assert all((run_dir / "checkpoints" / str(s) / "commit_success.txt").exists() for s in steps)
    # event files: tensorboardX uploads at close (and every 120 s); the killed run's may be lost
    events = train_runs.read_events(f"{workdir}/tensorboard")
    by_step = {line["step"]: line["loss"] for line in lines}
    assert {line["step"] for line in after} <= {step for step, _ in events["loss"]}
    for step, value in events["loss"]:
        assert value == pytest.approx(by_step[step], rel=1e-6)
    assert events["<images>"] == [(STEPS, "samples")]
    grid = np.asarray(images.load_image(f"{workdir}/samples/step_{STEPS:07d}.png"))
    assert grid.shape == (2 * 16, 3 * 16, 3)


def test_export_and_edit_from_the_bucket(bucket, bucket_run, runs, tmp_path):
    workdir, _ = bucket_run
    assert cli.main(["export", "--checkpoint", workdir, "--out", f"{bucket}/export"]) == 0
    local = str(tmp_path / "export")
    ckpt_lib.export(runs["full"][0], local)
    from_bucket, here = Editor.from_pretrained(f"{bucket}/export"), Editor.from_pretrained(local)
    jax.tree.map(np.testing.assert_array_equal, from_bucket.params, here.params)  # the resumed run's weights
    assert from_bucket.tokenizer.get_vocab() == here.tokenizer.get_vocab()

    scene = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
    storage.save_image(scene, f"{bucket}/in/scene.png")
    argv = ["edit", "--checkpoint", f"{bucket}/export", "--image", f"{bucket}/in/scene.png", "--instruction",
            "remove the square", "--out", f"{bucket}/out/edited.png", "--steps", "2", "--seed", "3"]  # fmt: skip
    assert cli.main(argv) == 0
    want = here.edit(scene, "remove the square", steps=2, seed=3, progress=False)
    np.testing.assert_array_equal(np.asarray(images.load_image(f"{bucket}/out/edited.png")), np.asarray(want))


def test_half_written_checkpoint_in_the_bucket_is_set_aside(bucket):
    """Step 3 lost its commit file (a save the kill interrupted), step 2's arrays are truncated:
    both are set aside as <step>.broken in the bucket, with a warning each, and step 1 restores."""
    config = micro_config("data=1,fsdp=1,tensor=1")
    trainer = Trainer.from_config(config, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
    abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    directory = storage.as_path(f"{bucket}/half/checkpoints")
    checkpoints = ckpt_lib.Checkpoints(directory, keep=None)
    for step in (1, 2, 3):  # host arrays filled with the step: which one came back is visible
        checkpoints.save(step, jax.tree.map(lambda s: np.full(s.shape, step, s.dtype), abstract), config=config,
                         force=True)  # fmt: skip
        checkpoints.wait()
    checkpoints.close()
    (directory / "3" / "commit_success.txt").unlink()
    largest = max(storage.files(directory / "2" / "params"), key=lambda f: f.stat().length)
    largest.write_bytes(largest.read_bytes()[: largest.stat().length // 2])

    checkpoints = ckpt_lib.Checkpoints(directory)
    with pytest.warns(UserWarning) as warned:
        restored = checkpoints.restore_latest(abstract)
    checkpoints.close()
    messages = " | ".join(str(w.message) for w in warned)
    assert f"{directory}/3 was not finished (no commit_success.txt)" in messages
    assert f"{directory}/2 cannot be restored" in messages
    assert restored.step == 1 and int(restored.state["step"]) == 1
    np.testing.assert_array_equal(restored.state["params"]["unet"]["conv_in"]["kernel"], 1)
    assert {"1", "2.broken", "3.broken"} == {p.name for p in directory.iterdir()}


def _records_equal(got: EditRecord, want: EditRecord) -> None:
    """Equal fields; images (bytes, local or gs:// paths) decode to the same pixels."""
    for field in ("key", "instruction", "answer", "source_caption", "target_caption", "task"):
        assert getattr(got, field) == getattr(want, field), field
    np.testing.assert_array_equal(got.boxes if got.boxes is not None else [], want.boxes if want.boxes is not None else [])
    for field in ("source_image", "target_image"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            np.testing.assert_array_equal(np.asarray(decode_image(a)), np.asarray(decode_image(b)))


def test_data_sources_read_from_the_bucket(bucket, tmp_path):
    local = tmp_path / "data"
    (local / "ip2p").mkdir(parents=True)
    write_ip2p_parquet(str(local / "ip2p" / "train-00000-of-00001.parquet"),
                       [(png_bytes(i), png_bytes(10 + i)) for i in range(3)])  # fmt: skip
    (local / "folder" / "images").mkdir(parents=True)
    lines = [{"source_image": f"images/{i}_src.png", "target_image": f"images/{i}_tgt.png",
              "instruction": f"make cup {i} red", "boxes": [[0.1, 0.2, 0.5, 0.9]]} for i in range(2)]  # fmt: skip
    for i in range(2):
        (local / "folder" / "images" / f"{i}_src.png").write_bytes(png_bytes(20 + i))
        (local / "folder" / "images" / f"{i}_tgt.png").write_bytes(png_bytes(30 + i))
    (local / "folder" / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (local / "coco").mkdir()
    (local / "coco" / "1.png").write_bytes(png_bytes(40))
    (local / "llava.json").write_text(json.dumps([{"id": "1", "image": "1.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cup."}]}]))  # fmt: skip
    storage.copy_tree(local, f"{bucket}/data")
    triplets = [EditRecord("a", png_bytes(50), "make it blue", png_bytes(51), boxes=np.array([[0, 0, 0.5, 0.5]])),
                EditRecord("b", str(local / "coco" / "1.png"), "what is this?", answer="a cup", task=Task.VQA)]
    tfds_dir = build_triplets(f"{bucket}/data/tfds", {"train": triplets})  # built here, uploaded
    assert tfds_dir.startswith(f"{bucket}/data/tfds/")

    def specs(root: str, tfds_path: str) -> dict:
        return {"ip2p": {"kind": "instructpix2pix", "path": f"{root}/ip2p"},
                "folder": {"kind": "jsonl", "path": f"{root}/folder"},
                "vqa": {"kind": "llava", "path": f"{root}/llava.json", "image_root": f"{root}/coco"},
                "triplets": {"kind": "tfds", "path": tfds_path}}  # fmt: skip

    here = specs(str(local), build_triplets(str(local / "tfds"), {"train": triplets}))
    for name, spec in specs(f"{bucket}/data", tfds_dir).items():
        remote, want = inputs.make_source(name, spec), inputs.make_source(name, here[name])
        assert len(remote) == len(want) > 0, name
        by_key = lambda source: sorted((source[i] for i in range(len(source))), key=lambda r: r.key)  # noqa: E731
        for got, expected in zip(by_key(remote), by_key(want)):
            _records_equal(got, expected)
    # decoded by the pipeline from gs:// image paths
    batches = [next(make_iterator([inputs.make_source("folder", spec["folder"])], EditTransform(16), batch_size=2,
                                  num_epochs=1, shuffle=False, augment=False, shard=grain.sharding.NoSharding()))
               for spec in (specs(f"{bucket}/data", tfds_dir), here)]  # fmt: skip
    np.testing.assert_array_equal(batches[0]["source"], batches[1]["source"])
    assert batches[0]["source"].std() > 0


class _Forbidding(http.server.BaseHTTPRequestHandler):
    """Answers every request as GCS does a caller without permission."""

    def _deny(self):
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.create access"}})
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PUT = do_DELETE = _deny

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _forbidding_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Forbidding)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_an_unusable_workdir_or_data_path_stops_the_run_before_compiling(bucket, monkeypatch, capsys):
    def compile_nothing(*args, **kwargs):
        raise AssertionError("the run got as far as building the trainer")

    monkeypatch.setattr(Trainer, "from_config", compile_nothing)
    config = run.run_defaults(run.load_config(TINY))
    with pytest.raises(storage.StorageError, match="--workdir gs://no-such-bucket/run is not writable"):
        run.train_and_evaluate(config, "gs://no-such-bucket/run")
    assert not storage.as_path("gs://no-such-bucket").exists()  # not created by the attempt

    missing = config.copy_and_resolve_references()
    missing.data.sources = {"folder": {"kind": "jsonl", "path": f"{bucket}/no/such/folder"}}
    with pytest.raises(storage.StorageError, match="config.data source 'folder': path gs://bucket/no/such/folder "
                                                   "does not exist"):  # fmt: skip
        run.train_and_evaluate(missing, f"{bucket}/fine")

    with _forbidding_server() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        assert cli.main(["train", "--config", TINY, "--workdir", f"{bucket}/denied"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fireedit-jax train: error: --workdir gs://bucket/denied is not writable")
    assert "Forbidden" in error and "permissions" in error and len(error.splitlines()) == 1


def test_an_evaluation_log_in_the_bucket_resumes(bucket):
    out = f"{bucket}/eval"
    settings, scorer = {"benchmark": "emu_edit", "steps": 2}, {"metrics": ["l1"]}
    log = ResultLog(out, settings, scorer)
    storage.save_image(Image.new("RGB", (8, 8), "red"), f"{out}/images/a.png")
    log.add({"key": "a", "output": "images/a.png", "l1": 0.5})
    log.add({"key": "b", "output": "images/b.png", "error": "not a readable image"})
    log.close()
    again = ResultLog(out, settings, scorer)
    assert again.records == log.records and again.done("a") and not again.done("b")
    again.add({"key": "b", "output": "images/b.png", "l1": 0.25})
    again.close()
    assert [json.loads(line)["key"] for line in storage.as_path(f"{out}/results.jsonl").read_text().splitlines()] == [
        "a", "b", "b"]  # fmt: skip
    with pytest.raises(RunSettingsError, match="steps: 2 then, 3 now"):
        ResultLog(out, dict(settings, steps=3), scorer)
