"""Sources read fixtures written here in the real layouts (HF parquet with image structs,
folder + JSONL, LLaVA JSON, TFDS ArrayRecord) and yield the records that were written."""

import dataclasses
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fireedit_jax.data import sources
from fireedit_jax.data.records import BadRecord, EditRecord, Task

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the `datasets` Image feature


def png_bytes(seed: int, size=(24, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def image_cell(data: bytes, name: str) -> dict:
    return {"bytes": data, "path": name}


def write_ip2p_parquet(path: str, images: list[tuple[bytes, bytes]], row_group_size: int = 2) -> list[dict]:
    """timbrooks/instructpix2pix-clip-filtered's columns; returns the rows written."""
    rows = [
        {
            "original_prompt": f"a photo of cup {i}",
            "original_image": image_cell(source, f"{i}_0.jpg"),
            "edit_prompt": f"make cup {i} red",
            "edited_prompt": f"a photo of red cup {i}",
            "edited_image": image_cell(target, f"{i}_1.jpg"),
        }
        for i, (source, target) in enumerate(images)
    ]
    schema = pa.schema(
        [
            ("original_prompt", pa.string()),
            ("original_image", IMAGE),
            ("edit_prompt", pa.string()),
            ("edited_prompt", pa.string()),
            ("edited_image", IMAGE),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=row_group_size)
    return rows


def _images(n: int, offset: int = 0) -> list[tuple[bytes, bytes]]:
    return [(png_bytes(offset + 2 * i), png_bytes(offset + 2 * i + 1)) for i in range(n)]


def test_instructpix2pix_parquet_files_and_row_groups(tmp_path):
    first = write_ip2p_parquet(str(tmp_path / "train-00000-of-00002.parquet"), _images(5))
    second = write_ip2p_parquet(str(tmp_path / "train-00001-of-00002.parquet"), _images(3, offset=100))
    source = sources.instructpix2pix_source(str(tmp_path))
    expected = [
        EditRecord(
            key=f"train-0000{f}-of-00002.parquet#{i}",
            source_image=row["original_image"]["bytes"],
            target_image=row["edited_image"]["bytes"],
            instruction=row["edit_prompt"],
            source_caption=row["original_prompt"],
            target_caption=row["edited_prompt"],
        )
        for f, rows in enumerate([first, second])
        for i, row in enumerate(rows)
    ]
    assert len(source) == 8
    # random order across files and row groups (3 + 2 groups), through a small cache
    order = [7, 0, 4, 2, 5, 1, 6, 3]
    assert [source[i] for i in order] == [expected[i] for i in order]
    with pytest.raises(IndexError):
        source[8]
    # what grain's worker processes receive
    assert pickle.loads(pickle.dumps(source))[6] == expected[6]


def test_magicbrush_and_ultraedit_parquet(tmp_path):
    images = _images(3)
    magicbrush_rows = [
        {
            "img_id": f"{327726 + i}",
            "turn_index": 1 + i % 2,
            "source_img": image_cell(src, "source.png"),
            "mask_img": image_cell(png_bytes(50 + i), "mask.png"),
            "instruction": f"put a hat on dog {i}",
            "target_img": image_cell(tgt, "target.png"),
        }
        for i, (src, tgt) in enumerate(images)
    ]
    schema = pa.schema(
        [("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", IMAGE), ("mask_img", IMAGE),
         ("instruction", pa.string()), ("target_img", IMAGE)]
    )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(magicbrush_rows, schema), tmp_path / "mb.parquet")
    source = sources.magicbrush_source(str(tmp_path / "mb.parquet"))
    assert [source[i] for i in range(3)] == [
        EditRecord(f"mb.parquet#{i}", src, f"put a hat on dog {i}", tgt, mask_image=png_bytes(50 + i))
        for i, (src, tgt) in enumerate(images)
    ]

    # UltraEdit: the free-form set lacks target_caption, the region-based one has it (and mask_image)
    for name, region in (("free", False), ("region", True)):
        rows = [
            {
                "source_image": image_cell(src, None),
                "edited_image": image_cell(tgt, None),
                "edit_prompt": f"turn sky {i} pink",
                "source_caption": f"sky {i}",
                **({"mask_image": image_cell(png_bytes(9), None), "target_caption": f"pink sky {i}"} if region else {}),
            }
            for i, (src, tgt) in enumerate(images)
        ]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        source = sources.ultraedit_source(str(tmp_path / f"{name}.parquet"))
        assert [source[i] for i in range(3)] == [
            EditRecord(
                f"{name}.parquet#{i}", src, f"turn sky {i} pink", tgt,
                source_caption=f"sky {i}", target_caption=f"pink sky {i}" if region else None,
                mask_image=png_bytes(9) if region else None,
            )
            for i, (src, tgt) in enumerate(images)
        ]  # fmt: skip


def test_parquet_wrong_schema_names_missing_columns(tmp_path):
    image = image_cell(png_bytes(0), "x")
    table = pa.table({"original_prompt": ["a"], "original_image": [image], "edited_prompt": ["b"]})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(sources.SchemaError, match=r"missing column\(s\) edit_prompt, edited_image") as error:
        sources.instructpix2pix_source(str(tmp_path / "bad.parquet"))
    assert "bad.parquet" in str(error.value)
    # right names, but text where the images should be
    table = pa.table({"source_img": ["x"], "target_img": ["y"], "instruction": ["z"]})
    pq.write_table(table, tmp_path / "text.parquet")
    with pytest.raises(sources.SchemaError, match="'source_img' should hold images"):
        sources.magicbrush_source(str(tmp_path / "text.parquet"))
    with pytest.raises(FileNotFoundError):
        sources.magicbrush_source(str(tmp_path / "missing"))


def test_parquet_null_image_is_a_bad_record(tmp_path):
    rows = write_ip2p_parquet(str(tmp_path / "a.parquet"), _images(2))
    rows[1]["edited_image"] = None
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(tmp_path / "a.parquet")), tmp_path / "a.parquet")
    source = sources.instructpix2pix_source(str(tmp_path / "a.parquet"))
    assert source[0].target_image is not None
    with pytest.raises(BadRecord, match="a.parquet#1: a edit record needs a target image"):
        source[1]


def _write_image(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(data)
    return path


def test_jsonl_folder(tmp_path):
    lines = [
        {"source_image": "images/0_src.png", "target_image": "images/0_tgt.png",
         "instruction": "make the left cup blue", "boxes": [[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 1.0]],
         "source_caption": "two cups", "target_caption": "a blue and a white cup"},
        {"source_image": "images/1_src.png", "instruction": "what is on the table?", "answer": "two cups", "task": "vqa"},
        {"source_image": "images/2_src.png", "target_image": "images/2_seg.png", "instruction": "segment the cup",
         "task": "segmentation"},
    ]  # fmt: skip
    for line in lines:
        for field in ("source_image", "target_image"):
            if field in line:
                _write_image(str(tmp_path / line[field]), png_bytes(len(line[field])))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    source = sources.JsonlSource(str(tmp_path), name="mine")
    root = str(tmp_path)
    assert source.name == "mine" and len(source) == 3
    assert [source[i] for i in range(3)] == [
        EditRecord(
            "metadata.jsonl:1", f"{root}/images/0_src.png", "make the left cup blue", f"{root}/images/0_tgt.png",
            boxes=np.array([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 1.0]], np.float32),
            source_caption="two cups", target_caption="a blue and a white cup",
        ),
        EditRecord("metadata.jsonl:2", f"{root}/images/1_src.png", "what is on the table?", answer="two cups", task=Task.VQA),
        EditRecord(
            "metadata.jsonl:3", f"{root}/images/2_src.png", "segment the cup", f"{root}/images/2_seg.png",
            task=Task.SEGMENTATION,
        ),
    ]  # fmt: skip

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"source_image": "a.png", "instrution": "typo"}) + "\n")
    problems = r"missing field\(s\) instruction, target_image; unknown field\(s\) instrution"
    with pytest.raises(sources.SchemaError, match=f"metadata.jsonl:1: {problems}"):
        sources.JsonlSource(str(tmp_path))


def test_llava_instruct_json(tmp_path):
    entries = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "text-only-1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Where is the cat positioned?\n<image>"},
            {"from": "gpt", "value": "On top of the back of the couch."}]},
    ]  # fmt: skip
    (tmp_path / "llava_instruct.json").write_text(json.dumps(entries))
    source = sources.LlavaVQASource(str(tmp_path / "llava_instruct.json"), str(tmp_path / "coco"))
    assert len(source) == 3 and source.text_only == 1
    coco = str(tmp_path / "coco")
    assert [source[i] for i in range(3)] == [
        EditRecord("llava_instruct.json:000000033471:turn0", f"{coco}/000000033471.jpg",
                   "What are the colors of the bus in the image?", answer="The bus in the image is white and red.", task=Task.VQA),
        EditRecord("llava_instruct.json:000000033471:turn1", f"{coco}/000000033471.jpg",
                   "What feature can be seen on the back of the bus?",
                   answer="The back of the bus features an advertisement.", task=Task.VQA),
        EditRecord("llava_instruct.json:000000052846:turn0", f"{coco}/000000052846.jpg", "Where is the cat positioned?",
                   answer="On top of the back of the couch.", task=Task.VQA),
    ]  # fmt: skip


def test_tfds_array_record_round_trip(tmp_path):
    from fireedit_jax.data.tfds_builder import TFDSSource, build_triplets

    src = _write_image(str(tmp_path / "img" / "s.png"), png_bytes(1))
    records = [
        EditRecord("a", png_bytes(2), "make it blue", png_bytes(3), boxes=np.array([[0, 0, 0.5, 0.5]], np.float32),
                   source_caption="a cup", target_caption="a blue cup"),
        EditRecord("b", src, "what is this?", answer="a cup", task=Task.VQA),
        EditRecord("c", png_bytes(4), "segment the ünïcode cup", png_bytes(5), boxes=np.zeros((0, 4), np.float32),
                   task=Task.SEGMENTATION),
    ]  # fmt: skip
    directory = build_triplets(str(tmp_path / "tfds"), {"train": records[:2], "validation": records[2:]})
    train, validation = TFDSSource(directory, "train"), TFDSSource(directory, "validation", name="val")
    assert (len(train), len(validation), validation.name) == (2, 1, "val")
    # stored as bytes: the path's content comes back
    stored = [dataclasses.replace(records[0]), dataclasses.replace(records[1], source_image=png_bytes(1))]
    assert sorted((train[i] for i in range(2)), key=lambda r: r.key) == stored
    assert validation[0] == records[2]
    assert pickle.loads(pickle.dumps(train))[0] in stored
    with pytest.raises(KeyError, match="no split 'test'"):
        TFDSSource(directory, "test")
