"""The VLM's token sequence, built on the host with static length buckets.

    <s> USER: <im_start> <image>×I <im_end> <region>×r {instruction} ASSISTANT: [IMG_1]…[IMG_32]

(DESIGN.md: the paper's prose order μ(x), P, c, Q.) Placeholder rows are replaced on
device by the adapter's image tokens and the region encoder's tokens, in order. Right
padding to the smallest length bucket that fits; the number of region slots is a box
bucket too, so shapes (and compilations) come from a small fixed set.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from fireedit_jax.data.tokenizer import NewTokenIds

DEFAULT_LENGTH_BUCKETS = (384, 512, 768)
DEFAULT_BOX_BUCKETS = (0, 8, 32, 100)


@dataclasses.dataclass(frozen=True)
class VLMInputs:
    """A batch for the VLM (numpy, host side).

    input_ids: int32[B, T]; attention_mask: bool[B, T] (True on real tokens);
    target_mask: bool[B, T] True where the token is predicted (the [IMG] tokens, or
      VQA answer tokens) — L_VLM's positions;
    box_mask: bool[B, R] True on real boxes (R = the box bucket).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    target_mask: np.ndarray
    box_mask: np.ndarray


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(f"{n} {what} exceed the largest bucket {max(buckets)}")


def build_vlm_inputs(
    tokenizer,
    ids: NewTokenIds,
    instructions: Sequence[str],
    num_boxes: Sequence[int],
    *,
    num_image_tokens: int,
    answers: Sequence[str | None] | None = None,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    box_buckets: Sequence[int] = DEFAULT_BOX_BUCKETS,
    max_instruction_tokens: int = 128,
) -> VLMInputs:
    """Token sequences for a batch; an `answers[i]` string makes sample i a VQA sample
    (its answer tokens are the targets instead of the [IMG] tokens)."""
    answers = answers or [None] * len(instructions)

    def tok(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    user, assistant = tok("USER:"), tok("ASSISTANT:")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows, targets = [], []
    for text, r, answer in zip(instructions, num_boxes, answers):
        words = tok(text)
        if len(words) > max_instruction_tokens:
            warnings.warn(f"instruction truncated to {max_instruction_tokens} tokens ({len(words)} given): {text[:60]!r}…")
            words = words[:max_instruction_tokens]
        prompt = (
            bos + user + [ids.im_start] + [ids.image] * num_image_tokens + [ids.im_end]
            + [ids.region] * int(r) + words + assistant
        )  # fmt: skip
        reply = list(ids.img) if answer is None else tok(answer) + [tokenizer.eos_token_id]
        rows.append(prompt + reply)
        targets.append([False] * len(prompt) + [True] * len(reply))
    length = bucket(max(map(len, rows)), length_buckets, "tokens")
    boxes = bucket(max(num_boxes, default=0), box_buckets, "boxes")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(rows), length), pad, np.int32)
    attention_mask = np.zeros((len(rows), length), bool)
    target_mask = np.zeros((len(rows), length), bool)
    for i, (row, target) in enumerate(zip(rows, targets)):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = True
        target_mask[i, : len(row)] = target
    box_mask = np.arange(boxes)[None, :] < np.asarray(num_boxes)[:, None]
    return VLMInputs(input_ids, attention_mask, target_mask, box_mask)
