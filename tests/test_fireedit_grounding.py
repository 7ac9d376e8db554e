"""FireEdit's own grounding (configs/shapes_grounded.py:fireedit): its VLM's final states score the
proposal boxes (the region tokens) and the cells (the image tokens); the grounded loss trains it in the
same pass as FireEdit's mask-guided losses, and a checkpoint with it finds where to edit by itself."""

import flax
import jax
import numpy as np
from PIL import Image

from fireedit_jax.models.fireedit import EditModel
from fireedit_jax.pipeline import Editor
from fireedit_jax.train import flops, inputs, losses
from fireedit_jax.train.run import load_config

CONFIG = "configs/shapes_grounded.py:fireedit"
INSTRUCTION = "make the red circle blue"


def test_grounding_trains_in_fireedits_pass_and_finds_the_region(tmp_path):
    """One grounded loss on two ShapeEdit pairs: its parts hold FireEdit's (VLM, diffusion) and the
    grounding's terms, and the gradient reaches the grounding head and, through its states, the VLM.
    Saved, the same weights make a checkpoint whose Editor finds the region with the grounding (the
    edit under a found region is the region model's, tests/test_grounded_edit.py)."""
    from fireedit_jax import checkpoint
    from fireedit_jax.data import shapes

    config = load_config(CONFIG)
    model = EditModel.from_config(config.model)
    assert model.grounding is not None and model.region is None
    tokenizer = inputs.make_tokenizer(config.data.tokenizer)
    transform = inputs.make_transform(config, model, tokenizer)
    batch = inputs.model_batch(next(inputs.make_train_iterator(config, transform, batch_size=2)),
                               flops.loss_inputs(config))  # fmt: skip
    params = jax.tree.map(np.asarray, flax.linen.meta.unbox(jax.jit(model.init)(jax.random.key(0))))
    loss_fn = losses.LOSSES["grounded"](model, config)
    grad_fn = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.split(jax.random.key(1), 2)), has_aux=True))
    grads, parts = grad_fn(params)
    assert {"vlm", "diffusion", "grounding"} <= set(parts) and all(np.isfinite(float(v)) for v in parts.values())
    norm = lambda tree: float(sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(tree)))  # noqa: E731
    assert norm(grads["grounding"]) > 0 and norm(grads["vlm"]) > 0

    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    checkpoint.save(str(tmp_path / "ckpt"), params, config, tokenizer_dir=str(tmp_path / "tokenizer"))
    editor = Editor.from_pretrained(str(tmp_path / "ckpt"))
    assert editor.region_head == "grounding" and editor.default_method == "region"
    sample = shapes.generate(shapes.ShapesConfig(size=32), "test", 3)
    image = Image.fromarray(sample["source"]).resize((300, 200), Image.NEAREST)
    (region,) = editor.find_regions([image], [INSTRUCTION], boxes=[sample["boxes"]])
    assert region.shape == (200, 300) and 0 < region.mean() < 1  # at the image's own size, a part of it
