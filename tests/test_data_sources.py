"""Sources read fixtures written here in the real layouts (HF parquet with image structs,
folder + JSONL, LLaVA JSON, TFDS ArrayRecord, webdataset tar shards) and yield the records
that were written; caption records (learnable regions) from each caption layout."""

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

from fireedit_jax.data import parquet_source, sources, tar_source
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
    source = parquet_source.instructpix2pix_source(str(tmp_path))
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
    source = parquet_source.magicbrush_source(str(tmp_path / "mb.parquet"))
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
        source = parquet_source.ultraedit_source(str(tmp_path / f"{name}.parquet"))
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
        parquet_source.instructpix2pix_source(str(tmp_path / "bad.parquet"))
    assert "bad.parquet" in str(error.value)
    # right names, but text where the images should be
    table = pa.table({"source_img": ["x"], "target_img": ["y"], "instruction": ["z"]})
    pq.write_table(table, tmp_path / "text.parquet")
    with pytest.raises(sources.SchemaError, match="'source_img' should hold images"):
        parquet_source.magicbrush_source(str(tmp_path / "text.parquet"))
    with pytest.raises(FileNotFoundError):
        parquet_source.magicbrush_source(str(tmp_path / "missing"))


def test_parquet_null_image_is_a_bad_record(tmp_path):
    rows = write_ip2p_parquet(str(tmp_path / "a.parquet"), _images(2))
    rows[1]["edited_image"] = None
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(tmp_path / "a.parquet")), tmp_path / "a.parquet")
    source = parquet_source.instructpix2pix_source(str(tmp_path / "a.parquet"))
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
        EditRecord("d", png_bytes(6), "make it red", source_caption="a cup", target_caption="a red cup",
                   task=Task.CAPTION),
    ]  # fmt: skip
    directory = build_triplets(str(tmp_path / "tfds"), {"train": records[:2], "validation": records[2:]})
    train, validation = TFDSSource(directory, "train"), TFDSSource(directory, "validation", name="val")
    assert (len(train), len(validation), validation.name) == (2, 2, "val")
    # stored as bytes: the path's content comes back
    stored = [dataclasses.replace(records[0]), dataclasses.replace(records[1], source_image=png_bytes(1))]
    assert sorted((train[i] for i in range(2)), key=lambda r: r.key) == stored
    assert sorted((validation[i] for i in range(2)), key=lambda r: r.key) == records[2:]
    assert pickle.loads(pickle.dumps(train))[0] in stored
    with pytest.raises(KeyError, match="no split 'test'"):
        TFDSSource(directory, "test")


# ------------------------------------------------------------------ caption records (learnable regions)


def caption_record(key="c", **fields) -> EditRecord:
    values = dict(source_image=png_bytes(0), instruction="make the cup red", source_caption="a cup",
                  target_caption="a red cup", task=Task.CAPTION)  # fmt: skip
    return EditRecord(key, **(values | fields))


def test_caption_record_needs_both_captions_and_no_target_image():
    assert caption_record().target_image is None
    for missing in ("source_caption", "target_caption"):
        with pytest.raises(BadRecord, match=f"c: a caption record needs {missing}"):
            caption_record(**{missing: None})
    with pytest.raises(BadRecord, match="needs source_caption and target_caption"):
        caption_record(source_caption="", target_caption=None)
    assert caption_record(target_caption="").target_caption == ""  # the scene left empty (its only object removed)
    with pytest.raises(BadRecord, match="c: a caption record has no target image, but one was given"):
        caption_record(target_image=png_bytes(1))


def test_captions_parquet(tmp_path):
    rows = [
        {"image": image_cell(png_bytes(i), f"{i}.png"), "caption": f"a cup {i}", "instruction": f"make cup {i} red",
         "target_caption": f"a red cup {i}"}
        for i in range(3)
    ]  # fmt: skip
    schema = pa.schema([("image", IMAGE), ("caption", pa.string()), ("instruction", pa.string()),
                        ("target_caption", pa.string())])  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema), tmp_path / "captions.parquet", row_group_size=2)
    source = sources.open_source("captions", str(tmp_path), name="laion")
    expected = [
        caption_record(f"captions.parquet#{i}", source_image=png_bytes(i), instruction=f"make cup {i} red",
                       source_caption=f"a cup {i}", target_caption=f"a red cup {i}")
        for i in range(3)
    ]  # fmt: skip
    assert source.name == "laion" and [source[i] for i in (2, 0, 1)] == [expected[i] for i in (2, 0, 1)]
    assert pickle.loads(pickle.dumps(source))[1] == expected[1]
    pq.write_table(pa.table({"image": [rows[0]["image"]], "caption": ["a cup"]}), tmp_path / "captions.parquet")
    with pytest.raises(sources.SchemaError, match=r"not a captions parquet file: missing column\(s\) instruction, "):
        sources.open_source("captions", str(tmp_path))


def test_jsonl_caption_lines(tmp_path):
    _write_image(str(tmp_path / "images" / "0.png"), png_bytes(0))
    line = {"task": "caption", "source_image": "images/0.png", "source_caption": "a cup",
            "instruction": "make the cup red", "target_caption": "a red cup", "boxes": [[0.1, 0.2, 0.5, 0.6]]}  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    assert sources.open_source("jsonl", str(tmp_path))[0] == caption_record(
        "metadata.jsonl:1", source_image=str(tmp_path / "images" / "0.png"),
        boxes=np.array([[0.1, 0.2, 0.5, 0.6]], np.float32),
    )  # fmt: skip
    wrong = [
        ({**line, "target_image": "images/0.png"}, "a caption line has no target_image"),
        ({k: v for k, v in line.items() if k != "target_caption"}, r"missing field\(s\) target_caption"),
    ]
    for entry, problem in wrong:
        (tmp_path / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
        with pytest.raises(sources.SchemaError, match=f"metadata.jsonl:1: {problem}"):
            sources.JsonlSource(str(tmp_path))


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed))).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path, members: dict[str, bytes | dict | str]) -> None:
    """A shard with these members in order (dicts written as JSON, strings as UTF-8)."""
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, content in members.items():
            data = json.dumps(content).encode() if isinstance(content, dict) else content
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


TEXTS = {"caption": "a cup", "instruction": "make the cup red", "target_caption": "a red cup"}


def test_webdataset_tar_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    # jpg + json; a key with a directory and dots in the name after the first
    write_tar(shards / "000000.tar", {"s/0.jpg": jpeg_bytes(0), "s/0.json": TEXTS,
                                      "1.JPEG": jpeg_bytes(1), "1.json": {**TEXTS, "caption": "two cups"},
                                      "1.seg.png": png_bytes(9)})  # fmt: skip
    # png + json + txt (the caption); a sample without texts, one without an image: left out, counted
    no_caption = {k: v for k, v in TEXTS.items() if k != "caption"}
    write_tar(shards / "000001.tar", {"2.png": png_bytes(2), "2.txt": "a blue cup\n", "2.json": no_caption,
                                      "3.png": png_bytes(3), "3.json": {"caption": "a cup"},
                                      "4.json": TEXTS, "4.txt": "a cup"})  # fmt: skip
    left_out = "left out 2 of 5 samples lacking an image or a text: 000001.tar#3: no instruction, target_caption; "
    with pytest.warns(UserWarning, match=left_out + "000001.tar#4: no image"):
        source = sources.open_source("wds", str(shards))
    assert (source.name, len(source), source.incomplete) == ("wds", 3, 2)
    expected = [
        caption_record("000000.tar#s/0", source_image=jpeg_bytes(0)),
        caption_record("000000.tar#1", source_image=jpeg_bytes(1), source_caption="two cups"),
        caption_record("000001.tar#2", source_image=png_bytes(2), source_caption="a blue cup"),
    ]
    assert [source[i] for i in (2, 0, 1)] == [expected[i] for i in (2, 0, 1)]
    with pytest.raises(IndexError):
        source[3]
    # grain reads with threads, and in worker processes from a pickled copy
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(source.__getitem__, [0, 1, 2] * 4)) == expected * 4
    assert pickle.loads(pickle.dumps(source))[2] == expected[2]
    with pytest.warns(UserWarning, match="one: left out 2 of 3 samples"):
        assert tar_source.TarCaptionSource([str(shards / "000001.tar")], name="one")[0] == expected[2]

    # a shard with no complete sample is in another layout: refused, naming it and a sample
    write_tar(shards / "000002.tar", {"5.jpg": jpeg_bytes(5), "5.txt": "a cup", "5.json": {"url": "http://x"}})
    refused = r"000002.tar has no sample with an image and the texts caption, instruction, target_caption \(sample 5: "
    with pytest.raises(sources.SchemaError, match=refused + "no instruction, target_caption"):
        tar_source.TarCaptionSource(str(shards / "*.tar"))
    (shards / "000002.tar").write_bytes(b"not a tar")
    with pytest.raises(sources.SchemaError, match="000002.tar cannot be read as an uncompressed tar file"):
        tar_source.TarCaptionSource(str(shards))


def test_shapes_caption_view_and_a_mixed_caption_batch(tmp_path):
    """ShapeEdit's caption view: the scene, its caption (shapes.describe), the instruction and
    the edited scene's caption, never the edited scene; then one batch of a mixture of every
    caption layout through the training input path."""
    import ml_collections

    from fireedit_jax.data import shapes
    from fireedit_jax.data.transforms import EditTransform, TextField, decode_image
    from fireedit_jax.train import inputs

    spec = {"kind": "shapes", "view": "captions", "split": "test", "num_samples": 4, "size": 32, "weight": 2.0}
    source = inputs.make_source("scenes", spec)
    edits = inputs.make_source("scenes", {**spec, "view": "edits"})
    config = shapes.ShapesConfig(size=32)
    for i in range(len(source)):
        record, sample = source[i], shapes.generate(config, "test", i)
        objects = [shapes.Obj(o["shape"], o["colour"], o["size"], tuple(round(v * 32) for v in o["box"]))
                   for o in sample["objects"]]  # fmt: skip
        assert record.task == Task.CAPTION and record.target_image is None and record.mask_image is None
        assert record.source_caption == shapes.describe(objects, 32) and record.instruction == sample["instruction"]
        assert record.target_caption == sample["target_caption"] != record.source_caption
        np.testing.assert_array_equal(decode_image(record.source_image), sample["source"])
        np.testing.assert_array_equal(record.boxes, sample["boxes"])
        assert edits[i].task == Task.EDIT and edits[i].target_image is not None
    with pytest.raises(ValueError, match="shapes source 'scenes': view='pairs'; choose one of edits, captions"):
        inputs.make_source("scenes", {**spec, "view": "pairs"})

    texts = {"source_caption": "a cup", "instruction": "make it red", "target_caption": "a red cup"}
    columns = {"image": [image_cell(png_bytes(7), "7.png")], "caption": ["a cup"], "instruction": ["make it red"],
               "target_caption": ["a red cup"]}  # fmt: skip
    pq.write_table(pa.table(columns), tmp_path / "c.parquet")
    write_tar(tmp_path / "0.tar", {"0.jpg": jpeg_bytes(8), "0.json": TEXTS})
    _write_image(str(tmp_path / "folder" / "0.png"), png_bytes(9))
    line = {"task": "caption", "source_image": "0.png", **texts}
    (tmp_path / "folder" / "metadata.jsonl").write_text(json.dumps(line))
    mixture = {"scenes": spec, "parquet": {"kind": "captions", "path": str(tmp_path / "c.parquet")},
               "tars": {"kind": "wds", "path": str(tmp_path / "0.tar")},
               "folder": {"kind": "jsonl", "path": str(tmp_path / "folder")}}  # fmt: skip
    config = ml_collections.ConfigDict({"seed": 0, "data": {"sources": mixture}})
    words = lambda text: [len(word) for word in text.split()]  # noqa: E731
    transform = EditTransform(resolution=16, texts=(TextField("caption", words, (64,), source="target_caption"),))
    iterator = inputs.make_train_iterator(config, transform, batch_size=10)
    batch = next(iterator)
    assert "target" not in batch and batch["source"].shape == (10, 16, 16, 3)
    assert (batch["task"] == Task.CAPTION).all()
    assert not batch["vlm_weight"].any() and not batch["diffusion_weight"].any()
    assert batch["caption_mask"].any(axis=1).all() and set(batch["source_index"]) == {0, 1, 2, 3}
    iterator.close()
