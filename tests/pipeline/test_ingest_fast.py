"""What ingest's fast paths must keep: PIL's verdict on every JPEG header, stable ids, exact shards."""

from __future__ import annotations

import io
import random
import shutil
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.images import ImageError, _plain_jpeg_size, image_record
from pipeline.ingest import problem_id
from pipeline.rundir import ShardWriter, read_table, stable_hash
from pipeline.schema import PROBLEMS


def _jpeg(mode="RGB", size=(48, 40), **save) -> bytes:
    im = Image.new(mode, size)
    im.putdata([tuple((x * 37 + i) % 256 for i in range(len(mode))) if len(mode) > 1 else (x * 37) % 256
                for x in range(size[0] * size[1])])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **save)
    return buf.getvalue()


def _exif() -> bytes:
    ex = Image.Exif()
    ex[0x0110] = "camera"
    return ex.tobytes()


def _pil_header(data: bytes):
    """(format, size) as PIL's open reports it, None when PIL refuses (or would warn of a bomb)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(io.BytesIO(data)) as im:
                return im.format, im.size
    except Exception:  # noqa: BLE001 - any refusal counts as "PIL rejects"
        return None


PLAIN = {
    "rgb": _jpeg(),
    "grey": _jpeg("L", (31, 17)),
    "progressive": _jpeg(progressive=True),
    "optimized_q95": _jpeg(optimize=True, quality=95),
    "comment": _jpeg(comment=b"scanned page"),
    "subsampling_444": _jpeg(subsampling=0),
}
# segments PIL parses (EXIF, ICC, Adobe's APP14 that CMYK files carry): left to PIL
PARSED_BY_PIL = {"exif": _jpeg(exif=_exif()), "icc": _jpeg(icc_profile=b"\0" * 300), "cmyk": _jpeg("CMYK", (20, 22))}


@pytest.mark.parametrize("name", sorted(PLAIN) + sorted(PARSED_BY_PIL))
def test_structure_check_matches_pil_on_every_kind_of_jpeg(name):
    data = {**PLAIN, **PARSED_BY_PIL}[name]
    fmt, size = _pil_header(data)
    rec = image_record(data, "x", "structure")
    assert (rec["format"], (rec["width"], rec["height"])) == (fmt.lower(), size)
    assert rec["bytes"] is data
    # plain headers take the fast walk (so this test checks it), the others PIL
    assert (_plain_jpeg_size(data) is not None) == (name in PLAIN)


def test_fast_walk_never_accepts_a_header_pil_rejects():
    """Mutate headers (flip, cut, insert, delete bytes); whatever the walk accepts, PIL must accept with
    the same size. Rejections are safe by construction: they go to PIL."""
    rng = random.Random(1234)
    seeds = list(PLAIN.values())
    accepted = fell_back = 0
    for _ in range(3000):
        b = bytearray(rng.choice(seeds))
        hdr = min(len(b), 700)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(2, hdr)] = rng.randrange(256)
        elif kind == 1:
            del b[rng.randrange(2, hdr):]
        elif kind == 2:
            i = rng.randrange(2, hdr)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            i = rng.randrange(2, hdr)
            del b[i:i + rng.randint(1, 6)]
        data = bytes(b)
        size = _plain_jpeg_size(data)
        if size is None:
            fell_back += 1
            continue
        accepted += 1
        assert _pil_header(data) == ("JPEG", size), data[:64].hex()
    assert accepted > 300 and fell_back > 300


def test_damaged_jpegs_still_rejected():
    good = PLAIN["rgb"]
    with pytest.raises(ImageError, match="truncated JPEG"):
        image_record(good[: len(good) - 40], "cut.jpg", "structure")
    # a frame of 60000 x 60000 pixels: PIL's decompression-bomb guard, not the fast walk, decides
    sof = good.index(b"\xff\xc0")
    bomb = good[: sof + 5] + (60000).to_bytes(2, "big") * 2 + good[sof + 9:]
    assert _plain_jpeg_size(bomb) is None
    with pytest.raises(ImageError, match="bomb|exceeds limit"):
        image_record(bomb, "bomb.jpg", "structure")
    with pytest.raises(ImageError, match="not a readable image"):
        image_record(good[:2] + b"\x00" * 40 + good[2:], "junk.jpg", "structure")


@pytest.mark.parametrize(
    "question,images,answer",
    [("What is 2+2?", [], "4"), ("Ünïcödé ∑ \"quoted\" \\frac{1}{2}\n", [b"\x89PNG", PLAIN["rgb"]], "\\{1, 2\\}"),
     ("", [b""], "")],
)
def test_problem_id_is_the_stable_hash_of_question_images_answer(question, images, answer):
    assert problem_id(question, images, answer) == stable_hash(question, [stable_hash(b) for b in images], answer)


def _rows(n: int, img_bytes: int = 3000) -> list[dict]:
    rng = random.Random(n)
    return [{"problem_id": f"p{i}", "question": f"q{i}", "answer": str(i), "answer_type": "number",
             "images": [{"bytes": rng.randbytes(img_bytes), "format": "jpeg", "width": 1, "height": 1}]}
            for i in range(n)]


def _write(d: Path, rows: list[dict], batch: int, **kw) -> ShardWriter:
    with ShardWriter(d, PROBLEMS, "problems", rows_per_shard=50, **kw) as w:
        for i in range(0, len(rows), batch):
            w.write(pa.Table.from_pylist(rows[i:i + batch], schema=PROBLEMS))
    return w


def test_streamed_shards_match_whole_shards(tmp_path):
    rows = _rows(137)
    whole = _write(tmp_path / "whole", rows, 7)
    streamed = _write(tmp_path / "streamed", rows, 7, row_group_bytes=20_000)
    assert streamed.files == whole.files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert streamed.rows_written == 137
    for name in whole.files:
        a, b = pq.ParquetFile(tmp_path / "whole" / name), pq.ParquetFile(tmp_path / "streamed" / name)
        assert a.metadata.num_rows == b.metadata.num_rows
        assert a.metadata.num_row_groups == 1 and b.metadata.num_row_groups > 2
        assert b.schema_arrow.metadata[b"r1v.table"] == b"problems"
    assert read_table(tmp_path / "streamed").equals(read_table(tmp_path / "whole"))
    assert not list((tmp_path / "streamed").glob(".tmp-*"))


def test_streamed_writer_resumes_and_writes_empty_tables(tmp_path):
    d = tmp_path / "t"
    _write(d, _rows(60), 9, row_group_bytes=10_000)
    w = ShardWriter(d, PROBLEMS, "problems", rows_per_shard=50, resume=True, row_group_bytes=10_000)
    w.write(pa.Table.from_pylist(_rows(3), schema=PROBLEMS))
    w.close()
    assert [p.name for p in sorted(d.glob("part-*"))] == [f"part-0000{i}.parquet" for i in range(3)]
    assert read_table(d).num_rows == 63
    with ShardWriter(tmp_path / "empty", PROBLEMS, "problems", row_group_bytes=10_000):
        pass
    assert read_table(tmp_path / "empty").num_rows == 0


def test_a_failed_background_write_is_raised_and_leaves_no_shard(tmp_path):
    d = tmp_path / "gone"
    w = ShardWriter(d, PROBLEMS, "problems", rows_per_shard=50, row_group_bytes=1)
    shutil.rmtree(d)  # the shard's tmp file cannot be created
    with pytest.raises(OSError):
        with w:
            for r in _rows(40):
                w.write(pa.Table.from_pylist([r], schema=PROBLEMS))
    assert not d.exists() or not list(d.glob("part-*"))
    assert w._pool is None  # background thread stopped


def _ingest(mathv_dir: Path, out: Path, **cfg) -> pa.Table:
    from pipeline.ingest import IngestConfig, run
    from pipeline.runner import StageContext

    cols = {"id": "id", "question": "problem", "answer": "gold_answer", "images": "image_path", "choices": "options",
            "answer_text": "gold_option_text", "answer_type": None, "subject": "subject", "difficulty": "level"}
    src = {"kind": "jsonl", "path": str(mathv_dir / "testmini.jsonl"), "name": "mathv", "columns": cols}
    ctx = StageContext(run_dir=out, step="ingest", stage="ingest", round=0, out_dir=out / "ingest", inputs={},
                       run_config=None, fingerprint="t")
    assert run(IngestConfig(sources=[src], **cfg), ctx).kept == 304
    return read_table(out / "ingest")


def test_mathv_rows_from_the_fast_paths_are_what_pil_and_stable_hash_give(tmp_path, mathv_dir):
    table = _ingest(mathv_dir, tmp_path / "a")
    assert pq.ParquetFile(next((tmp_path / "a" / "ingest").glob("part-*.parquet"))).metadata.num_row_groups > 1
    for r in table.to_pylist():
        (im,) = r["images"]
        # the options are part of a multiple-choice problem's id
        opts = [r["choices"]] if r["choices"] else []
        assert r["problem_id"] == stable_hash(r["question"], [stable_hash(im["bytes"])], r["answer"], *opts)
        with Image.open(io.BytesIO(im["bytes"])) as pil:
            assert (im["format"], im["width"], im["height"]) == (pil.format.lower(), *pil.size)
    # the thread-pool path gives the same table, row for row
    assert _ingest(mathv_dir, tmp_path / "b", image_threads=2).equals(table)
