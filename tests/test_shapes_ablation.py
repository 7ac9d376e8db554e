"""benchmarks/shapes_ablation.py's bookkeeping: which finished row-seeds it reuses, refuses or re-scores,
and its table (the training and editing themselves are the demo's, tested in test_demo.py)."""

import importlib.util
import json
import os
import types

import pytest

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "shapes_ablation.py")
spec = importlib.util.spec_from_file_location("shapes_ablation", PATH)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def _args(out, **changes):
    args = dict(steps=1500, batch_size=16, kinds=None, max_objects=None, samples=128, edit_steps=20,
                guidance=[1.0, 3.0], rescore=False, out=str(out))  # fmt: skip
    return types.SimpleNamespace(**{**args, **changes})


def _summary(specific, success, kept):
    return {"overall": {"count": 4, "specific": specific, "success": success, "kept": kept, "l1_outside": 0.01}}


def _finished(out, variant, seed, value, **recorded):
    """A row-seed's scores.json as run_one writes it, trained and scored with _args' budget and settings."""
    args = vars(_args(out))
    result = {
        "test": value, "position/size": value, "heldout": value, "l1_outside": 0.01,
        "summaries": {"test": _summary(value, value + 0.1, 0.9)},
        **{k: args[k] for k in ("steps", "batch_size", "samples", "edit_steps", "guidance")},
        "train_seconds": 1.0, **recorded,
    }  # fmt: skip
    os.makedirs(out / f"{variant}_seed{seed}")
    (out / f"{variant}_seed{seed}" / "scores.json").write_text(json.dumps(result))
    return result


@pytest.fixture
def no_work(monkeypatch):
    """Training or scoring in these tests is a bug: each raises."""
    import fireedit_jax.train.run

    def refuse(*_, **__):
        raise AssertionError("trained or scored a finished row-seed")

    monkeypatch.setattr(fireedit_jax.train.run, "train_and_evaluate", refuse)
    monkeypatch.setattr(ablation, "score", refuse)


def test_a_finished_row_seed_is_reused_with_the_same_budget_and_settings(tmp_path, no_work):
    stored = _finished(tmp_path, "full", 0, 0.25)
    assert ablation.run_one("full", 0, _args(tmp_path)) == stored


def test_another_budget_is_refused_even_with_rescore(tmp_path, no_work):
    _finished(tmp_path, "full", 0, 0.25)
    for rescore in (False, True):
        with pytest.raises(SystemExit, match="trained with"):
            ablation.run_one("full", 0, _args(tmp_path, steps=600, rescore=rescore))


def test_a_sub_task_is_another_training(tmp_path, no_work):
    _finished(tmp_path, "full", 0, 0.25)  # the whole task: no kinds / max_objects recorded
    with pytest.raises(SystemExit, match="trained with"):
        ablation.run_one("full", 0, _args(tmp_path, kinds=["colour"]))


def test_row_config_trains_and_scores_on_the_sub_task(tmp_path):
    from fireedit_jax import demo

    config = ablation.row_config("clip_text", 1, _args(tmp_path, kinds=["colour"], max_objects=1))
    assert config.seed == 1 and config.train.steps == 1500
    for source in (config.data.sources.shapes, config.data.eval):
        assert tuple(source.kinds) == ("colour",) and source.min_objects == source.max_objects == 1
    samples = demo.test_samples(config, 8)
    assert {s["kind"] for s in samples} == {"colour"} and all(len(s["objects"]) == 1 for s in samples)
    assert "kinds" not in ablation.row_config("clip_text", 1, _args(tmp_path)).data.eval


def test_other_settings_need_rescore(tmp_path, no_work, monkeypatch):
    _finished(tmp_path, "full", 0, 0.25, guidance=None)  # scored before --guidance was recorded
    with pytest.raises(SystemExit, match="--rescore"):
        ablation.run_one("full", 0, _args(tmp_path))
    rescored = {"test": 0.5, "position/size": 0.5, "heldout": 0.5, "l1_outside": 0.0, "summaries": {}}
    monkeypatch.setattr(ablation, "score", lambda *_, **__: rescored)
    result = ablation.run_one("full", 0, _args(tmp_path, rescore=True))
    assert result["test"] == 0.5 and result["guidance"] == [1.0, 3.0] and result["train_seconds"] == 1.0
    assert json.loads((tmp_path / "full_seed0" / "scores.json").read_text()) == result


def test_position_size_weights_by_count():
    summary = {"refer": {"position": {"count": 1, "specific": 1.0}, "size": {"count": 3, "specific": 0.0},
                         "attribute": {"count": 9, "specific": 1.0}}}  # fmt: skip
    assert ablation.position_size(summary) == 0.25


def test_table_gives_mean_and_half_range_over_seeds(tmp_path):
    runs = [_finished(tmp_path, "none", 0, 0.2), _finished(tmp_path, "none", 1, 0.4)]
    table = ablation.markdown({"none": runs}, _args(tmp_path, seeds=[0, 1]))
    row = next(line for line in table.splitlines() if line.startswith("| none"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["0.300 ± 0.100"] * 3  # test, position/size, heldout
    assert cells[4] == "0.400 ± 0.100" and cells[5] == "0.900 ± 0.000"  # box success, others kept
    assert "guidance s_I / s_T 1.0 / 3.0" in table
    for run in runs:  # one-object scenes have no position/size reference
        run["position/size"] = float("nan")
    table = ablation.markdown({"none": runs}, _args(tmp_path, seeds=[0, 1]))
    row = next(line for line in table.splitlines() if line.startswith("| none"))
    assert [c.strip() for c in row.strip("|").split("|")][2] == "–"


def test_the_diffedit_row_edits_with_the_mask_rows_checkpoint(tmp_path, no_work, monkeypatch):
    _finished(tmp_path, "mask", 0, 0.7)
    calls = []
    monkeypatch.setattr(ablation, "score", lambda checkpoint, name, args, diffedit=False: calls.append(
        (checkpoint, diffedit)) or {"test": 0.3, "position/size": 0.3, "heldout": 0.2, "l1_outside": 0.0,
                                    "summaries": {"test": _summary(0.3, 0.4, 1.0)}, "region": {"box_iou": 0.4, "referred_object": 0.5}})  # fmt: skip
    result = ablation.run_one("mask_diffedit", 0, _args(tmp_path))
    assert calls == [(str(tmp_path / "mask_seed0" / "checkpoint"), True)]  # not trained again
    assert result["train_seconds"] == 1.0 and (tmp_path / "mask_diffedit_seed0" / "scores.json").exists()
    table = ablation.markdown({"mask_diffedit": [result], "mask": [ablation.run_one("mask", 0, _args(tmp_path))]},
                              _args(tmp_path, seeds=[0]))  # fmt: skip
    diffedit, mask = ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                      if line.startswith(("| mask, DiffEdit", "| mask (")))  # fmt: skip
    assert diffedit[-3:-1] == ["0.400 ± 0.000", "0.500 ± 0.000"] and mask[-3:] == ["–"] * 3  # no region found
