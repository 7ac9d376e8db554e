"""`fireedit-jax plan`: per-device memory of the compiled train step (train/plan.py)."""

import pytest

from micro import OVERRIDES, TINY, micro_config

from fireedit_jax import cli
from fireedit_jax.train import plan


@pytest.fixture(scope="module")
def plans():
    return {n: plan.plan(micro_config(f"data=1,fsdp={n},tensor=1"), plan.local_devices(n)) for n in (2, 4)}


def test_figures_are_positive_and_shrink_per_device_as_fsdp_grows(plans):
    small, large = plans[2], plans[4]
    for p in (small, large):
        assert p.estimate and p.mesh["tensor"] == 1
        assert min(p.arguments, p.outputs, p.temporaries) > 0
        assert p.total == p.arguments + p.outputs - p.aliased + p.temporaries
    assert (large.micro_batch_per_device, small.micro_batch_per_device) == (2, 4)
    # the state shard halves (large leaves split over fsdp), the activations with the batch
    assert large.arguments < small.arguments
    assert large.temporaries < small.temporaries
    assert large.total < small.total


def test_cli_prints_the_same_figures_labelled_as_an_estimate(plans, capsys):
    argv = ["plan", "--config", TINY, "--mesh", "data=1,fsdp=4,tensor=1"]
    assert cli.main(argv + [f"--config.{o}" for o in OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out
    assert out.strip() == plan.format_plan(plans[4]).strip()


def test_mesh_and_topology_mistakes_are_explained(capsys):
    assert plan.parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
    with pytest.raises(ValueError, match="axis=size"):
        plan.parse_mesh("data=2,pipeline=4")
    with pytest.raises(ValueError, match="not an integer"):
        plan.parse_mesh("data=two")
    with pytest.raises(ValueError, match="v5e:4x4"):
        plan.topology_devices("v5e-16")
    argv = ["plan", "--config", TINY, "--mesh", "data=1,fsdp=-1,tensor=1"]
    assert cli.main(argv) == 2
    assert "give every mesh size" in capsys.readouterr().err
