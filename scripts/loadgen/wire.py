"""The client side of the WebSocket wire (RFC 6455), hand-rolled to stay cheap.

The load generator usually shares the machine it measures, so it builds
frames itself instead of going through a WebSocket library: the opening
handshake (section 4.1), masked client frames (sections 5.2 and 5.3) and
close payloads (section 5.5.1). Frames are parsed in ``client.py``.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct

#: RFC 6455 section 1.3: appended to Sec-WebSocket-Key before hashing.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


def handshake_request(host_header: str, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request and the Sec-WebSocket-Accept it must get back."""
    key = base64.b64encode(random.randbytes(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode()
    return request, accept


#: A masking key that leaves the payload as it is: the benches' own clients
#: use it so that making a frame costs them nothing (a server must accept
#: any key; RFC 6455 section 5.3 asks clients for unpredictable ones).
ZERO_KEY = b"\0\0\0\0"


def client_frame(payload: bytes, opcode: int = TEXT, *, fin: bool = True,
                 key: bytes | None = None) -> bytes:
    """One frame (the last of its message unless ``fin`` is False), masked
    as RFC 6455 section 5.3 requires of clients: with a random key, or
    ``key``. Every client frame of scripts/ is made here."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 0x10000:
        header = struct.pack("!BBH", first, 0xFE, n)
    else:
        header = struct.pack("!BBQ", first, 0xFF, n)
    key = random.randbytes(4) if key is None else key
    if not n or key == ZERO_KEY:
        return header + key + payload
    # XOR as one big integer: far cheaper in Python than byte by byte.
    stream = (key * ((n + 3) // 4))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + masked


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the 2-byte code, then at most 120 bytes of reason."""
    return code.to_bytes(2, "big") + reason.encode()[:120]
