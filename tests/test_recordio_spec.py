"""ppfr_jax.data.recordio against packs built byte by byte from the format's own rules, not by our writer.

The rules, as dmlc-core ``src/recordio.cc`` (``RecordIOWriter::WriteRecord`` / ``RecordIOReader``)
and mxnet ``python/mxnet/recordio.py`` state them:

- a part is ``uint32 0xced7230a``, ``uint32 lrecord = cflag << 29 | length``, ``length`` bytes;
- a payload holding the magic at a 4-byte-aligned offset ``i`` is cut there (the 4 magic bytes are
  not written): first part cflag 1, middle parts cflag 2, last part cflag 3; else one part, cflag 0;
- only the end of the whole record is zero-padded to 4 bytes (every cut is aligned, so the parts
  before it need no padding);
- the payload is mxnet's ``IRHeader`` packed with ``struct.pack('IfQQ', flag, label, id, id2)``
  (native layout: 24 bytes on the machines mxnet runs on), then ``flag`` float32 labels if ``flag > 0``
  (``IRHeader.label`` is then 0), then the image bytes;
- ``.idx`` lines are ``'%s\\t%d\\n' % (key, byte offset)``;
- insightface: record 0 with ``flag > 0`` holds ``[first identity key, one past the last]``: images are
  keys ``1 .. label[0] - 1``; record 0 with ``flag == 0`` (insightface's newer ``RecBuilder``, which
  writes images from key 0): every key is an image.

No TensorFlow here (``tests/test_recordio.py`` needs it for its demo faces).
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from ppfr_jax.data import recordio
from ppfr_jax.data.records import BadRecordError

MAGIC_LE = b"\x0a\x23\xd7\xce"  # 0xced7230a as the little-endian uint32 dmlc-core writes


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _part(cflag: int, data: bytes) -> bytes:
    return MAGIC_LE + struct.pack("<I", (cflag << 29) | len(data)) + data


def _ir(flag: int, label: float, rid: int) -> bytes:
    h = struct.pack("IfQQ", flag, label, rid, 0)  # mxnet's _IR_FORMAT, native
    assert len(h) == 24
    return h


def _whole(payload: bytes) -> bytes:
    """One cflag-0 part and its padding: only for payloads without an aligned magic."""
    assert all(payload[i:i + 4] != MAGIC_LE for i in range(0, len(payload) - 3, 4))
    return _part(0, payload) + b"\0" * (-len(payload) % 4)


@pytest.fixture
def spec_pack(tmp_path):
    """Header + 3 images (one split in three parts) + 2 identity records, written by hand.

    Returns (folder, {key: (label, image bytes)}, the split record's payload and its framed bytes).
    """
    img1, img3 = _png(10), _png(200)
    assert len(img1) % 4 and len(img3) % 4  # both need padding
    # image 2: its bytes hold the magic at payload offsets 28 and 36 (aligned: the header is 24 bytes)
    img2 = b"abcd" + MAGIC_LE + b"efgh" + MAGIC_LE + b"xy"
    p2 = _ir(0, 0.0, 2) + img2
    framed2 = _part(1, p2[:28]) + _part(2, p2[32:36]) + _part(3, p2[40:]) + b"\0\0"
    records = [
        (0, _whole(_ir(2, 0.0, 0) + struct.pack("<2f", 4.0, 6.0))),       # header: ids at keys 4..5
        (1, _whole(_ir(0, 1.0, 1) + img1)),                               # label in IRHeader.label
        (2, framed2),                                                     # label 0, three parts
        (3, _whole(_ir(2, 0.0, 3) + struct.pack("<2f", 1.0, 77.0) + img3)),  # flag 2: label[0] = 1
        (4, _whole(_ir(2, 0.0, 4) + struct.pack("<2f", 2.0, 3.0))),       # identity 0: images [2, 3)
        (5, _whole(_ir(2, 0.0, 5) + struct.pack("<2f", 1.0, 2.0))),       # identity 1 (ranges not grouped)
    ]
    d = tmp_path / "pack"
    d.mkdir()
    blob, idx, off = b"", [], 0
    for key, framed in records:
        assert len(framed) % 4 == 0
        idx.append(f"{key}\t{off}\n")
        blob += framed
        off += len(framed)
    (d / "train.rec").write_bytes(blob)
    (d / "train.idx").write_text("".join(idx[:1] + idx[3:] + idx[1:3]))  # line order is not key order
    return d, {1: (1, img1), 2: (0, img2), 3: (1, img3)}, p2, framed2


def test_reader_on_hand_built_pack(spec_pack):
    d, want, _, _ = spec_pack
    src = recordio.recordio_source(d)
    assert src.keys.tolist() == [1, 2, 3]  # header label[0] = 4: keys 1..3, identity records left out
    assert src.num_classes == 2  # label[1] - label[0], no property file
    assert src.labels.tolist() == [want[k][0] for k in (1, 2, 3)]
    assert [src.read_bytes(i) for i in range(3)] == [want[k][1] for k in (1, 2, 3)]  # magic put back
    assert src.check(0) is None and src.check(2) is None
    (d / "property").write_text("2,112,112\n")
    assert recordio.recordio_source(d).num_classes == 2
    (d / "property").write_text("3,112,112\n")
    with pytest.raises(BadRecordError, match="property says 3 identities, the header record 0"):
        recordio.recordio_source(d)


def test_writer_frames_as_dmlc_core(spec_pack):
    _, _, p2, framed2 = spec_pack
    assert recordio._frame(p2) == framed2  # the split record, byte for byte
    # magic at offset 0 and at the very end: zero-length first / last parts, no padding
    p = MAGIC_LE + b"1234" + MAGIC_LE
    assert recordio._frame(p) == _part(1, b"") + _part(2, b"1234") + _part(3, b"")
    # an unaligned magic is not a cut
    q = b"12" + MAGIC_LE + b"3"
    assert recordio._frame(q) == _part(0, q) + b"\0"
    # and mxnet's pack: a number -> flag 0 and the label in the header; a sequence -> flag n, header label 0
    assert recordio._pack(3, b"img", 7) == _ir(0, 3.0, 7) + b"img"
    assert recordio._pack([3, 5], b"img", 7) == _ir(2, 0.0, 7) + struct.pack("<2f", 3, 5) + b"img"


def test_unpack_as_mxnet():
    flag, lab, img = recordio.unpack(_ir(3, 0.0, 9) + struct.pack("<3f", 5, 6, 7) + b"jpeg")
    assert flag == 3 and lab.tolist() == [5, 6, 7] and img == b"jpeg"
    flag, lab, img = recordio.unpack(_ir(0, 12.0, 9) + b"jpeg")
    assert flag == 0 and lab.tolist() == [12.0] and img == b"jpeg"
    with pytest.raises(ValueError, match="flag 2 needs 32 bytes"):
        recordio.unpack(_ir(2, 0.0, 9) + b"1234")


def test_pack_without_header_record(tmp_path):
    """insightface RecBuilder's layout: images from key 0, no header, every ``.idx`` key an image."""
    imgs = [_png(30 * k) for k in range(3)]
    blob, idx = b"", ""
    for k, img in enumerate(imgs):
        idx += f"{k}\t{len(blob)}\n"
        blob += _whole(_ir(0, float(k % 2), k) + img)
    d = tmp_path / "p"
    d.mkdir()
    (d / "train.rec").write_bytes(blob)
    (d / "train.idx").write_text(idx)
    src = recordio.recordio_source(d)
    assert src.keys.tolist() == [0, 1, 2] and src.labels.tolist() == [0, 1, 0] and src.num_classes == 2
    assert [src.read_bytes(i) for i in range(3)] == imgs


def test_reader_refuses_parts_out_of_order(spec_pack):
    d = spec_pack[0]
    rec = (d / "train.rec").read_bytes()
    off = {int(k): int(o) for k, o in (l.split("\t") for l in (d / "train.idx").read_text().splitlines())}
    bad = bytearray(rec)
    struct.pack_into("<I", bad, off[2] + 4, (2 << 29) | 28)  # a record cannot start with a middle part
    (d / "train.rec").write_bytes(bytes(bad))
    with pytest.raises(BadRecordError, match=rf"record 2 offset {off[2]} .*cflag 2, a record starts with 0 or 1"):
        recordio.recordio_source(d)
