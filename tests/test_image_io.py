"""One image decoder (``image_io.decode_rgb``) behind every reader: the same pixels for every
supported mode, depth and colour space in training (tf.data, folders and TFRecords), evaluation
(.bin sets, image lists), the deployed client and alignment."""
import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ppfr_jax import align, evaluate, image_io

S = 112
RNG = np.random.default_rng(0)
BASE = RNG.integers(0, 256, (S, S, 3), dtype=np.uint8)
# smooth content so lossy formats stay close to the source
YY, XX = np.mgrid[0:S, 0:S]
SMOOTH = np.stack([XX * 2, YY * 2, (XX + YY)], -1).clip(0, 255).astype(np.uint8)
W16 = RNG.integers(0, 65536, (S, S, 3), dtype=np.uint16)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _png_rgb48(a: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _png_claiming(w: int, h: int) -> bytes:
    """A few-byte 8-bit grey PNG whose header claims w x h pixels (its data is a stub)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _exif_orientation(value: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = value
    return ex.tobytes()


def _corpus():
    """name -> (encoded bytes, expected (S, S, 3) uint8, exact?)."""
    grey = BASE[..., 0]
    pal = Image.fromarray(BASE).quantize(64)
    pal_rgb = np.asarray(pal.getpalette()[:64 * 3], np.uint8).reshape(-1, 3)[np.asarray(pal)]
    rgb3 = lambda g: np.repeat(g[..., None], 3, 2)  # noqa: E731
    bits = grey > 127
    c = {
        "rgb.png": (_save(Image.fromarray(BASE), "PNG"), BASE, True),
        "grey.png": (_save(Image.fromarray(grey), "PNG"), rgb3(grey), True),
        "bilevel.png": (_save(Image.fromarray(bits), "PNG"), rgb3(bits.astype(np.uint8) * 255), True),
        "grey_alpha.png": (_save(Image.fromarray(np.stack([grey, BASE[..., 1]], -1), "LA"), "PNG"), rgb3(grey), True),
        "rgba.png": (_save(Image.fromarray(np.dstack([BASE, BASE[..., :1]]), "RGBA"), "PNG"), BASE, True),
        "palette.png": (_save(pal, "PNG"), pal_rgb, True),
        "palette_transparency.png": (_save(pal, "PNG", transparency=0), pal_rgb, True),
        "palette.gif": (_save(pal, "GIF"), pal_rgb, True),
        "grey16.png": (_save(Image.fromarray(W16[..., 0]), "PNG"), rgb3((W16[..., 0] >> 8).astype(np.uint8)), True),
        "rgb48.png": (_png_rgb48(W16), (W16 >> 8).astype(np.uint8), True),
        "rgb.bmp": (_save(Image.fromarray(BASE), "BMP"), BASE, True),
        "rgb.tiff": (_save(Image.fromarray(BASE), "TIFF"), BASE, True),
        "lossless.webp": (_save(Image.fromarray(BASE), "WEBP", lossless=True), BASE, True),
        # EXIF orientation 6 (display = stored rotated 90 degrees clockwise): stored sideways
        "exif_rotated.png": (_save(Image.fromarray(np.ascontiguousarray(np.rot90(BASE, 1))), "PNG",
                                   exif=_exif_orientation(6)), BASE, True),
        "baseline.jpg": (_save(Image.fromarray(SMOOTH), "JPEG", quality=95), SMOOTH, False),
        "progressive.jpg": (_save(Image.fromarray(SMOOTH), "JPEG", quality=95, progressive=True), SMOOTH, False),
        "grey.jpg": (_save(Image.fromarray(SMOOTH[..., 0]), "JPEG", quality=95), rgb3(SMOOTH[..., 0]), False),
        "cmyk.jpg": (_save(Image.fromarray(SMOOTH).convert("CMYK"), "JPEG", quality=95), SMOOTH, False),
        "exif_rotated.jpg": (_save(Image.fromarray(np.ascontiguousarray(np.rot90(SMOOTH, 1))), "JPEG", quality=95,
                                   exif=_exif_orientation(6)), SMOOTH, False),
    }
    return c


CORPUS = _corpus()
NAMES = sorted(CORPUS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "id0").mkdir()
    for name, (data, _, _) in CORPUS.items():
        (d / "id0" / name).write_bytes(data)
    return d


@pytest.mark.parametrize("name", NAMES)
def test_decode_every_kind(name, files):
    data, want, exact = CORPUS[name]
    got = image_io.decode_rgb(data, name)
    assert got.dtype == np.uint8 and got.shape == (S, S, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(image_io.decode_rgb(str(files / "id0" / name)), got)  # path == bytes
    if exact:
        np.testing.assert_array_equal(got, want)
    else:  # lossy: the right picture (orientation, colours), within JPEG error
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 4, name


def test_every_reader_gives_the_decoders_pixels(files, tmp_path):
    """Training (image folders and TFRecords through tf.data), .bin and image-list evaluation, the
    deployed client's reader and alignment: pixel-identical to ``decode_rgb`` for every file."""
    from ppfr_jax.data import pipeline, records, sources

    want = np.stack([image_io.decode_rgb(CORPUS[n][0]) for n in NAMES])
    kw = dict(global_batch=len(NAMES), flip=False, shuffle=False, output_dtype="uint8", process_index=0,
              process_count=1)
    folder = sources.image_folder_source(files)
    assert [os.path.basename(f) for f in folder.files] == NAMES
    np.testing.assert_array_equal(next(pipeline.TrainIterator(folder, **kw))["image"], want)
    recs = [(n, CORPUS[n][0], 0, None) for n in NAMES]
    out = records.write_tface_records(recs, tmp_path, "TFR-corpus")
    tfr = sources.tface_source(out["index"])
    np.testing.assert_array_equal(next(pipeline.TrainIterator(tfr, **kw))["image"], want)
    assert all(tfr.check(i) is None for i in range(len(tfr)))

    images, ok, _ = evaluate.decode_images([str(files / "id0" / n) for n in NAMES], size_hw=(S, S))
    assert ok.all()
    np.testing.assert_array_equal(images, want)  # ppfr-protect and pairs files read this way
    evaluate.save_bin(tmp_path / "corpus.bin", [CORPUS[n][0] for n in NAMES], [True] * (len(NAMES) // 2))
    vs = evaluate.load_bin_set(tmp_path / "corpus.bin")
    np.testing.assert_array_equal(vs.interleaved()[0], want[:2 * (len(NAMES) // 2)])

    # ppfr-align: the 16-bit file aligns exactly as its 8-bit reduction
    lm = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]) * 0.9 + 5
    a16, _ = align.align_face(image_io.decode_rgb(str(files / "id0" / "grey16.png")), lm)
    a8, _ = align.align_face(np.repeat((W16[..., :1] >> 8).astype(np.uint8), 3, 2), lm)
    np.testing.assert_array_equal(a16, a8)
    a_pil, _ = align.align_face(Image.open(io.BytesIO(CORPUS["grey16.png"][0])), lm)  # a PIL image: same rules
    np.testing.assert_array_equal(a_pil, a8)


def test_header_checks_before_decoding(tmp_path):
    # size and pixel budget are read from the header: a huge image is refused without decoding it
    big = _png_claiming(12000, 12000)  # 144M pixels claimed by a 100-byte file
    with pytest.raises(image_io.ImageDecodeError, match=r"big\.png: image is 12000x12000 .* more than"):
        image_io.decode_rgb(big, "big.png")
    with pytest.raises(image_io.ImageDecodeError, match=r"x: image is 12000x12000 \(WxH\), expected 112x112"):
        image_io.decode_rgb(big, "x", expect_hw=(S, S), max_pixels=2 ** 40)
    with pytest.raises(image_io.ImageDecodeError, match=r"huge\.png: image too large"):  # past PIL's own limit
        image_io.decode_rgb(_png_claiming(40000, 40000), "huge.png")
    with pytest.raises(image_io.ImageDecodeError, match=r"small\.png: .*more than the 100 pixels"):
        image_io.decode_rgb(CORPUS["rgb.png"][0], "small.png", max_pixels=100)
    # the EXIF orientation swaps width and height before the size check
    side = _save(Image.fromarray(np.zeros((S, 96, 3), np.uint8)), "PNG", exif=_exif_orientation(6))
    assert image_io.image_size(side) == (S, 96)
    assert image_io.decode_rgb(side, expect_hw=(96, S)).shape == (96, S, 3)


@pytest.mark.parametrize("data,match", [
    (b"", "cannot decode"), (b"not an image", "cannot decode"),
    (CORPUS["rgb.png"][0][:200], "cannot decode"), (CORPUS["baseline.jpg"][0][:300], "cannot decode"),
    (_save(Image.new("F", (4, 4)), "TIFF"), "unsupported image mode 'F'"),
])
def test_bad_files_raise_the_decoders_error_naming_them(data, match):
    with pytest.raises(image_io.ImageDecodeError, match=rf"^bad\.file: .*{match}"):
        image_io.decode_rgb(data, "bad.file")
    with pytest.raises(image_io.ImageDecodeError, match="nope.png: image not found"):
        image_io.decode_rgb("nope.png")


def test_bin_set_with_sixteen_bit_png_matches_training(tmp_path):
    """The case that differed: TF scaled a 16-bit grey PNG, PIL's convert('RGB') saturated it to white."""
    data = CORPUS["grey16.png"][0]
    with open(tmp_path / "g.bin", "wb") as f:
        pickle.dump(([data, data], [True]), f, protocol=4)
    vs = evaluate.load_bin_set(tmp_path / "g.bin")
    assert (vs.images[0] < 255).mean() > 0.9 and vs.images[0].std() > 30  # not saturated
    np.testing.assert_array_equal(vs.images[0], CORPUS["grey16.png"][1])


def test_decompression_bomb_is_refused_by_the_bytes_it_holds():
    flat = _save(Image.new("RGB", (2000, 2000)), "PNG")  # 12 MB of pixels from a ~12 KB file
    assert len(flat) * image_io.MAX_INFLATION < 3 * 2000 * 2000
    with pytest.raises(image_io.ImageDecodeError, match=r"bomb\.png: a \d+-byte file declares a 2000x2000 image"):
        image_io.decode_rgb(flat, "bomb.png")
    small = _save(Image.new("RGB", (250, 250)), "PNG")  # small flat images stay under the floor
    assert image_io.decode_rgb(small).shape == (250, 250, 3)


def test_unidentified_image_error_names_the_image_not_a_file_object(tmp_path):
    """PIL's text for unknown bytes carries '<_io.BytesIO object at 0x...>': the message names the image instead."""
    from ppfr_jax import image_io
    with pytest.raises(image_io.ImageDecodeError) as err:
        image_io.decode_rgb(b"notanimage", "batch/3.png")
    assert str(err.value) == ("batch/3.png: cannot decode image (10 bytes not in an image format PIL reads, "
                              "such as JPEG, PNG or BMP)")
    bad = tmp_path / "junk.jpg"
    bad.write_bytes(b"junk" * 10)
    with pytest.raises(image_io.ImageDecodeError, match=r"junk.jpg: cannot decode image \(file not in an image") as err:
        image_io.decode_rgb(str(bad), str(bad))
    assert "0x" not in str(err.value)
