"""What one client can make ``composekit serve`` spend: decoded pixels, memory kept, time on a connection.

- :class:`PixelBudget`: an upload's size says little about what it decodes to (a 255 kB PNG can hold
  81 megapixels, about 1 GB once decoded and converted). Each request's images are measured from their
  headers before any pixel is decoded and must fit a per-request budget and, together with the requests
  in flight, a server-wide one.
- :func:`give_back_memory`: after a large request, ask the C allocator to return freed memory to the
  system (glibc keeps freed arenas otherwise, and the process would stay at its peak).
- :func:`timed_protocol`: uvicorn's HTTP protocol with a deadline for a request's headers, so that a
  connection that opens and sends nothing, or sends its headers a byte at a time, is closed. (uvicorn
  itself times out idle keep-alive connections only; the body deadline is the ASGI guard's.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Any

__all__ = ["PixelBudget", "give_back_memory", "timed_protocol"]

logger = logging.getLogger(__name__)


class PixelBudget:
    """Decoded pixels: at most ``per_request`` for one request, at most ``in_flight`` for all requests that
    hold decoded images at once. Thread-safe."""

    def __init__(self, per_request: int, in_flight: int) -> None:
        self.per_request, self.in_flight = per_request, in_flight
        self.held = 0
        self.lock = threading.Lock()

    def take(self, pixels: int, sizes: str) -> tuple[int, str, str] | None:
        """Reserve ``pixels`` (``sizes`` describes them for the message); None when granted, else the answer:
        (413, kind, message) when this request can never fit, (503, kind, message) when it must wait."""
        mp = f"{pixels:,} pixels"
        if pixels > self.per_request:
            return 413, "ImageTooLarge", (
                f"the images decode to {mp} ({sizes}), over this server's per-request limit of "
                f"{self.per_request:,} (--max-request-megapixels {self.per_request / 1e6:g}); send smaller images")
        if pixels > self.in_flight:
            return 413, "ImageTooLarge", (
                f"the images decode to {mp} ({sizes}), over this server's limit for all requests in flight of "
                f"{self.in_flight:,} (--max-inflight-megapixels {self.in_flight / 1e6:g}); send smaller images")
        with self.lock:
            if self.held + pixels > self.in_flight:
                held = self.held
            else:
                self.held += pixels
                return None
        return 503, "Busy", (
            f"requests in flight hold {held:,} of the {self.in_flight:,} decoded pixels this server allows "
            f"(--max-inflight-megapixels {self.in_flight / 1e6:g}) and this one needs {mp}; retry shortly")

    def give(self, pixels: int) -> None:
        with self.lock:
            self.held -= pixels


_LIBC: Any = None


def give_back_memory() -> None:
    """Return the allocator's free memory to the system (glibc's ``malloc_trim``; a no-op elsewhere)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def timed_protocol(header_timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (httptools or h11, as uvicorn would pick) with a header deadline: a new
    connection, and a kept-alive one once the next request's first bytes arrive, must send complete headers
    within ``header_timeout_s`` or it is closed."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class TimedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _header_timer: Any = None
        _seen_cycle: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._seen_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("closed a connection that sent no complete request headers in %g s", header_timeout_s)
                self.transport.close()

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            idle = self._between_requests()
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are complete
                self._disarm()
                self._seen_cycle = self.cycle
            elif idle and self._header_timer is None and self._between_requests() and \
                    not self.transport.is_closing():
                self._arm()  # the first bytes of the next request on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedHTTPProtocol
