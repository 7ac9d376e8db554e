"""benchmarks/region_ablation.py's bookkeeping: finished row-seeds are reused, the table is mean ± half
the range over seeds per split (the training and scoring are the demo's, tested in test_learnable_region.py)."""

import importlib.util
import json
import os
import sys
import types

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
PATH = os.path.join(BENCHMARKS, "region_ablation.py")
sys.path.insert(0, BENCHMARKS)  # as when run: it imports shapes_ablation from its directory
spec = importlib.util.spec_from_file_location("region_ablation", PATH)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def _split(iou, layout=None):
    edit = lambda s: {"overall": {"specific": s}}  # noqa: E731
    return {"iou": iou, "iou_position_size": layout, "region_area": 0.1, "region_edit": edit(iou / 2),
            "exact_mask_edit": edit(0.7)}  # fmt: skip


def test_finished_row_seeds_are_reused_and_tabled(tmp_path):
    args = types.SimpleNamespace(out=str(tmp_path), samples=8, edit_steps=2, batch_size=4, seeds=[0, 1])
    for seed, iou in ((0, 0.2), (1, 0.6)):
        os.makedirs(tmp_path / f"no_sa_seed{seed}")
        (tmp_path / f"no_sa_seed{seed}" / "scores.json").write_text(json.dumps({"test": _split(iou, iou),
                                                                                "heldout": _split(iou)}))  # fmt: skip
    runs = [ablation.run_one("no_sa", seed, "no-generator-needed", args) for seed in (0, 1)]  # nothing trains
    table = ablation.markdown({"no_sa": runs}, args)
    assert "| w/o L_sa | test | 0.400 ± 0.200 | 0.400 ± 0.200 | 0.100 ± 0.000 | 0.200 ± 0.100 | 0.700 ± 0.000 |" in table
    assert "| w/o L_sa | heldout | 0.400 ± 0.200 | – |" in table  # no position/size references
