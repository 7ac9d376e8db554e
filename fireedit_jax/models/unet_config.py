"""The SD1.x UNet's dimensions (`UNetConfig`, models/unet.py builds the network from it) and
which diffusers UNet2DConditionModel configs it reads (`UNetConfig.from_diffusers` names every
field set to something the UNet does not implement).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"

# diffusers UNet2DConditionModel fields we do not model, with the only value we accept.
_FIXED_DIFFUSERS_FIELDS = {
    "center_input_sample": False,
    "mid_block_type": CROSS_MID,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
# Fields that change nothing here: the nominal sample size; upcast_attention (our
# attention already takes scores and softmax in float32).
_INERT_DIFFUSERS_FIELDS = ("sample_size", "upcast_attention")
ADDITION_EMBED_TYPES = (None, "text")
ATTENTION_TYPES = ("default", "gated")  # diffusers' names; "gated" = gated_injection, injection_layer "self"
INJECTION_LAYERS = ("self", "cross")


def _per_level(value, levels: int, name: str) -> tuple:
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries for {levels} levels: {values}")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Dimensions of an SD1.x UNet; defaults are Stable Diffusion 1.5's.

    Per-level fields take an int (every level) or one value per level, listed
    from the highest resolution down; the up path uses them reversed, the mid
    block uses the last. `num_heads` is a head COUNT: diffusers' SD1.x configs
    store it under the misnamed `attention_head_dim`.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    num_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False  # False: 1×1 conv proj_in/proj_out (SD1.5)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    remat: bool = False  # rematerialise each resnet / transformer block in the backward pass
    decoupled: bool = False  # add the visual branch (to_k_ip, to_v_ip) to every cross-attention
    visual_scale: float = 1.0  # λ
    # "text": diffusers' TextTimeEmbedding, the context attention-pooled into the time
    # embedding (DeepFloyd IF's; a global path for the condition beside cross-attention)
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    # Cross-attentions' to_out (and the add embedding's last norm scale) start at zero
    # (adapter style): a UNet trained from scratch then starts unconditioned instead of
    # learning to suppress its random condition.
    zero_init_cross_out: bool = False
    # A gated layer in every transformer block reading grounding tokens (float[B, G,
    # cross_attention_dim], the mask encoder's); tanh gates start at zero. injection_layer:
    # "self" (GLIGEN's gated self-attention + FF) or "cross" (a gated cross-attention to G).
    gated_injection: bool = False
    injection_layer: str = "self"

    def __post_init__(self):
        levels = len(self.block_out_channels)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("block_out_channels", tuple(self.block_out_channels))
        for name in ("layers_per_block", "num_heads", "transformer_layers_per_block"):
            set_(name, _per_level(getattr(self, name), levels, name))
        for name, allowed in (("down_block_types", (CROSS_DOWN, PLAIN_DOWN)), ("up_block_types", (CROSS_UP, PLAIN_UP))):
            types = _per_level(getattr(self, name), levels, name)
            unknown = [t for t in types if t not in allowed]
            if unknown:
                raise ValueError(f"{name}: unsupported block types {unknown}; supported: {allowed}")
            set_(name, types)
        if self.injection_layer not in INJECTION_LAYERS:
            raise ValueError(f"injection_layer={self.injection_layer!r}; supported: {INJECTION_LAYERS}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r}; supported: {ADDITION_EMBED_TYPES}")
        if self.addition_embed_type and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must divide into "
                             f"addition_embed_type_num_heads={self.addition_embed_type_num_heads}")  # fmt: skip
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.num_heads)):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"level {level}: {channels} channels must divide into {heads} heads "
                    f"and {self.norm_num_groups} norm groups"
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def sd15(cls, in_channels: int = 8, **overrides) -> UNetConfig:
        """Stable Diffusion 1.5; in_channels=8 is InstructPix2Pix (noisy latent ‖ image latent)."""
        return cls(in_channels=in_channels, **overrides)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **ours) -> UNetConfig:
        """From a diffusers UNet2DConditionModel config dict (its config.json).

        Raises ValueError naming every field set to something this UNet does not
        implement. `ours` sets our own fields (remat, decoupled, visual_scale).
        """
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        problems = [
            f"{k}={config[k]!r} (supported: {v!r})"
            for k, v in _FIXED_DIFFUSERS_FIELDS.items()
            if k in config and _normalise(config[k]) != v
        ]
        cross_dim = config.get("cross_attention_dim", cls.cross_attention_dim)
        if not isinstance(cross_dim, int):
            if len(set(cross_dim)) != 1:
                problems.append(f"cross_attention_dim={cross_dim!r} (one width for every level)")
            cross_dim = cross_dim[0]
        if config.get("attention_type", "default") not in ATTENTION_TYPES:
            problems.append(f"attention_type={config['attention_type']!r} (supported: {ATTENTION_TYPES})")
        if config.get("norm_num_groups", 32) is None:
            problems.append("norm_num_groups=None (GroupNorm is required)")
        names = {f.name for f in dataclasses.fields(cls)}
        known = names | set(_FIXED_DIFFUSERS_FIELDS) | set(_INERT_DIFFUSERS_FIELDS)
        known |= {"attention_head_dim", "attention_type"}
        problems += [f"{k} (unknown field)" for k in sorted(set(config) - known)]
        if problems:
            raise ValueError("unsupported UNet2DConditionModel config: " + "; ".join(problems))
        kwargs = {k: _normalise(v) for k, v in config.items() if k in names}
        kwargs["cross_attention_dim"] = cross_dim
        kwargs["gated_injection"] = config.get("attention_type", "default") == "gated"
        if "attention_head_dim" in config:
            kwargs["num_heads"] = _normalise(config["attention_head_dim"])
        return cls(**{**kwargs, **ours})


def _normalise(value):
    """JSON lists → tuples, so configs compare and hash."""
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value
