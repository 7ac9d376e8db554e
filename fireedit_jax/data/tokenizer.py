"""The LLM tokenizer (LLaMA / Vicuna / LLaVA) extended with FireEdit's new tokens.

New tokens, in id order after the base vocabulary V (ids V … V+35):
  <image>      placeholder: each of the image tokens' positions (its embedding is
               replaced by an adapter output, so its row never matters)
  <region>     placeholder: each region token's position (replaced by a region feature)
  <im_start>   delimiter before the image tokens (a trained row)
  <im_end>     delimiter after the image tokens (a trained row)
  [IMG_1] … [IMG_32]   the learnable tokens whose final hidden states are e (32 × D);
               last, so `id >= ids.img[0]` finds them
That is the minimal set the template `USER: <im_start><image>…<im_end> <region>… {instruction}
ASSISTANT: [IMG_1]…[IMG_32]` needs. Their rows are the model's `new_embed` / `new_lm_head`
(models/llama.py), so the tokenizer must give them exactly ids V, V+1, …
"""

from __future__ import annotations

import dataclasses
import os

from fireedit_jax.vlm_tokens import NEW_TOKENS

# A tokenizer directory needs one of these (tokenizer.model needs sentencepiece to load).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class NewTokenIds:
    image: int
    region: int
    im_start: int
    im_end: int
    img: tuple[int, ...]  # [IMG_1] … [IMG_32]


def load_tokenizer(directory: str, vocab_size: int):
    """Loads a transformers tokenizer from a local directory and adds `NEW_TOKENS`.

    Args:
      directory: holds tokenizer.json or tokenizer.model (+ tokenizer_config.json),
        e.g. a Vicuna / LLaVA checkpoint or one of our own checkpoints (already extended).
      vocab_size: the LLM's base vocabulary V (its embedding rows).
    Returns:
      (tokenizer, NewTokenIds).
    Raises:
      FileNotFoundError naming the missing files; ValueError if the ids do not
      continue the model's vocabulary.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    if not any(os.path.exists(os.path.join(directory, name)) for name in _VOCAB_FILES):
        raise FileNotFoundError(
            f"tokenizer directory {directory!r} has neither {' nor '.join(_VOCAB_FILES)} "
            f"(found: {sorted(os.listdir(directory)) or 'nothing'})"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise ValueError(f"cannot load the tokenizer in {directory!r}: {error}") from error
    return tokenizer, add_new_tokens(tokenizer, vocab_size)


def add_new_tokens(tokenizer, vocab_size: int) -> NewTokenIds:
    """Adds `NEW_TOKENS` (as special tokens, never split) unless present; checks they take ids V, V+1, ….

    Raises ValueError if len(tokenizer) != V + len(NEW_TOKENS) afterwards or an id is
    off, e.g. a llava-hf tokenizer (32002 tokens) for a model with 32064 embedding rows.
    """
    tokenizer.add_tokens(list(NEW_TOKENS), special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(NEW_TOKENS))
    want = list(range(vocab_size, vocab_size + len(NEW_TOKENS)))
    if len(tokenizer) != vocab_size + len(NEW_TOKENS) or ids != want:
        raise ValueError(
            f"the tokenizer does not fit the model: it has {len(tokenizer)} tokens with the "
            f"{len(NEW_TOKENS)} new ones at ids {ids[0]}…{ids[-1]}, the model expects "
            f"{vocab_size} + {len(NEW_TOKENS)} tokens with the new ones at {want[0]}…{want[-1]}"
        )
    image, region, im_start, im_end, *img = ids
    return NewTokenIds(image, region, im_start, im_end, tuple(img))
