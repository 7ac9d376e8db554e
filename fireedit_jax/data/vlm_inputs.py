"""The VLM's token sequence, built on the host with static length buckets.

    <s> USER: <im_start> <image>×I <im_end> <region>×r {instruction} ASSISTANT: [IMG_1]…[IMG_32]

(DESIGN.md: the paper's prose order μ(x), P, c, Q.) Placeholder rows are replaced on
device by the adapter's image tokens and the region encoder's tokens, in order. Right
padding to the smallest length bucket that fits; the number of region slots is a box
bucket too, so shapes (and compilations) come from a small fixed set.

A VQA sample replies with its answer tokens + </s> instead of the [IMG] tokens. A
text-only sequence (`num_image_tokens=0`, stage 1's captions) has no image block.

`VLMTemplate` works on token ids: the data pipeline tokenises texts in its workers
(`TextField`, `<name>_ids`) and the collation builds the batch from those ids;
`build_vlm_inputs` tokenises strings and goes through the same template (the Editor).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Mapping, Sequence

import numpy as np

from fireedit_jax.data.records import Task
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


@dataclasses.dataclass(frozen=True)
class VLMTemplate:
    """The chat template as token ids (picklable: it runs in grain's worker processes).

    user / assistant: the ids of "USER:" / "ASSISTANT:"; bos: None if the tokenizer has none.
    num_image_tokens: I, the image placeholders ((grid / merge)²); 0: a text-only sequence.
    regions: False: no region placeholders whatever the box counts (a model without regions,
      or stage 1's captions).
    """

    ids: NewTokenIds
    user: tuple[int, ...]
    assistant: tuple[int, ...]
    bos: int | None
    eos: int
    pad: int
    num_image_tokens: int
    regions: bool = True
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    box_buckets: tuple[int, ...] = DEFAULT_BOX_BUCKETS
    max_instruction_tokens: int = 128

    @classmethod
    def from_tokenizer(cls, tokenizer, ids: NewTokenIds, **fields) -> VLMTemplate:
        """The template for a transformers tokenizer extended with the new tokens (`ids`)."""
        tok = lambda text: tuple(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(ids, tok("USER:"), tok("ASSISTANT:"), tokenizer.bos_token_id, tokenizer.eos_token_id, pad, **fields)

    def __call__(
        self,
        instructions: Sequence[Sequence[int]],
        num_boxes: Sequence[int],
        answers: Sequence[Sequence[int] | None] | None = None,
    ) -> VLMInputs:
        """Token sequences for a batch of instruction ids; `answers[i]` (ids) makes sample i
        a VQA sample (its answer tokens + </s> are the targets instead of the [IMG] tokens)."""
        answers = answers if answers is not None else [None] * len(instructions)
        if len(answers) != len(instructions) or len(num_boxes) != len(instructions):
            raise ValueError(f"{len(instructions)} instructions, {len(num_boxes)} box counts, {len(answers)} answers")
        ids = self.ids
        image = [ids.im_start] + [ids.image] * self.num_image_tokens + [ids.im_end] if self.num_image_tokens else []
        head = ([self.bos] if self.bos is not None else []) + list(self.user) + image
        rows, targets = [], []
        for words, r, answer in zip(instructions, num_boxes, answers):
            words = [int(w) for w in words]
            if len(words) > self.max_instruction_tokens:
                warnings.warn(f"instruction truncated to {self.max_instruction_tokens} tokens ({len(words)} given)")
                words = words[: self.max_instruction_tokens]
            prompt = head + [ids.region] * (int(r) if self.regions else 0) + words + list(self.assistant)
            reply = list(ids.img) if answer is None else [int(a) for a in answer] + [self.eos]
            rows.append(prompt + reply)
            targets.append([False] * len(prompt) + [True] * len(reply))
        length = bucket(max(map(len, rows)), self.length_buckets, "tokens")
        boxes = bucket(max(num_boxes, default=0), self.box_buckets, "boxes")
        input_ids = np.full((len(rows), length), self.pad, np.int32)
        attention_mask = np.zeros((len(rows), length), bool)
        target_mask = np.zeros((len(rows), length), bool)
        for i, (row, target) in enumerate(zip(rows, targets)):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = True
            target_mask[i, : len(row)] = target
        box_mask = np.arange(boxes)[None, :] < np.asarray(num_boxes)[:, None]
        return VLMInputs(input_ids, attention_mask, target_mask, box_mask)

    def collate(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The loss's VLM entries for examples of `EditTransform` (data/transforms.py): from their
        `instruction_ids`, a VQA sample's `answer_ids` and their box counts →
        vlm_input_ids int32[B, T], vlm_attention_mask bool[B, T], vlm_target_mask bool[B, T]."""
        answers = [e["answer_ids"] if int(e["task"]) == Task.VQA else None for e in examples]
        inputs = self([e["instruction_ids"] for e in examples], [len(e["boxes"]) for e in examples], answers)
        return {"vlm_input_ids": inputs.input_ids, "vlm_attention_mask": inputs.attention_mask,
                "vlm_target_mask": inputs.target_mask}  # fmt: skip


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
    """`VLMTemplate` on strings: tokenised here, then the same template as the data pipeline's ids."""
    template = VLMTemplate.from_tokenizer(
        tokenizer, ids, num_image_tokens=num_image_tokens, length_buckets=tuple(length_buckets),
        box_buckets=tuple(box_buckets), max_instruction_tokens=max_instruction_tokens,
    )  # fmt: skip
    tok = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    answers = [None if a is None else tok(a) for a in answers] if answers is not None else None
    return template([tok(text) for text in instructions], num_boxes, answers)
