"""The README's main command: trains the ShapeEdit grounded editor briefly, edits where it finds the
region itself (and under the exact masks), scores, reuses its run."""

import json

import numpy as np
from PIL import Image

from fireedit_jax import cli

TINY_DEMO = ["--steps", "24", "--batch-size", "8", "--samples", "8", "--edit-steps", "2"]


def test_demo_writes_its_files_and_reuses_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY_DEMO]) == 0
    for name in ("edits.png", "metrics.json", "checkpoint/config.json", "checkpoint/tokenizer"):
        assert (out / name).exists(), name
    grid = Image.open(out / "edits.png")
    assert grid.height >= 8 * 32 and grid.width >= 4 * 128  # a row per sample; input, region, output, target
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "grounded" and metrics["train_steps"] == 24
    assert set(metrics["models"]) == {"trained", "exact_mask", "untrained", "copy_input"}
    for name in ("trained", "untrained"):  # the regions it found, scored
        region = metrics["models"][name]["region"]
        assert 0.0 <= region["box_iou"] <= 1.0 and 0.0 <= region["area"] <= 1.0
        assert set(region["box_iou_by_kind"]) == {s for s in metrics["models"][name]["kind"]}
    assert "region" not in metrics["models"]["exact_mask"]
    for summary in metrics["models"].values():
        assert set(summary["overall"]) >= {"success", "specific", "kept", "l1", "l2", "l1_outside"}
        assert set(summary["refer"]) <= {"attribute", "position", "size", "corner"}
    copy = metrics["models"]["copy_input"]["overall"]
    assert copy["l1_outside"] == 0.0 and copy["l1"] > 0.0  # the input is the target outside the edited box
    assert copy["kept"] == 1.0 and copy["specific"] == copy["success"] == 0.0
    table = capsys.readouterr().out
    assert "copy_input" in table and "edit success" in table and "specific" in table and "region IoU" in table
    assert "where the model finds the region itself (no mask given)" in table
    assert f"fireedit-jax serve --checkpoint {out / 'checkpoint'} --steps 2 " in table  # the web page, same settings

    timings = json.loads((out / "timings.json").read_text())["seconds"]
    assert list(timings) == ["start-up", "training", "export", "editing (trained)", "editing (exact masks)",
                             "editing (untrained)", "scoring"]  # fmt: skip
    assert "estimate: about" in table and "the demo took" in table

    # a fresh run with the same seed: the same metrics.json, to the byte (its times are in timings.json)
    assert cli.main(["demo", "--out", str(tmp_path / "again"), *TINY_DEMO]) == 0
    assert (tmp_path / "again" / "metrics.json").read_text().replace("again", "demo") == (out / "metrics.json").read_text()

    assert cli.main(["demo", "--out", str(out), *TINY_DEMO]) == 0
    assert "reusing the training run" in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_steps"] == 24 and np.isclose(
        again["models"]["trained"]["overall"]["l1"], metrics["models"]["trained"]["overall"]["l1"]
    )  # same weights, same seed: the same edits

    # `fireedit-jax edit` on the demo checkpoint; an unknown word is named with the known ones
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "in.png")
    edit = ["edit", "--checkpoint", str(out / "checkpoint"), "--image", str(tmp_path / "in.png"), "--steps", "2"]
    assert cli.main([*edit, "--instruction", "add a red circle in the top left corner",
                     "--out", str(tmp_path / "out.png")]) == 0  # fmt: skip
    assert Image.open(tmp_path / "out.png").size == (32, 32)
    capsys.readouterr()
    assert cli.main([*edit, "--instruction", "make the cup magenta", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "cup, magenta" in err and "circle" in err and "leftmost" in err


def test_the_command_asks_glibc_for_huge_pages_once():
    import platform

    if platform.libc_ver()[0] != "glibc":
        assert cli.with_huge_pages({}) is None
        return
    assert cli.with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert cli.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert cli.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None  # the re-executed command
    assert cli.with_huge_pages({"FIREEDIT_JAX_HUGE_PAGES": "0"}) is None
