"""HVCA against a torch re-implementation of its documented equations (IP-Adapter Plus' Resampler layout)."""

import math

import flax
import jax
import numpy as np
import pytest
import torch
from golden import check_golden

from fireedit_jax.models.hvca import HVCA, HVCAConfig, example_inputs

TINY = HVCAConfig(num_queries=3, num_blocks=2, visual_dim=12, edit_dim=10, hidden=32, num_heads=4, out_dim=20)


# ---------------------------------------------------------------------------- reference in torch


class PerceiverAttention(torch.nn.Module):
    """IP-Adapter's PerceiverAttention (packed to_kv, split 1/⁴√H scaling), plus a key mask."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x, latents, mask=None):
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, dim = latents.shape
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        heads = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.to_q(latents)), heads(k), heads(v)
        scale = 1 / math.sqrt(math.sqrt(dim // self.heads))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        if mask is not None:
            keep = torch.cat([mask, torch.ones(b, length, dtype=torch.bool)], dim=1)
            weight = weight.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = torch.softmax(weight, dim=-1) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, length, -1))


class ReferenceHVCA(torch.nn.Module):
    def __init__(self, cfg: HVCAConfig):
        super().__init__()
        d = cfg.hidden
        self.latents = torch.nn.Parameter(torch.randn(1, cfg.num_queries, d) / d**0.5)
        self.visual_proj_in = torch.nn.Linear(cfg.visual_dim, d)
        self.edit_proj_in = torch.nn.Linear(cfg.edit_dim, d)
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleList([
                PerceiverAttention(d, cfg.num_heads),
                PerceiverAttention(d, cfg.num_heads),
                torch.nn.Sequential(
                    torch.nn.LayerNorm(d),
                    torch.nn.Linear(d, cfg.ffn_mult * d, bias=False),
                    torch.nn.GELU(),
                    torch.nn.Linear(cfg.ffn_mult * d, d, bias=False),
                ),
            ])
            for _ in range(cfg.num_blocks)
        )
        self.proj_out = torch.nn.Linear(d, cfg.out_dim)
        self.norm_out = torch.nn.LayerNorm(cfg.out_dim)

    def forward(self, visual, visual_mask, edit):
        latents = self.latents.repeat(len(visual), 1, 1)
        visual, edit = self.visual_proj_in(visual), self.edit_proj_in(edit)
        for visual_attention, edit_attention, ffn in self.blocks:
            latents = visual_attention(visual, latents, visual_mask) + latents
            latents = edit_attention(edit, latents) + latents
            latents = ffn(latents) + latents
        return self.norm_out(self.proj_out(latents))


def load_into_torch(params, cfg: HVCAConfig) -> ReferenceHVCA:
    p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params["params"])
    ref = ReferenceHVCA(cfg).eval()

    def copy(module, ours):
        module.weight.data = ours["kernel"].T.contiguous() if "kernel" in ours else ours["scale"]
        if "bias" in ours:
            module.bias.data = ours["bias"]

    ref.latents.data = p["latents"][None]
    for name in ("visual_proj_in", "edit_proj_in", "proj_out", "norm_out"):
        copy(getattr(ref, name), p[name])
    for i, (visual_attention, edit_attention, ffn) in enumerate(ref.blocks):
        ours = p[f"blocks_{i}"]
        for module, attn in ((visual_attention, ours["visual_attention"]), (edit_attention, ours["edit_attention"])):
            copy(module.norm1, attn["norm_context"])
            copy(module.norm2, attn["norm_latents"])
            copy(module.to_q, attn["attention"]["query"])
            module.to_kv.weight.data = torch.cat([attn["attention"][n]["kernel"].T for n in ("key", "value")])
            copy(module.to_out, attn["attention"]["output"])
        copy(ffn[0], ours["ffn_norm"])
        copy(ffn[1], ours["ffn_in"])
        copy(ffn[3], ours["ffn_out"])
    return ref


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def params():
    """Initialised params with random norms and biases, so swapped or dropped ones would show."""
    boxed = jax.jit(HVCA(TINY).init)(jax.random.key(0), *example_inputs(TINY, batch=2, visual_tokens=7, edit_tokens=5))
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(boxed))
    keys = jax.random.split(jax.random.key(1), len(flat))
    return flax.traverse_util.unflatten_dict({
        path: leaf + 0.1 * jax.random.normal(key, leaf.shape) if leaf.ndim == 1 else leaf
        for key, (path, leaf) in zip(keys, flat.items())
    })


@pytest.fixture(scope="module")
def forward():
    return jax.jit(HVCA(TINY).apply)


def _inputs(batch=2, visual_tokens=7, edit_tokens=5):
    rng = np.random.default_rng(0)
    visual = rng.normal(size=(batch, visual_tokens, TINY.visual_dim)).astype(np.float32)
    edit = rng.normal(size=(batch, edit_tokens, TINY.edit_dim)).astype(np.float32)
    mask = np.ones((batch, visual_tokens), bool)
    mask[1, 4:] = False
    return visual, mask, edit


def test_matches_torch_reference_with_mask(params, forward, highest_precision):
    visual, mask, edit = _inputs()
    ref = load_into_torch(params, TINY)
    for m in (mask, None):
        with torch.no_grad():
            torch_mask = None if m is None else torch.from_numpy(m)
            want = ref(torch.from_numpy(visual), torch_mask, torch.from_numpy(edit)).numpy()
        got = np.asarray(forward(params, visual, m, edit))
        assert got.shape == (2, TINY.num_queries, TINY.out_dim)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_masked_visual_tokens_do_not_matter(params, forward, highest_precision):
    visual, mask, edit = _inputs()
    out = np.asarray(forward(params, visual, mask, edit))
    perturbed = visual.copy()
    perturbed[1, 4:] += 10.0 * np.random.default_rng(1).normal(size=perturbed[1, 4:].shape)
    np.testing.assert_allclose(np.asarray(forward(params, perturbed, mask, edit)), out, atol=1e-6)
    # A masked token acts as an absent one.
    np.testing.assert_allclose(np.asarray(forward(params, visual[1:, :4], None, edit[1:]))[0], out[1], atol=1e-5)
    # With every visual token masked the queries still attend to themselves: finite output.
    assert np.all(np.isfinite(np.asarray(forward(params, visual, np.zeros_like(mask), edit))))


def test_output_depends_on_visual_and_edit_features(params, forward):
    visual, mask, edit = _inputs()
    out = np.asarray(forward(params, visual, mask, edit))
    other_visual = np.asarray(forward(params, visual + 1.0, mask, edit))
    other_edit = np.asarray(forward(params, visual, mask, edit[::-1].copy() + 1.0))
    assert np.min(np.max(np.abs(other_visual - out), axis=(1, 2))) > 1e-2
    assert np.min(np.max(np.abs(other_edit - out), axis=(1, 2))) > 1e-2


def test_fireedit_golden_tree():
    config = HVCAConfig.fireedit()
    tree = jax.eval_shape(HVCA(config).init, jax.random.key(0), *example_inputs(config))
    # CLIP-L and DINOv2-L at 224 and 448: 2 × (257 + 1025) tokens.
    inputs = example_inputs(config, batch=2, visual_tokens=2564)
    assert jax.eval_shape(HVCA(config).apply, tree, *inputs).shape == (2, 16, 768)
    got = check_golden("hvca_fireedit", tree)
    assert got["total_params"] == sum(p.numel() for p in ReferenceHVCA(config).parameters()) == 36_217_088
