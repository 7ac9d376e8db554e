"""The strict conversion core: file formats and the errors that name keys."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fireedit_jax.convert import core


def _rename(key, value):
    prefix, name = key.rsplit(".", 1)
    leaf = {"weight": "kernel", "bias": "bias"}[name]
    return (prefix.replace(".", "_"), leaf), core.linear if leaf == "kernel" else core.identity


EXPECTED = {
    "a": {"kernel": jax.ShapeDtypeStruct((3, 2), np.float32), "bias": jax.ShapeDtypeStruct((2,), np.float32)},
    "b_0": {"kernel": jax.ShapeDtypeStruct((2, 4), np.float32)},
}


def _state():
    return {
        "a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a.bias": np.ones(2, np.float32),
        "b.0.weight": np.zeros((4, 2), np.float32),
    }


def test_convert_transposes_and_nests():
    params = core.convert(_state(), _rename, EXPECTED)
    np.testing.assert_array_equal(params["a"]["kernel"], _state()["a.weight"].T)
    assert params["b_0"]["kernel"].shape == (2, 4)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.pop("a.bias"), "a/bias"),
        (lambda s: s.update({"c.weight": np.zeros((1, 1), np.float32)}), "c.weight"),
        (lambda s: s.update({"a.weight": np.zeros((5, 3), np.float32)}), "a/kernel (checkpoint (3, 5), model (3, 2))"),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_errors_name_the_key(edit, needle):
    state = _state()
    edit(state)
    with pytest.raises(core.ConversionError) as err:
        core.convert(state, _rename, EXPECTED, what="toy")
    assert needle in str(err.value)
    assert "toy" in str(err.value)


def test_ignore_and_fresh_lists():
    state = _state()
    state["rotary_emb.inv_freq"] = np.zeros(3, np.float32)
    del state["b.0.weight"]
    params = core.convert(state, _rename, EXPECTED, ignore=[r"inv_freq$"], fresh=[r"^b_0/"])
    assert "b_0" not in params


def test_stacked_layers_report_missing_layers():
    expected = {"layers": {"kernel": jax.ShapeDtypeStruct((3, 2, 2), np.float32)}}
    state = {f"layers.{i}.weight": np.full((2, 2), i, np.float32) for i in (0, 2)}

    def rename_indexed(key, value):
        return ("layers", "kernel", key.split(".")[1]), core.linear

    def stack_indexed(path):
        return path[:2], int(path[2])

    with pytest.raises(core.ConversionError, match=r"layers \[1\] missing"):
        core.convert(state, rename_indexed, expected, stack=stack_indexed)
    state["layers.1.weight"] = np.full((2, 2), 1, np.float32)
    params = core.convert(state, rename_indexed, expected, stack=stack_indexed)
    np.testing.assert_array_equal(params["layers"]["kernel"][:, 0, 0], [0, 1, 2])


def test_reads_safetensors_shards_and_pickles(tmp_path):
    tensors = {k: torch.tensor(v) for k, v in _state().items()}
    save_file({"a.weight": tensors["a.weight"]}, str(tmp_path / "m-1.safetensors"))
    save_file({k: tensors[k] for k in ("a.bias", "b.0.weight")}, str(tmp_path / "m-2.safetensors"))
    index = {"weight_map": {"a.weight": "m-1.safetensors", "a.bias": "m-2.safetensors", "b.0.weight": "m-2.safetensors"}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    sharded = core.load_state_dict(str(tmp_path))  # the directory: index preferred
    torch.save({k: v.to(torch.bfloat16) for k, v in tensors.items()}, tmp_path / "w.bin")
    pickled = core.load_state_dict(str(tmp_path / "w.bin"))
    for k, v in _state().items():
        np.testing.assert_array_equal(sharded[k], v)
        np.testing.assert_array_equal(pickled[k], v)  # small integers survive bfloat16


def test_missing_weights_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        core.load_state_dict(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        core.load_state_dict(str(tmp_path / "nope.safetensors"))
