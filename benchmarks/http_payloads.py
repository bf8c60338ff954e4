"""Request bodies for driving `composekit serve` by hand: a multipart form and a PNG that is only a header.

Shared by the soak benchmark (``benchmarks/soak.py``) and the service's tests (``tests/test_serve.py``), so
both send exactly the same bytes. Standard library only.
"""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from typing import Any

__all__ = ["multipart_form", "header_only_png"]


def multipart_form(fields: dict[str, Any], files: dict[str, bytes]) -> tuple[bytes, str]:
    """``(body, content_type)`` of a ``multipart/form-data`` request: each field as text, each file as bytes."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, data in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.bin"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels and holds none (a few dozen bytes): what a pixel
    bomb looks like to a server that reads image sizes before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")
