"""The PNG writer, base64 and the response bodies built as bytes."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from sd35 import png, responses
from sd35.imaging import UploadError, b64encode, encode_image, probe_upload, read_upload
from sd35.protocol import ImagesResponse, ImageStreamEvent


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with grain, like a generated picture."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC)).astype(np.float32)
    return np.clip(smooth + rng.normal(0, 3, smooth.shape), 0, 255).astype(np.uint8)


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, payload) of every chunk, checking each CRC the way a strict decoder does."""
    assert data[:8] == png.SIGNATURE
    found, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, payload = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        found.append((kind, payload))
        offset += 12 + length
    assert offset == len(data), "bytes after the last chunk"
    return found


@pytest.mark.parametrize(
    ("image", "threads"),
    [
        (photo_like(1024, 1024), None),
        (noise(1024, 1024), None),
        (noise(1024, 1024), 7),  # more parts than this machine has cores
        (photo_like(768, 256), 3),
        (noise(256, 1536), 1),
        (noise(3, 5), 4),  # far below one part's size
    ],
    ids=["photo-1024", "noise-1024", "noise-1024-7-parts", "photo-256x768", "noise-1536x256-1-part", "tiny"],
)
def test_png_is_standard_and_lossless(image: np.ndarray, threads: int | None) -> None:
    data = png.encode_png(image, threads=threads)
    found = chunks(data)
    assert [kind for kind, _ in found] == [b"IHDR", b"IDAT", b"IEND"]
    assert found[0][1] == struct.pack(">IIBBBBB", image.shape[1], image.shape[0], 8, 2, 0, 0, 0)
    # zlib checks the header and the Adler-32 of the whole stream, and refuses trailing or missing data.
    decompressor = zlib.decompressobj()
    scanlines = decompressor.decompress(found[1][1])
    assert decompressor.eof and not decompressor.unused_data
    assert len(scanlines) == image.shape[0] * (image.shape[1] * 3 + 1)
    for decoded in (
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
        imagecodecs.png_decode(data),  # libpng
    ):
        assert decoded.shape == image.shape
        assert np.array_equal(decoded, image)


def test_png_is_split_across_threads_on_large_images() -> None:
    image = noise(1024, 1024)
    one, several = png.encode_png(image, threads=1), png.encode_png(image, threads=4)
    assert one != several, "four threads should compress four independent parts"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(several))), np.asarray(Image.open(io.BytesIO(one))))
    # Independent parts cost a few bytes each, not a ratio.
    assert len(several) - len(one) < 1024


def test_png_size_stays_close_to_libpng() -> None:
    """ISA-L level 1 against libpng + zlib-ng level 1 (the previous encoder): within 10 % either way."""
    for image in (photo_like(512, 512), noise(512, 512)):
        ours, libpng = len(png.encode_png(image)), len(imagecodecs.png_encode(image, level=1))
        assert 0.9 < ours / libpng < 1.1, (ours, libpng)


def test_png_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        png.encode_png(np.zeros((4, 4, 3), np.float32))


def test_encode_image_png_and_jpeg() -> None:
    image = photo_like(256, 512)
    assert Image.open(io.BytesIO(encode_image(image, "png"))).format == "PNG"
    jpeg = Image.open(io.BytesIO(encode_image(image, "jpeg", 80)))
    assert (jpeg.format, jpeg.size) == ("JPEG", (512, 256))


def test_b64encode_is_standard_base64() -> None:
    for data in (b"", b"a", b"ab", b"abc", bytes(range(256)) * 1000):
        assert b64encode(data) == base64.b64encode(data)


def test_images_body_is_the_openai_shape() -> None:
    first, second = b64encode(b"\x89PNG one"), b64encode(b"\x89PNG two")
    body = responses.images_body(
        1700000000,
        [responses.b64_item(first), responses.b64_item(second)],
        background="opaque",
        output_format="png",
        quality=None,
        size="1024x768",
    )
    parsed = json.loads(body)
    assert parsed == {
        "created": 1700000000,
        "data": [{"b64_json": first.decode()}, {"b64_json": second.decode()}],
        "background": "opaque",
        "output_format": "png",
        "size": "1024x768",
    }
    assert list(parsed) == ["created", "data", "background", "output_format", "size"]
    assert ImagesResponse.model_validate(parsed).model_dump(exclude_none=True) == parsed


def test_url_items_are_json_escaped() -> None:
    url = 'https://example.com/a "quoted" \\ path/é.png'
    parsed = json.loads(responses.images_body(1, [responses.url_item(url)], output_format="webp"))
    assert parsed == {"created": 1, "data": [{"url": url}], "output_format": "webp"}


def test_events_are_server_sent_json() -> None:
    image = b64encode(b"pixels")
    payload = {"created_at": 5, "background": "opaque", "output_format": "png", "quality": "auto"}
    payload |= {"size": "256x256", "image_index": 0, "partial_image_index": 1}
    raw = responses.event("image_generation.partial_image", payload, image)
    assert raw.startswith(b"event: image_generation.partial_image\ndata: ") and raw.endswith(b"\n\n")
    data = json.loads(raw.split(b"data: ", 1)[1])
    assert data == {"type": "image_generation.partial_image", "b64_json": image.decode(), **payload}
    ImageStreamEvent.model_validate(data)
    error = json.loads(responses.event("error", {"error": {"message": "x"}}).split(b"data: ", 1)[1])
    assert error == {"type": "error", "error": {"message": "x"}}


# --- uploads -------------------------------------------------------------------------------------


def _saved(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_probing_an_upload_reads_only_its_header() -> None:
    whole = _saved(Image.new("RGB", (300, 200), (10, 20, 30)), "PNG")
    truncated = whole[: len(whole) // 2]  # a header, and half its pixels
    probed = probe_upload(truncated, "image[1]", "image")
    assert (probed.format, probed.size) == ("PNG", (300, 200))
    with pytest.raises(UploadError, match=r"'image\[1\]' is not a readable"):
        read_upload(truncated, "image[1]", "image")


def test_the_pixel_budget_is_checked_from_the_header() -> None:
    # 1 x 20000² would be 400 MB of pixels; the file itself is a few kB.
    huge = _saved(Image.new("L", (20_000, 1000)), "PNG")
    with pytest.raises(UploadError, match="more than 16777216 pixels") as refused:
        probe_upload(huge, "image", "image")
    assert refused.value.field == "image"


def test_mpo_photos_are_read_from_their_first_frame() -> None:
    first, second = Image.new("RGB", (64, 48), (250, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 250))
    mpo = _saved(first, "MPO", save_all=True, append_images=[second])
    image = read_upload(mpo, "image", "image")
    assert image.format == "MPO" and image.size == (64, 48)
    red, _, blue = image.convert("RGB").getpixel((10, 10))
    assert red > 200 and blue < 50
