"""What the split server accepts from an authenticated but untrusted peer, and how it says no.

* :func:`parse`: a request's raw bytes into its protobuf message. The server registers its RPCs with
  raw-bytes deserializers and parses here, so a message that is not valid protobuf is an
  ``INVALID_ARGUMENT`` that names the message type (gRPC's own deserializer answers ``INTERNAL`` and logs a
  traceback per request).
* :func:`check_client_id`: ids are 1 to ``MAX_CLIENT_ID_BYTES`` characters of ``[A-Za-z0-9._-]``, so an id
  kept in the server's state or printed in its log has a bounded size and no control characters.
* :class:`RateLimitedLog`: the server logs refused requests, but at most one line per kind of refusal per
  interval, with a count of those it left out: a peer that sends garbage in a loop cannot flood the log.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from google.protobuf import message as pb_message

from qtl_jax.split import wire

MAX_CLIENT_ID_BYTES = 64
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_CLIENT_ID_BYTES)
_SHOWN = 24  # characters of a refused id quoted back (never the whole of a hostile one)

Message = TypeVar("Message", bound=pb_message.Message)


def preview(text: str, limit: int = _SHOWN) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, with its full length when cut."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_client_id(client_id: str) -> str:
    """``client_id`` if it is 1 to 64 characters of ``[A-Za-z0-9._-]``; :class:`~qtl_jax.split.wire.WireError` otherwise."""
    if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
        raise wire.WireError(f"client_id={preview(client_id)}: a client id is 1 to {MAX_CLIENT_ID_BYTES} characters "
                             "of A-Z a-z 0-9 . _ - (set --client_id on the client).")
    return client_id


def parse(message_type: type[Message], data: bytes) -> Message:
    """``data`` parsed as a ``message_type``; :class:`~qtl_jax.split.wire.WireError` naming the type if it is not one."""
    msg = message_type()
    try:
        msg.ParseFromString(data)
    except pb_message.DecodeError as e:
        # The decoder's own message ("Wire format was corrupt", "String field had bad UTF-8") says what broke.
        reason = str(e).rpartition(": ")[2] or "cannot be parsed"
        raise wire.WireError(f"the request ({len(data)} bytes) is not a valid {message_type.DESCRIPTOR.full_name} "
                             f"protobuf message: {reason}.") from None
    return msg


class RateLimitedLog:
    """At most one line per ``key`` per ``interval_s`` seconds; the next line says how many were left out.

    Keys must come from a small fixed set (e.g. status code names): the state kept is one entry per key.
    Thread-safe (gRPC handlers run on a thread pool).

    Args:
      write: where a line goes (e.g. ``logging.getLogger(...).warning``).
      interval_s: the shortest time between two lines of one key.
      clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, write: Callable[[str], None], interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}.")
        self._write, self._interval, self._clock = write, float(interval_s), clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def __call__(self, key: str, line: str) -> bool:
        """Writes ``line`` unless a line of ``key`` was written less than ``interval_s`` ago; True if written."""
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._left_out[key] = self._left_out.get(key, 0) + 1
                return False
            left_out = self._left_out.pop(key, 0)
            self._last[key] = now
        if left_out:
            line += f" ({left_out} more like it in the last {now - last:.0f} s not logged)"
        self._write(line)
        return True
