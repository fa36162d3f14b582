"""A fast writer of standard, lossless RGB PNGs: Sub-filtered rows, deflated by ISA-L on several cores at once.

A PNG's pixels are one zlib stream, but a deflate stream can be made of
independently compressed parts: each part but the last ends with a full flush
(a byte-aligned empty stored block, no final-block bit), so the parts
concatenate into one valid stream. No part refers back into another, which
costs a few bytes per part, not a measurable ratio. The result is an ordinary
8-bit RGB PNG with one IDAT chunk that every decoder reads.

Measured on a 1024² image on these 2-core machines (bench/cpu.py): libpng with
zlib-ng at level 1 (imagecodecs) ~75-120 ms; ISA-L level 1 on one core ~7-10 ms
and on two ~5-9 ms, for a file 5 % smaller on a photo-like image and 2 % larger
on noise. The Sub filter (each byte minus the one a pixel to its left) is what
libpng's fast setting uses too; on generated pictures it compresses as well as
Up and far better than none.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import struct

import numpy as np
from isal import isal_zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ISA-L's levels are 0-3; 1 compresses as well as 2-3 on images at the same speed, 0 gives up ~15 % of the size.
LEVEL = 1
# A part smaller than this is not worth handing to another thread.
MIN_PART_BYTES = 256 * 1024
_SUB = 1
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, "fastest" level hint; the check bits make it a multiple of 31

THREADS = os.cpu_count() or 2
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="sd35-deflate")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))


def sub_filtered(pixels: np.ndarray) -> np.ndarray:
    """PNG scanlines of an ``(H, W, 3)`` uint8 image: a filter byte (Sub), then each byte minus its left pixel's."""
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    out = np.empty((height, width * channels + 1), np.uint8)
    out[:, 0] = _SUB
    out[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=out[:, 1 + channels :])  # wraps modulo 256, as PNG wants
    return out


def _deflate(part: memoryview, last: bool) -> list[bytes]:
    """Raw deflate of one part; all parts but the last end byte-aligned and open, so they concatenate."""
    compressor = isal_zlib.compressobj(LEVEL, isal_zlib.DEFLATED, -15)
    return [compressor.compress(part), compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_FULL_FLUSH)]


def _parts(size: int, row_bytes: int, most: int) -> list[tuple[int, int]]:
    """Byte ranges of about equal size, on row boundaries, at most ``most`` of them."""
    rows = size // row_bytes
    count = max(1, min(most, size // MIN_PART_BYTES, rows))
    bounds = [round(i * rows / count) * row_bytes for i in range(count + 1)]
    return list(itertools.pairwise(bounds))


def encode_png(pixels: np.ndarray, threads: int | None = None) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as a PNG, compressing on up to ``threads`` cores (default: all)."""
    height, width, channels = pixels.shape
    if channels != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {pixels.shape} {pixels.dtype}")
    scanlines = sub_filtered(pixels)
    data = memoryview(scanlines.reshape(-1))
    ranges = _parts(len(data), scanlines.shape[1], threads or THREADS)
    # The calling thread compresses the last part itself while the pool does the others.
    futures = [_pool.submit(_deflate, data[start:end], False) for start, end in ranges[:-1]]
    start, end = ranges[-1]
    last = _deflate(data[start:end], True)
    adler = struct.pack(">I", isal_zlib.adler32(data))
    stream = [_ZLIB_HEADER, *(piece for future in futures for piece in future.result()), *last, adler]
    length = sum(len(piece) for piece in stream)
    crc = isal_zlib.crc32(b"IDAT")
    for piece in stream:
        crc = isal_zlib.crc32(piece, crc)
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB, no interlace
    return b"".join(
        [SIGNATURE, header, struct.pack(">I", length), b"IDAT", *stream, struct.pack(">I", crc), _chunk(b"IEND", b"")]
    )
