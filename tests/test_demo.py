"""The README's main command writes its outputs."""

import json

from fireedit_jax import cli


def test_demo_writes_its_files_and_reuses_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    for name in ("edits.png", "metrics.json", "checkpoint/config.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert max(metrics["conversion_max_abs_error"].values()) < 1e-4
    capsys.readouterr()
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
