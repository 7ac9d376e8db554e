"""configs/tiny.py cut to one UNet / VAE level and one text layer at 16 px: for tests of the
step's machinery (memory plans, multi-process runs), where the model's size only costs
compile time. The UNet keeps 2 channels per norm group: with one, GroupNorm cancels the
conv biases before it, whose gradients are then rounding noise that Adam blows up to ±lr."""

import os

from fireedit_jax.train import plan, run

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.py")

OVERRIDES = (
    "model.unet.block_out_channels=(32,)", "model.unet.down_block_types=('DownBlock2D',)",
    "model.unet.up_block_types=('UpBlock2D',)", "model.unet.layers_per_block=(1,)", "model.unet.num_heads=(2,)",
    "model.unet.transformer_layers_per_block=(1,)", "model.vae.block_out_channels=(16,)",
    "model.text_encoder.num_layers=1", "resolution=16", "train.batch_size=8",
)  # fmt: skip


def micro_config(mesh: str):
    """The micro config on `mesh` ("data=1,fsdp=2,tensor=1")."""
    config = run.apply_overrides(run.load_config(TINY), OVERRIDES)
    config.mesh.update(plan.parse_mesh(mesh))
    return config
