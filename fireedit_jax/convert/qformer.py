"""Q-Former state dicts (transformers BLIP-2, LAVIS, SmartEdit) → our QFormer params (models/qformer.py).

Accepted layouts, detected from the embedding LayerNorm's key:

  layout                                  module prefix     query tokens       naming
  SmartEdit (DS_SmartEdit_model.py)       sd_qformer.       sd_query_tokens    LAVIS BERT
  LAVIS BLIP-2 (Blip2Base.init_Qformer)   Qformer.bert.     query_tokens       LAVIS BERT
  transformers Blip2Model & co.           qformer.          query_tokens       transformers
  a Blip2QFormerModel's own state dict    (none)            query_tokens       transformers
     (it has no query tokens: add them under `query_tokens`)

Keys outside the module prefix (vision tower, LLM, mm_projector, …) and the text-only
parts of a BERT Q-Former (word/position embeddings, the text FFN `intermediate` /
`output`, pooler) are ignored; every Q-Former parameter must be present.

`sd_qformer.encoder.layer.2.crossattention.self.key.weight` → params/layers_2/cross_attention/key/kernel
(transposed), `qformer.encoder.layer.0.output_query.LayerNorm.weight` → params/layers_0/ffn_norm/scale,
`qformer.layernorm.bias` → params/embed_norm/bias, `query_tokens` [1, Q, D] → params/query_tokens [Q, D].
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np

from fireedit_jax.convert import core
from fireedit_jax.models.qformer import QFormer, QFormerConfig, example_inputs

TRANSFORMERS, LAVIS = 0, 1

# Our module path under layers_{i} ← (transformers, LAVIS / SmartEdit) module name under encoder.layer.{i}.
_LAYER_NAMES = {
    ("self_attention", "query"): ("attention.attention.query", "attention.self.query"),
    ("self_attention", "key"): ("attention.attention.key", "attention.self.key"),
    ("self_attention", "value"): ("attention.attention.value", "attention.self.value"),
    ("self_attention", "output"): ("attention.output.dense", "attention.output.dense"),
    ("self_attention_norm",): ("attention.output.LayerNorm", "attention.output.LayerNorm"),
    ("cross_attention", "query"): ("crossattention.attention.query", "crossattention.self.query"),
    ("cross_attention", "key"): ("crossattention.attention.key", "crossattention.self.key"),
    ("cross_attention", "value"): ("crossattention.attention.value", "crossattention.self.value"),
    ("cross_attention", "output"): ("crossattention.output.dense", "crossattention.output.dense"),
    ("cross_attention_norm",): ("crossattention.output.LayerNorm", "crossattention.output.LayerNorm"),
    ("ffn_in",): ("intermediate_query.dense", "intermediate_query.dense"),
    ("ffn_out",): ("output_query.dense", "output_query.dense"),
    ("ffn_norm",): ("output_query.LayerNorm", "output_query.LayerNorm"),
}
# Our top-level module ← (transformers, LAVIS / SmartEdit) module name.
_TOP_NAMES = {
    ("embed_norm",): ("layernorm", "embeddings.LayerNorm"),
}
# Text-only parts of a BERT Q-Former (under the module prefix), unused for query tokens.
_TEXT_ONLY = (
    r"^embeddings\.(word_embeddings|position_embeddings)\.",
    r"^embeddings\.position_ids$",
    r"^encoder\.layer\.\d+\.(intermediate|output)\.",
    r"^pooler\.",
)
# Fields that change the weights or the outputs; dropout does neither at inference.
_ARCHITECTURE = ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "cross_attention_freq", "encoder_width", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    prefix: str
    query_tokens: str
    naming: int  # TRANSFORMERS or LAVIS

    @property
    def marker(self) -> str:
        """The key whose presence identifies the layout: the embedding LayerNorm's weight."""
        return f"{self.prefix}{_TOP_NAMES[('embed_norm',)][self.naming]}.weight"


LAYOUTS = (
    Layout("SmartEdit", "sd_qformer.", "sd_query_tokens", LAVIS),
    Layout("LAVIS BLIP-2", "Qformer.bert.", "query_tokens", LAVIS),
    Layout("transformers Blip2Model", "qformer.", "query_tokens", TRANSFORMERS),
    Layout("transformers Blip2QFormerModel", "", "query_tokens", TRANSFORMERS),
)


def detect_layout(state) -> Layout:
    for layout in LAYOUTS:
        if layout.marker in state:
            return layout
    raise core.ConversionError(
        "not a Q-Former checkpoint: none of " + ", ".join(repr(l.marker) for l in LAYOUTS) + " is in it"
    )


def flax_path(key: str, ndim: int, layout: Layout) -> tuple[tuple[str, ...], core.Transform] | None:
    """A source key → (our param path, transform), or None if it names nothing we know."""
    if key == layout.query_tokens:
        return ("params", "query_tokens"), lambda w: w.reshape(w.shape[-2:])
    if not key.startswith(layout.prefix):
        return None
    match = re.fullmatch(r"(?:encoder\.layer\.(\d+)\.)?(.+)\.(weight|bias)", key[len(layout.prefix):])
    if match is None:
        return None
    layer, module, leaf = match.groups()
    table = _LAYER_NAMES if layer is not None else _TOP_NAMES
    ours = {names[layout.naming]: path for path, names in table.items()}.get(module)
    if ours is None:
        return None
    path = ("params", *((f"layers_{layer}",) if layer is not None else ()), *ours)
    if leaf == "bias":
        return (*path, "bias"), core.identity
    return ((*path, "kernel"), core.linear) if ndim == 2 else ((*path, "scale"), core.identity)


def abstract_params(config: QFormerConfig):
    """The boxed parameter tree as shapes only (nothing is allocated)."""
    return jax.eval_shape(QFormer(config).init, jax.random.key(0), *example_inputs(config))


def convert_qformer(state, config: QFormerConfig) -> dict:
    """A Q-Former state dict in any accepted layout → our QFormer {"params": ...}.

    Strict: raises `core.ConversionError` naming every unexpected key under the Q-Former's
    prefix, every parameter without a source key (e.g. cross-attention in a layer the
    checkpoint lacks it) and every shape mismatch.
    """
    layout = detect_layout(state)
    outside = () if not layout.prefix else (rf"^(?!{re.escape(layout.prefix)}|{re.escape(layout.query_tokens)}$)",)
    ignore = outside + tuple(rf"^{re.escape(layout.prefix)}{pattern.lstrip('^')}" for pattern in _TEXT_ONLY)
    return core.convert(
        state,
        lambda key, value: flax_path(key, np.ndim(value), layout),
        abstract_params(config),
        ignore=ignore,
        what=f"{layout.name} Q-Former checkpoint",
    )


def load_qformer(path: str, config: QFormerConfig) -> dict:
    """A weights file (or directory holding one) in any accepted layout → our params."""
    return convert_qformer(core.load_state_dict(path), config)


def _torch_qformer(torch_model):
    """(transformers Blip2QFormerModel, its query tokens or None) of a model or directory."""
    if isinstance(torch_model, str):
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(torch_model, local_files_only=True)
        architecture = (hf_config.architectures or ["Blip2QFormerModel"])[0]
        torch_model = getattr(transformers, architecture).from_pretrained(torch_model, local_files_only=True)
    torch_model = torch_model.float().eval()
    return getattr(torch_model, "qformer", torch_model), getattr(torch_model, "query_tokens", None)


def verify_qformer(torch_model, params, config: QFormerConfig, seed: int = 0, *, batch: int = 2,
                   length: int = 32) -> float:
    """Max abs difference of the last hidden state between transformers and ours.

    Args:
      torch_model: a transformers Blip2QFormerModel, a model holding one as `.qformer` with
        `.query_tokens` (Blip2Model, Blip2ForConditionalGeneration, …), or a directory saved
        by one. A bare Blip2QFormerModel has no query tokens: ours are fed to it, so then
        the check covers the transformer, not the tokens.
      params: our converted params ({"params": ...}).
    Random encoder states; row i attends to its first length − 5i positions.
    """
    import torch

    module, query_tokens = _torch_qformer(torch_model)
    theirs = QFormerConfig.from_hf(module.config.to_dict(), num_queries=config.num_queries)
    core.check_config("the torch Q-Former", {f: (getattr(theirs, f), getattr(config, f)) for f in _ARCHITECTURE})
    if query_tokens is None:
        query_tokens = torch.from_numpy(np.asarray(params["params"]["query_tokens"])[None])
    rng = np.random.default_rng(seed)
    states = rng.normal(size=(batch, length, config.encoder_width)).astype(np.float32)
    mask = np.arange(length)[None, :] < np.maximum(length - 5 * np.arange(batch), 1)[:, None]
    with torch.no_grad():
        want = module(
            query_embeds=query_tokens.float().expand(batch, -1, -1),
            encoder_hidden_states=torch.from_numpy(states),
            encoder_attention_mask=torch.from_numpy(mask).long(),
        ).last_hidden_state.numpy()
    with jax.default_matmul_precision("highest"):
        got = _forward(config)(params, states, mask)
    return float(np.max(np.abs(np.asarray(got) - want)))


@functools.lru_cache(maxsize=8)
def _forward(config: QFormerConfig):
    """One jitted forward per config, so repeated checks trace and compile once."""
    return jax.jit(QFormer(config).apply)
