"""ShapeEdit: a synthetic multi-object edit data set with exact ground truth.

Each sample is a scene of 1–5 flat-coloured shapes on a lightly textured background,
an instruction that edits one of them, and the exactly rendered result:

  colour   "make the leftmost square blue"           the object's colour changes
  shape    "turn the red circle into a triangle"     its shape changes in the same box
  remove   "remove the bigger triangle"              its pixels become background again
  add      "add a small green square to the left of the blue circle" / "... in the top
           left corner"                              a new object in a new box

Objects are referred to by attribute ("the red circle", "the triangle", "the red
object"), position ("the leftmost square", "the top object"; an object is the
leftmost when both its centre and its left edge beat every other candidate's by a
margin) or relative size ("the bigger triangle" of exactly two, "the biggest circle"
of three or more with one big one). Every expression picks exactly one object of the
source scene: the generator enumerates only unique ones. Scenes repeat shapes and
colours on purpose, so position and size references are needed.

Splits (the same generator, seeded by (seed, split, index)):
  train, test   edits never PRODUCE a `HELDOUT_PAIRS` (colour, shape) combination: no
                colour/shape edit or addition yields one, and none is removed;
  heldout       every edit produces (or removes) one of them.
  Objects of held-out combinations may still appear untouched in any scene.

Geometry: an object is an odd-sized square box (so shapes are symmetric), small or big
(`ShapesConfig.small` / `big` of the image side). Objects keep `gap` pixels apart and
off the border; an added object sits `gap` pixels beside its anchor, centred on it, or
`gap` pixels from the corner. Shapes are drawn with PIL without antialiasing, so a
target differs from its source only inside the edited box (data/shapes_render.py: the
palette, the shapes' masks, the background). The instructions' templates, the vocabulary
and the word-level tokenizer: data/shapes_words.py.

A sample (`generate`, `ShapeEditSource[i]`) is a dict:
  source, target   uint8[H, W, 3]
  instruction      str
  boxes            float32[N, 4] normalised xyxy region proposals: the objects' boxes in
                   `objects` order (optionally jittered), then any distractor boxes
  kind, refer      edit kind (KINDS); referring type: attribute, position, size, or
                   corner (an addition placed in a corner refers to no object)
  object           index of the edited object in `objects` (-1 for add)
  referent         index of the object the expression picks (add: the anchor; -1 for corner)
  box              float32[4] the edited object's exact box (add: the new object's)
  mask             bool[H, W] the exact edit region: the object's pixels (colour, remove), the
                   old and the new shape's together (shape), the added object's (add)
  colour, shape, size   the edited object after the edit (remove: the removed object),
                   i.e. the requested colour / shape where one is requested
  from_colour, from_shape   the edited object before the edit (None for add)
  place            add only: "left", "right", "above", "below" or a corner ("top left", …)
  caption, target_caption   rule-made descriptions of the source and the target scene (`describe`;
                   the caption view of learnt edit regions: image–caption pairs, no target image)
  objects          the source scene: [{"shape", "colour", "size", "box"}] (box normalised)
  split, index
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

# PALETTE and shape_mask are not used here: eval/shapes_metrics.py imports them from this module.
from fireedit_jax.data.shapes_render import (COLOURS, PALETTE, SHAPES, SIZES, Obj, background,  # noqa: F401
                                             object_mask, render, shape_mask)
from fireedit_jax.data.shapes_words import (ADD_TEMPLATES, COLOUR_TEMPLATES, CORNERS, DIRECTIONS, PLACE_TEMPLATES,
                                            POSITIONS, REMOVE_TEMPLATES, SHAPE_TEMPLATES, SIZE_WORDS, SPECIAL_TOKENS,
                                            build_tokenizer, vocabulary)

KINDS = ("colour", "shape", "remove", "add")
REFERS = ("attribute", "position", "size", "corner")
SPLITS = ("train", "test", "heldout")
# Never produced by a train/test edit; every heldout edit produces one. Each shape and
# four colours lose one pairing, so each part is still seen in training.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "diamond")})
_MAX_ATTEMPTS = 2000


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws; every sample is a function of (this, split, index).

    size: image side in pixels (64 by default; 32 works too).
    small, big: object sides as fractions of `size` (rounded to odd pixel counts).
    gap: the least distance between objects, and from an added object to its anchor,
      as a fraction of `size` (at least 2 pixels).
    position_margin: how much further (fraction of `size`, ≥ 2 px) the leftmost/… object's
      centre and edge must be than every other candidate's.
    box_jitter: region proposals' corners move by N(0, box_jitter × object side).
    distractor_boxes: extra random boxes appended to the proposals.
    kinds: the edit kinds drawn, uniformly (a subset of KINDS: a sub-task, e.g. colour alone).
    """

    size: int = 64
    min_objects: int = 1
    max_objects: int = 5
    small: float = 0.17
    big: float = 0.3
    gap: float = 0.05
    position_margin: float = 0.06
    seed: int = 0
    box_jitter: float = 0.0
    distractor_boxes: int = 0
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))  # a config file's list
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"ShapesConfig.kinds={self.kinds!r}: choose one or more of {', '.join(KINDS)}")

    def side(self, size: str) -> int:
        """Pixel side of a "small" or "big" object: odd, so shapes are symmetric."""
        return 2 * round((getattr(self, size) * self.size - 1) / 2) + 1

    @property
    def gap_px(self) -> int:
        return max(2, round(self.gap * self.size))

    @property
    def margin_px(self) -> int:
        return max(2, round(self.position_margin * self.size))


class Ref(NamedTuple):
    phrase: str  # "the leftmost red square"
    refer: str  # attribute, position or size
    index: int  # the object it picks


# ---------------------------------------------------------------------------- geometry


def _apart(a, b, gap: int) -> bool:
    """Boxes at least `gap` pixels apart along x or y."""
    return a[0] >= b[2] + gap or b[0] >= a[2] + gap or a[1] >= b[3] + gap or b[1] >= a[3] + gap


def _fits(box, objects: Sequence[Obj], config: ShapesConfig) -> bool:
    inside = min(box[:2]) >= 1 and max(box[2:]) <= config.size - 1
    return inside and all(_apart(box, obj.box, config.gap_px) for obj in objects)


def _sample_scene(rng: np.random.Generator, config: ShapesConfig) -> list[Obj] | None:
    """1–5 non-overlapping objects, often repeating an earlier one's shape or colour; None if they do not fit."""
    objects = []
    for _ in range(rng.integers(config.min_objects, config.max_objects + 1)):
        shape = objects[rng.integers(len(objects))].shape if objects and rng.random() < 0.5 else rng.choice(SHAPES)
        colour = objects[rng.integers(len(objects))].colour if objects and rng.random() < 0.4 else rng.choice(COLOURS)
        size = str(rng.choice(SIZES))
        side = config.side(size)
        for _ in range(50):
            x0, y0 = rng.integers(1, config.size - side, 2)
            box = (int(x0), int(y0), int(x0) + side, int(y0) + side)
            if _fits(box, objects, config):
                objects.append(Obj(str(shape), str(colour), size, box))
                break
        else:
            return None
    return objects


def _placed_box(place: str, side: int, anchor: Obj | None, config: ShapesConfig):
    """The pixel box of a new object of `side` at `place` (beside `anchor`, or in a corner)."""
    gap, size = config.gap_px, config.size
    if anchor is None:  # a corner
        vertical, horizontal = place.split()
        x0 = gap if horizontal == "left" else size - gap - side
        y0 = gap if vertical == "top" else size - gap - side
        return (x0, y0, x0 + side, y0 + side)
    ax0, ay0, ax1, ay1 = anchor.box
    cx, cy = (ax0 + ax1) // 2, (ay0 + ay1) // 2  # exact centres: sides are odd
    x0 = {"left": ax0 - gap - side, "right": ax1 + gap}.get(place, cx - side // 2)
    y0 = {"above": ay0 - gap - side, "below": ay1 + gap}.get(place, cy - side // 2)
    return (x0, y0, x0 + side, y0 + side)


# ---------------------------------------------------------------------------- references


def _noun(colour: str | None, shape: str | None) -> str:
    return " ".join(w for w in (colour, shape or "object") if w)


def referring_expressions(objects: Sequence[Obj], config: ShapesConfig) -> list[Ref]:
    """Every expression that picks exactly one object, by attribute, position or size."""
    refs = []
    colours = [c for c in COLOURS if any(o.colour == c for o in objects)]
    shapes = [s for s in SHAPES if any(o.shape == s for o in objects)]
    for colour in (None, *colours):
        for shape in (None, *shapes):
            picked = [i for i, o in enumerate(objects) if colour in (None, o.colour) and shape in (None, o.shape)]
            noun = _noun(colour, shape)
            if len(picked) == 1 and (colour or shape):
                refs.append(Ref(f"the {noun}", "attribute", picked[0]))
            if len(picked) < 2:
                continue
            for word, (axis, sign) in POSITIONS.items():
                index = _extreme(objects, picked, axis, sign, config.margin_px)
                if index is not None:
                    refs.append(Ref(f"the {word} {noun}", "position", index))
            big = [i for i in picked if objects[i].size == "big"]
            small = [i for i in picked if objects[i].size == "small"]
            more, less = SIZE_WORDS["comparative" if len(picked) == 2 else "superlative"]
            if len(big) == 1:
                refs.append(Ref(f"the {more} {noun}", "size", big[0]))
            if len(small) == 1:
                refs.append(Ref(f"the {less} {noun}", "size", small[0]))
    return refs


def _extreme(objects, picked, axis: int, sign: int, margin: int) -> int | None:
    """The candidate whose centre AND outer edge lead all others' by ≥ margin along axis, or None."""

    def keys(i):
        box = objects[i].box
        edge = box[axis + 2] if sign > 0 else box[axis]
        return sign * (box[axis] + box[axis + 2]) / 2, sign * edge

    best = max(picked, key=keys)
    lead = keys(best)
    ok = all(min(lead[0] - keys(i)[0], lead[1] - keys(i)[1]) >= margin for i in picked if i != best)
    return best if ok else None


# ---------------------------------------------------------------------------- edits


def _allowed(split: str, colour: str, shape: str) -> bool:
    return ((colour, shape) in HELDOUT_PAIRS) == (split == "heldout")


def _options(kind: str, split: str, obj: Obj | None, objects: Sequence[Obj], config: ShapesConfig) -> list:
    """What an edit of `kind` on `obj` (add: beside `obj`, or in a corner when None) may request."""
    if kind == "colour":
        return [c for c in COLOURS if c != obj.colour and _allowed(split, c, obj.shape)]
    if kind == "shape":
        return [s for s in SHAPES if s != obj.shape and _allowed(split, obj.colour, s)]
    if kind == "remove":
        return [None] if _allowed(split, obj.colour, obj.shape) else []
    places = CORNERS if obj is None else DIRECTIONS
    return [
        (place, size)
        for place in places
        for size in SIZES
        if _fits(_placed_box(place, config.side(size), obj, config), objects, config)
    ]


def _plan(rng: np.random.Generator, objects: list[Obj], kind: str, refer: str, split: str, config: ShapesConfig):
    """(Ref or None for a corner, the chosen option) for a random feasible edit, or None."""
    refs = [None] if refer == "corner" else [r for r in referring_expressions(objects, config) if r.refer == refer]
    for k in rng.permutation(len(refs)):
        ref = refs[k]
        options = _options(kind, split, None if ref is None else objects[ref.index], objects, config)
        if options:
            return ref, options[rng.integers(len(options))]
    return None


def describe(objects: Sequence[Obj], size: int) -> str:
    """A scene's caption in the instruction vocabulary, objects left to right: "a big red circle in
    the top left a small blue square" (the third of the image its centre lies in; none in the middle)."""

    def where(obj: Obj) -> str:
        cx, cy = ((obj.box[0] + obj.box[2]) / 2 / size, (obj.box[1] + obj.box[3]) / 2 / size)
        third = lambda v, low, high: low if v < 1 / 3 else high if v > 2 / 3 else ""  # noqa: E731
        cell = " ".join(w for w in (third(cy, "top", "bottom"), third(cx, "left", "right")) if w)
        return f" in the {cell}" if cell else ""

    ordered = sorted(objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    return " ".join(f"a {o.size} {o.colour} {o.shape}{where(o)}" for o in ordered)


def _normalised(box, size: int) -> list[float]:
    return [v / size for v in box]


def generate(config: ShapesConfig, split: str, index: int) -> dict:
    """Sample `index` of `split`: a pure function of (config, split, index). See the module doc."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    kind = config.kinds[rng.integers(len(config.kinds))]
    refers = REFERS if kind == "add" else REFERS[:-1]
    if config.max_objects < 2:  # position and size pick among two or more
        refers = tuple(r for r in refers if r in ("attribute", "corner"))
    refer = refers[rng.integers(len(refers))]
    for _ in range(_MAX_ATTEMPTS):
        objects = _sample_scene(rng, config)
        plan = objects and _plan(rng, objects, kind, refer, split, config)
        if plan:
            break
    else:
        raise RuntimeError(f"no {kind} edit by {refer} found in {_MAX_ATTEMPTS} scenes for {config}")
    ref, option = plan
    after, place = list(objects), None
    if kind == "add":
        place, size = option
        pairs = [(c, s) for c in COLOURS for s in SHAPES if _allowed(split, c, s)]
        colour, shape = pairs[rng.integers(len(pairs))]
        anchor = None if ref is None else objects[ref.index]
        new = Obj(shape, colour, size, _placed_box(place, config.side(size), anchor, config))
        after.append(new)
        edited, before = new, None
        template = ADD_TEMPLATES[rng.integers(len(ADD_TEMPLATES))]
        where = PLACE_TEMPLATES[place].format(ref=ref.phrase if ref else "")
        instruction = template.format(new=f"{size} {colour} {shape}", place=where)
    else:
        before = edited = objects[ref.index]
        if kind == "remove":
            del after[ref.index]
        else:
            edited = before._replace(**{kind: option})  # the field named like the kind
            after[ref.index] = edited
        templates = {"colour": COLOUR_TEMPLATES, "shape": SHAPE_TEMPLATES, "remove": REMOVE_TEMPLATES}[kind]
        instruction = templates[rng.integers(len(templates))].format(ref=ref.phrase, colour=option, shape=option)
    backdrop = background(rng, config.size)
    return {
        "source": render(backdrop, objects),
        "target": render(backdrop, after),
        "instruction": instruction,
        "boxes": proposals(config, split, index, objects),
        "kind": kind,
        "refer": refer,
        "object": -1 if kind == "add" else ref.index,
        "referent": -1 if ref is None else ref.index,
        "box": np.asarray(_normalised(edited.box, config.size), np.float32),
        "mask": object_mask(edited, config.size) | (object_mask(before, config.size) if before else False),
        "colour": edited.colour,
        "shape": edited.shape,
        "size": edited.size,
        "from_colour": None if before is None else before.colour,
        "from_shape": None if before is None else before.shape,
        "place": place,
        "caption": describe(objects, config.size),
        "target_caption": describe(after, config.size),
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "box": _normalised(o.box, config.size)}
            for o in objects
        ],
        "split": split,
        "index": index,
    }


def proposals(config: ShapesConfig, split: str, index: int, objects: Sequence[Obj]) -> np.ndarray:
    """float32[N, 4] normalised xyxy: the objects' boxes (jittered if configured), then distractors.

    Drawn from their own stream, so jitter and distractors never change the scene.
    """
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index, 1])
    boxes = np.asarray([o.box for o in objects], np.float64).reshape(-1, 4)
    if config.box_jitter:
        sides = (boxes[:, 2:] - boxes[:, :2]).repeat(2, axis=1)
        boxes = boxes + rng.normal(0.0, config.box_jitter, boxes.shape) * sides
    sides = rng.integers(config.side("small"), config.side("big") + 1, (config.distractor_boxes, 2))
    corners = rng.uniform(0, config.size - sides)
    boxes = np.concatenate([boxes, np.concatenate([corners, corners + sides], axis=1)]) / config.size
    boxes = np.clip(boxes, 0.0, 1.0)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    return boxes.astype(np.float32)


class ShapeEditSource:
    """grain-compatible random-access source: `source[i] == generate(config, split, i)`, made on demand."""

    def __init__(self, split: str = "train", num_samples: int = 10_000, config: ShapesConfig = ShapesConfig()):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        self.split, self.num_samples, self.config = split, num_samples, config

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapeEdit {self.split}: index {index} out of range [0, {self.num_samples})")
        return generate(self.config, self.split, int(index))

    def __repr__(self) -> str:
        return f"ShapeEditSource({self.split!r}, {self.num_samples} samples, {self.config})"


# ---------------------------------------------------------------------------- files


IMAGE_FIELDS = ("source", "target", "mask")  # written as PNGs (the mask white where the edit is)


def _json_value(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def write_folder(out_dir: str, split: str, n: int, config: ShapesConfig = ShapesConfig()) -> str:
    """Writes samples 0…n-1 of `split` under out_dir/split/; returns that folder.

    Layout: images/{i:06d}_source.png, _target.png and _mask.png (white: the edit region);
    samples.jsonl   one line per sample: {"source": "images/…png", "target": …, "instruction",
                    "boxes": [[x0, y0, x1, y1], …], and every metadata field of `generate`};
    metadata.jsonl  the same samples in `data.sources.JsonlSource`'s layout (source_image,
                    target_image, mask_image, instruction, boxes), so the training pipeline reads the folder.
    """
    folder = os.path.join(out_dir, split)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with (
        open(os.path.join(folder, "samples.jsonl"), "w") as samples,
        open(os.path.join(folder, "metadata.jsonl"), "w") as metadata,
    ):
        for i in range(n):
            sample = generate(config, split, i)
            paths = {}
            for name in IMAGE_FIELDS:
                paths[name] = f"images/{i:06d}_{name}.png"
                pixels = sample[name].astype(np.uint8) * 255 if name == "mask" else sample[name]
                Image.fromarray(pixels).save(os.path.join(folder, paths[name]))
            line = {**{k: _json_value(v) for k, v in sample.items()}, **paths}
            samples.write(json.dumps(line) + "\n")
            record = {"source_image": paths["source"], "target_image": paths["target"], "mask_image": paths["mask"],
                      "instruction": sample["instruction"], "boxes": line["boxes"]}  # fmt: skip
            metadata.write(json.dumps(record) + "\n")
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `shapes` sub-command's arguments."""
    parser.add_argument("--out", required=True, help="output directory (one sub-folder per split, plus tokenizer/)")
    parser.add_argument("--split", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--num", type=int, default=1000, help="samples per split")
    parser.add_argument("--size", type=int, default=ShapesConfig.size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=ShapesConfig.seed)
    parser.add_argument("--box-jitter", type=float, default=0.0, help="proposal jitter, fraction of the object side")
    parser.add_argument("--distractor-boxes", type=int, default=0, help="random extra proposals per sample")


def run(args: argparse.Namespace) -> int:
    config = ShapesConfig(size=args.size, seed=args.seed, box_jitter=args.box_jitter,
                          distractor_boxes=args.distractor_boxes)  # fmt: skip
    for split in args.split:
        folder = write_folder(args.out, split, args.num, config)
        print(f"wrote {args.num} {split} samples to {folder}")
    build_tokenizer().save_pretrained(os.path.join(args.out, "tokenizer"))
    print(f"wrote the word-level tokenizer ({len(SPECIAL_TOKENS) + len(vocabulary())} tokens) to {args.out}/tokenizer")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`fireedit-jax shapes --out DIR [--split train test heldout] [--num N] [--size 64]`."""
    parser = argparse.ArgumentParser(prog="fireedit-jax shapes", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
