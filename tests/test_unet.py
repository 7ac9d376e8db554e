"""SD1.x UNet: parity with diffusers, decoupled cross-attention, strict conversion, golden tree, remat."""

import json
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from golden import check_golden, describe

from fireedit_jax.convert import core
from fireedit_jax.convert.unet import abstract_params, convert_unet, verify_unet
from fireedit_jax.models.unet import Attention, UNet, init_visual_from_text
from fireedit_jax.models.unet_config import UNetConfig

# Two tiny IP2P-shaped (8 input channels) diffusers UNets that differ in levels, head
# counts, layers per block, projection kind and transformer depth.
TINY = {
    "conv_proj": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),  # diffusers' name for the head count
        norm_num_groups=8,
        cross_attention_dim=32,
    ),
    "linear_proj": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 2, 1),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=24,
    ),
}
# linear_proj runs at an odd latent size (10 → 5 → 3 → 5 → 10): the upsampler then follows the skip sizes.
LATENT_SIZE = {"conv_proj": 8, "linear_proj": 10}


def _torch_unet(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(in_channels=8, out_channels=4, **{**TINY[name], **overrides}).eval()
    with torch.no_grad():  # move every norm and bias off its 1/0 init, so a swapped mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _saved(model, directory, safe=True):
    model.save_pretrained(directory, safe_serialization=safe)
    with open(directory / "config.json") as f:
        return core.load_state_dict(str(directory)), UNetConfig.from_diffusers(json.load(f))


@pytest.fixture(scope="module")
def conv_proj(tmp_path_factory):
    """(torch model, state dict, our config, converted params) of the first tiny UNet."""
    model = _torch_unet("conv_proj")
    state, config = _saved(model, tmp_path_factory.mktemp("conv_proj"))
    return model, state, config, convert_unet(state, config)


def _inputs(config, size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(batch, size, size, config.in_channels)).astype(np.float32),
        rng.uniform(0, 1000, size=batch).astype(np.float32),
        rng.normal(size=(batch, 7, config.cross_attention_dim)).astype(np.float32),
    )


# ------------------------------------------------------------------ parity with diffusers


def test_parity_conv_projection(conv_proj, highest_precision):
    model, _, config, params = conv_proj
    assert config.num_heads == (2, 4) and not config.use_linear_projection
    err = verify_unet(model, params, config, size=LATENT_SIZE["conv_proj"])
    print(f"conv_proj max abs err {err:.2e}")
    assert err <= 1e-4


def test_parity_linear_projection_odd_size(tmp_path, highest_precision):
    model = _torch_unet("linear_proj", seed=1)
    state, config = _saved(model, tmp_path)
    assert config.transformer_layers_per_block == (1, 2, 1) and config.use_linear_projection
    params = convert_unet(state, config)
    err = verify_unet(model, params, config, size=LATENT_SIZE["linear_proj"])
    print(f"linear_proj max abs err {err:.2e}")
    assert err <= 1e-4


def test_parity_text_addition_embedding(tmp_path, highest_precision):
    """addition_embed_type="text": the context attention-pooled into the time embedding, as diffusers'."""
    model = _torch_unet("conv_proj", seed=2, addition_embed_type="text", addition_embed_type_num_heads=4)
    state, config = _saved(model, tmp_path)
    assert config.addition_embed_type == "text" and config.addition_embed_type_num_heads == 4
    params = convert_unet(state, config)
    assert set(params["params"]["add_embedding"]) == {"norm1", "pool", "proj", "norm2"}
    err = verify_unet(model, params, config, size=LATENT_SIZE["conv_proj"])
    print(f"text addition embedding max abs err {err:.2e}")
    assert err <= 1e-4
    without = {"params": {k: v for k, v in params["params"].items() if k != "add_embedding"}}
    plain = UNetConfig(**{**config.__dict__, "addition_embed_type": None})
    assert verify_unet(model, without, plain, size=LATENT_SIZE["conv_proj"]) > 1e-2  # the pooled path counts


def test_parity_from_pickle(conv_proj, tmp_path, highest_precision):
    model, _, config, from_safetensors = conv_proj
    state, _ = _saved(model, tmp_path, safe=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    params = convert_unet(state, config)
    jax.tree.map(np.testing.assert_array_equal, params, from_safetensors)
    assert verify_unet(model, params, config, size=LATENT_SIZE["conv_proj"]) <= 1e-4


# ------------------------------------------------------------------ decoupled cross-attention


def _naive_attention(q, k, v, heads):
    """float[B, T, C] × float[B, S, C] → float[B, T, C], per head, in float64."""
    split = lambda x: x.reshape(*x.shape[:2], heads, -1).astype(np.float64)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs, v)
    return out.reshape(*out.shape[:2], -1)


@pytest.fixture(scope="module")
def attention_case():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 12, 16)).astype(np.float32)
    context = rng.normal(size=(2, 5, 24)).astype(np.float32)
    visual = rng.normal(size=(2, 3, 24)).astype(np.float32)
    params = Attention(heads=4, decoupled=True).init(jax.random.key(0), x, context, visual)
    params = flax.core.unfreeze(flax.linen.meta.unbox(params))
    params["params"]["to_out"]["bias"] = jnp.asarray(rng.normal(size=16), jnp.float32)
    plain = {"params": {k: v for k, v in params["params"].items() if not k.endswith("_ip")}}
    return x, context, visual, params, plain


def test_decoupled_without_visual_or_with_zero_scale_is_plain_attention(attention_case, highest_precision):
    x, context, visual, params, plain = attention_case
    want = np.asarray(Attention(heads=4).apply(plain, x, context))
    np.testing.assert_array_equal(Attention(heads=4, decoupled=True).apply(params, x, context), want)
    zero = Attention(heads=4, decoupled=True, visual_scale=0.0).apply(params, x, context, visual)
    np.testing.assert_array_equal(zero, want)
    one = Attention(heads=4, decoupled=True, visual_scale=1.0).apply(params, x, context, visual)
    assert np.max(np.abs(np.asarray(one) - want)) > 1e-2  # the branch does contribute


def test_decoupled_from_text_weights_scales_the_text_branch(attention_case, highest_precision):
    """K2/V2 = K1/V1 and visual = context: Z' = (1 + λ)·Attn(Q, K1, V1), then to_out."""
    x, context, _, params, _ = attention_case
    params = {"params": init_visual_from_text({"attn2": params["params"]})["attn2"]}
    p = jax.tree.map(np.asarray, params["params"])
    np.testing.assert_array_equal(p["to_k_ip"]["kernel"], p["to_k"]["kernel"])
    scale = 0.7
    text = _naive_attention(x @ p["to_q"]["kernel"], context @ p["to_k"]["kernel"], context @ p["to_v"]["kernel"], 4)
    want = ((1 + scale) * text) @ p["to_out"]["kernel"] + p["to_out"]["bias"]
    got = Attention(heads=4, decoupled=True, visual_scale=scale).apply(params, x, context, context)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_decoupled_unet_equals_plain_unet_without_visual(conv_proj, highest_precision):
    _, _, config, params = conv_proj
    decoupled = UNetConfig(**{**config.__dict__, "decoupled": True})
    both = init_visual_from_text(params)
    assert set(flax.traverse_util.flatten_dict(both)) == set(core.flat_shapes(abstract_params(decoupled)))
    sample, t, context = _inputs(config, LATENT_SIZE["conv_proj"])
    plain = jax.jit(UNet(config).apply)(params, sample, t, context)
    apply = jax.jit(UNet(decoupled).apply)
    np.testing.assert_array_equal(apply(both, sample, t, context), plain)
    visual = np.random.default_rng(1).normal(size=(2, 4, config.cross_attention_dim)).astype(np.float32)
    with_visual = np.asarray(apply(both, sample, t, context, visual))
    assert np.isfinite(with_visual).all() and np.max(np.abs(with_visual - plain)) > 1e-3
    with pytest.raises(ValueError, match="decoupled"):
        UNet(config).apply(params, sample, t, context, visual)


@pytest.mark.parametrize("addition", [None, "text"])
def test_zero_init_cross_out_starts_the_unet_unconditioned(conv_proj, addition):
    """zero_init_cross_out: at init the context does not reach the output (by cross-attention, or
    the text add embedding); without it, it does."""
    _, _, config, _ = conv_proj
    sample, t, context = _inputs(config, LATENT_SIZE["conv_proj"])
    other = np.random.default_rng(2).normal(size=context.shape).astype(np.float32)
    for zero in (True, False):
        unet = UNet(UNetConfig(**{**config.__dict__, "zero_init_cross_out": zero, "addition_embed_type": addition,
                                  "addition_embed_type_num_heads": 4}))  # fmt: skip
        params = flax.linen.meta.unbox(jax.jit(unet.init)(jax.random.key(0), sample, t, context))
        flat = flax.traverse_util.flatten_dict(params["params"], sep="/")
        zeroed = [v for k, v in flat.items() if k.endswith(("attn2/to_out/kernel", "add_embedding/norm2/scale"))]
        assert len(zeroed) == 4 + (addition is not None) and all(bool(jnp.all(v == 0)) == zero for v in zeroed)
        change = np.max(np.abs(np.asarray(unet.apply(params, sample, t, context) - unet.apply(params, sample, t, other))))
        assert (change == 0.0) if zero else (change > 1e-4), (zero, change)


# ------------------------------------------------------------------ strict conversion


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda s: s.pop("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
         "params/mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"),
        (lambda s: s.update({"down_blocks.0.resnets.7.conv1.weight": np.zeros((32, 32, 3, 3), np.float32)}),
         "down_blocks.0.resnets.7.conv1.weight"),
        (lambda s: s.update({"up_blocks.1.resnets.0.time_emb_proj.weight": np.zeros((32, 100), np.float32)}),
         "params/up_blocks_1/resnets_0/time_emb_proj/kernel (checkpoint (100, 32), model (128, 32))"),
    ],
    ids=["missing", "unexpected", "misshapen"],
)
def test_conversion_errors_name_the_key(conv_proj, edit, needle):
    state = dict(conv_proj[1])
    edit(state)
    with pytest.raises(core.ConversionError) as err:
        convert_unet(state, conv_proj[2])
    assert needle in str(err.value)


def test_decoupled_conversion_leaves_visual_branch_fresh(conv_proj):
    _, state, config, params = conv_proj
    converted = convert_unet(state, UNetConfig(**{**config.__dict__, "decoupled": True}))
    jax.tree.map(np.testing.assert_array_equal, converted, params)


def test_from_diffusers_names_unsupported_fields():
    config = dict(TINY["conv_proj"], class_embed_type="timestep", dropout=0.1, brand_new_option=3)
    with pytest.raises(ValueError) as err:
        UNetConfig.from_diffusers(config)
    for name in ("class_embed_type", "dropout", "brand_new_option"):
        assert name in str(err.value)


# ------------------------------------------------------------------ full size and remat


def test_sd15_ip2p_golden_tree():
    boxed = abstract_params(UNetConfig.sd15(in_channels=8))
    assert check_golden("unet_sd15_ip2p", boxed)["total_params"] == 859_532_484
    # The visual branch adds 2 × 768 × C per cross-attention: 5 at each of 320, 640, 1280 and the mid block's 1280.
    decoupled = describe(abstract_params(UNetConfig.sd15(in_channels=8, decoupled=True)))["total_params"]
    assert decoupled - 859_532_484 == 2 * 768 * (5 * (320 + 640 + 1280) + 1280)


def test_remat_matches(conv_proj, highest_precision):
    _, _, config, params = conv_proj
    sample, t, context = _inputs(config, LATENT_SIZE["conv_proj"], seed=2)

    def loss_and_grad(cfg):
        loss = lambda p: jnp.mean(UNet(cfg).apply(p, sample, t, context) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grad(config)
    loss_remat, grads_remat = loss_and_grad(UNetConfig(**{**config.__dict__, "remat": True}))
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_remat, grads)


# ------------------------------------------------------------------ gated injection (GLIGEN's gated self-attention, or cross-attention)


def _fuser_params(reference) -> dict:
    """A torch fuser's state dict → our GatedInjection params, named as inside a block, so the
    key mapping is the UNet's."""
    from fireedit_jax.convert.unet import flax_path

    flat = {}
    for key, value in reference.state_dict().items():
        path, transform = flax_path(f"fuser.{key}", value.ndim)
        flat[tuple(path[2:])] = np.asarray(transform(value.numpy()))
    return flax.traverse_util.unflatten_dict(flat)


class _GatedCrossAttention(torch.nn.Module):
    """The "cross" layer from diffusers' parts: x + tanh(α)·Attention(LayerNorm(x), Linear(objs))."""

    def __init__(self, query_dim, context_dim, heads, dim_head):
        from diffusers.models.attention_processor import Attention as DiffusersAttention

        super().__init__()
        self.linear = torch.nn.Linear(context_dim, query_dim)
        self.norm1 = torch.nn.LayerNorm(query_dim)
        self.attn = DiffusersAttention(query_dim=query_dim, heads=heads, dim_head=dim_head)
        self.register_parameter("alpha_attn", torch.nn.Parameter(torch.tensor(0.0)))

    def forward(self, x, objs):
        return x + self.alpha_attn.tanh() * self.attn(self.norm1(x), encoder_hidden_states=self.linear(objs))


@pytest.mark.parametrize("layer", ["self", "cross"])
def test_gated_injection_matches_reference(layer, highest_precision):
    """GatedInjection against diffusers' GatedSelfAttentionDense ("self") and against the gated
    cross-attention built from diffusers' Attention ("cross"); random weights, gates moved off 0."""
    from diffusers.models.attention import GatedSelfAttentionDense

    from fireedit_jax.models.unet import GatedInjection

    torch.manual_seed(0)
    if layer == "self":
        reference = GatedSelfAttentionDense(query_dim=16, context_dim=24, n_heads=4, d_head=4).eval()
    else:
        reference = _GatedCrossAttention(query_dim=16, context_dim=24, heads=4, dim_head=4).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = _fuser_params(reference)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 16)).astype(np.float32)
    objs = rng.normal(size=(2, 5, 24)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x), torch.from_numpy(objs)).numpy()
    got = GatedInjection(heads=4, layer=layer).apply({"params": params}, x, objs)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    print(f"gated {layer} injection max abs err {err:.2e}")
    assert err <= 1e-4 and np.max(np.abs(want - x)) > 1e-2  # the gates are open: the layer does something


def test_parity_gligen_unet(tmp_path, highest_precision):
    """A diffusers UNet with attention_type="gated" converts (fusers and their gates; position_net
    ignored) and matches UNet2DConditionModel given the same grounding tokens."""
    model = _torch_unet("conv_proj", seed=4, attention_type="gated")
    state, config = _saved(model, tmp_path)
    assert config.gated_injection and any(".fuser.alpha_attn" in k for k in state)
    params = convert_unet(state, config)
    fusers = [p for p in flax.traverse_util.flatten_dict(params) if "fuser" in p]
    assert fusers and all(not any(k.startswith("position_net") for k in p) for p in fusers)
    err = verify_unet(model, params, config, size=LATENT_SIZE["conv_proj"])
    print(f"GLIGEN UNet max abs err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("layer", ["self", "cross"])
def test_gated_injection_closed_gates_is_the_plain_unet_bit_for_bit(layer, conv_proj):
    """An SD/IP2P checkpoint into a gated UNet: the fusers are left to a fresh init (declared fresh);
    with φ = 0 the output equals the plain UNet's exactly, with grounding or without; opened gates change it."""
    _, state, config, params = conv_proj
    gated = UNetConfig(**{**config.__dict__, "gated_injection": True, "injection_layer": layer})
    converted = convert_unet(state, gated)  # no fuser in the checkpoint: fresh, not an error
    assert not any("fuser" in p for p in flax.traverse_util.flatten_dict(converted))
    sample, t, context = _inputs(config, LATENT_SIZE["conv_proj"])
    unet = UNet(gated)
    fresh = flax.linen.meta.unbox(jax.jit(unet.init)(jax.random.key(1), sample, t, context))
    full = flax.traverse_util.unflatten_dict(
        {**flax.traverse_util.flatten_dict(fresh), **flax.traverse_util.flatten_dict(params)}
    )
    grounding = np.random.default_rng(5).normal(size=(2, 6, config.cross_attention_dim)).astype(np.float32)
    plain = np.asarray(jax.jit(UNet(config).apply)(params, sample, t, context))
    apply = jax.jit(unet.apply)
    np.testing.assert_array_equal(np.asarray(apply(full, sample, t, context, None, grounding)), plain)
    np.testing.assert_array_equal(np.asarray(apply(full, sample, t, context)), plain)
    opened = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 if "alpha" in jax.tree_util.keystr(path) else x, full
    )
    moved = np.asarray(apply(opened, sample, t, context, None, grounding))
    assert np.max(np.abs(moved - plain)) > 1e-3
    with pytest.raises(ValueError, match="gated"):
        UNet(config).apply(params, sample, t, context, None, grounding)
