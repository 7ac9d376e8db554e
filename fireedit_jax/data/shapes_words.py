"""ShapeEdit's instruction language: the templates, the position and size words, the vocabulary
and its word-level tokenizer.

Every instruction the generator (data/shapes.py) writes is a template filled with words of
`vocabulary()`; `check_instruction` refuses any other word (the tokenizer would map it to
<unk>).
"""

from __future__ import annotations

import re

from fireedit_jax.data.shapes_render import COLOURS, SHAPES, SIZES

# Position words: (axis, +1 for the largest coordinate); the edge compared besides the centre.
POSITIONS = {"leftmost": (0, -1), "rightmost": (0, 1), "top": (1, -1), "bottom": (1, 1)}
DIRECTIONS = ("left", "right", "above", "below")
CORNERS = ("top left", "top right", "bottom left", "bottom right")

COLOUR_TEMPLATES = ("make {ref} {colour}", "paint {ref} {colour}", "change the colour of {ref} to {colour}")
SHAPE_TEMPLATES = ("turn {ref} into a {shape}", "change {ref} into a {shape}", "make {ref} a {shape}")
REMOVE_TEMPLATES = ("remove {ref}", "delete {ref}", "erase {ref}", "take away {ref}")
ADD_TEMPLATES = ("add a {new} {place}", "put a {new} {place}", "draw a {new} {place}")
PLACE_TEMPLATES = {
    "left": "to the left of {ref}",
    "right": "to the right of {ref}",
    "above": "above {ref}",
    "below": "below {ref}",
    **{corner: f"in the {corner} corner" for corner in CORNERS},
}
SIZE_WORDS = {"comparative": ("bigger", "smaller"), "superlative": ("biggest", "smallest")}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def vocabulary() -> list[str]:
    """Every word an instruction can contain, in a fixed order."""
    texts = [*COLOUR_TEMPLATES, *SHAPE_TEMPLATES, *REMOVE_TEMPLATES, *ADD_TEMPLATES, *PLACE_TEMPLATES.values()]
    words = [w for text in texts for w in re.sub(r"\{\w+\}", " ", text).split()]
    words += ["the", "object", *COLOURS, *SHAPES, *SIZES, *POSITIONS, *(w for ws in SIZE_WORDS.values() for w in ws)]
    return list(dict.fromkeys(words))


_WORD = re.compile(r"\w+|[^\w\s]+")  # the `Whitespace` pre-tokenizer's split


def check_instruction(text: str) -> list[str]:
    """The instruction's (lowercased) words; ValueError naming unknown words and listing the known ones."""
    words = _WORD.findall(text.lower())
    known = set(vocabulary())
    unknown = [w for w in dict.fromkeys(words) if w not in known]
    if unknown:
        raise ValueError(
            f"instruction {text!r} has word(s) outside the ShapeEdit vocabulary: {', '.join(unknown)}. "
            f"Known words: {', '.join(vocabulary())}"
        )
    return words


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `vocabulary()`: lowercasing, whitespace
    split, <s> … </s> added; ids 0-3 are <pad>, <unk>, <s>, </s>. Save it with `save_pretrained(dir)`,
    load it with `transformers.AutoTokenizer.from_pretrained(dir)`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos
    )
