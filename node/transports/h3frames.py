"""HTTP/3 frame lengths checked before aioquic buffers a frame (issue 15, item 1).

aioquic keeps a request stream's bytes until a frame other than DATA is complete, and
re-copies all it holds on every packet: a HEADERS frame that declares megabytes and is
trickled costs the square of its size (3-6 MiB in 4 s took 3-4 s of CPU and pushed another
peer's round trip from 1 ms to 70-200 ms). The header limits (431) only apply once the frame
is complete. Here each request stream's frame headers are read as the bytes arrive (O(1)
per packet: the payloads are skipped by count), and a frame other than DATA that declares
more than the limit is refused before anything is buffered.
"""

from __future__ import annotations

#: HTTP/3 frame types that aioquic does not buffer whole: DATA (streamed) and the
#: WebTransport bidirectional stream signal (raw data follows, no more frames).
_DATA = 0x0
_WEBTRANSPORT_STREAM = 0x41


def _varint(buf: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """A QUIC variable-length integer at ``at``: (value, next offset), None if incomplete."""
    if at >= len(buf):
        return None
    size = 1 << (buf[at] >> 6)
    if at + size > len(buf):
        return None
    value = buf[at] & 0x3F
    for i in range(1, size):
        value = (value << 8) | buf[at + i]
    return value, at + size


def _next_frame(data: bytes, at: int, left: int,
                head: bytes) -> tuple[int, int, bytes, tuple[int, int] | None]:
    """Skip ``left`` payload bytes, then read the next frame header (a partial one is
    ``head``): (offset, payload left, partial header, (type, declared length) or None when
    the data ran out first)."""
    if left:
        step = min(left, len(data) - at)
        left -= step
        at += step
        if left or at >= len(data):
            return at, left, head, None
    chunk = head + data[at:at + 16]
    kind = _varint(chunk, 0)
    length = _varint(chunk, kind[1]) if kind is not None else None
    if kind is None or length is None:
        return len(data), 0, chunk, None  # (at most 16 bytes kept)
    return at + length[1] - len(head), 0, b"", (kind[0], length[0])


class FrameLengths:
    """Where each request stream's next frame header starts; its declared length checked."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: stream id -> [payload bytes left in the current frame, a partial frame header];
        #: None once the stream carries raw WebTransport data.
        self.streams: dict[int, list[object] | None] = {}

    def check(self, stream_id: int, data: bytes, ended: bool) -> str:
        """Why this data must not reach aioquic ("" if it may)."""
        state = self.streams.get(stream_id, [0, b""])
        if state is None:
            if ended:
                del self.streams[stream_id]
            return ""
        left, head = state  # type: ignore[misc]
        assert isinstance(left, int) and isinstance(head, bytes)
        at = 0
        while at < len(data):
            at, left, head, frame = _next_frame(data, at, left, head)
            if frame is None:
                continue
            kind, length = frame
            if kind == _WEBTRANSPORT_STREAM:
                if ended:
                    self.streams.pop(stream_id, None)
                else:
                    self.streams[stream_id] = None
                return ""
            if kind != _DATA and length > self.limit:
                self.streams.pop(stream_id, None)
                return (f"HTTP/3 frame of type 0x{kind:x} declares {length} bytes, "
                        f"more than {self.limit}")
            left = length
        if ended:
            self.streams.pop(stream_id, None)
        else:
            self.streams[stream_id] = [left, head]
        return ""

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)


#: Client unidirectional stream types (RFC 9114 6.2, RFC 9204 4.2).
_CONTROL = 0x00
_QPACK_ENCODER = 0x02
#: Any other stream type: nothing to check.
_OTHER = -1
#: Control frames aioquic buffers whole before handling (other types it skips as they come).
_BUFFERED_CONTROL = frozenset({0x04, 0x0D})  # SETTINGS, MAX_PUSH_ID
#: What a SETTINGS frame may declare: a browser's is tens of bytes (a few settings and
#: GREASE); MAX_PUSH_ID holds one varint.
CONTROL_FRAME_LIMIT = 4096
#: The QPACK dynamic table capacity the server announces (aioquic's H3Connection default):
#: no string on the encoder stream can be longer and still fit an entry.
QPACK_TABLE_CAPACITY = 4096
#: Length prefix of each QPACK encoder instruction's first string (RFC 9204 4.3): insert
#: with a name reference (1T + 6-bit index: the value string follows), with a literal
#: name (01H + 5-bit name length), set capacity (001 + 5 bits), duplicate (000 + 5 bits).
_QPACK_INT_BYTES = 10  # a prefix integer longer than this is not a sane length


def _prefix_int(buf: bytes | bytearray, at: int, bits: int) -> tuple[int, int] | None:
    """An HPACK/QPACK prefix integer (RFC 7541 5.1): (value, next offset), None if
    incomplete; -1 as the value if it is longer than any sane one."""
    if at >= len(buf):
        return None
    mask = (1 << bits) - 1
    value = buf[at] & mask
    at += 1
    if value < mask:
        return value, at
    shift = 0
    for i in range(at, min(len(buf), at + _QPACK_INT_BYTES)):
        value += (buf[i] & 0x7F) << shift
        shift += 7
        if not buf[i] & 0x80:
            return value, i + 1
    return (-1, at) if len(buf) >= at + _QPACK_INT_BYTES else None


class UniStreams:
    """A client's unidirectional streams, checked before aioquic sees their bytes.

    aioquic buffers a SETTINGS or MAX_PUSH_ID frame on the control stream until it is
    complete, re-copying the buffer on every packet, whatever length it declares; and it
    hands the QPACK encoder stream to the QPACK library whole. Here the control stream's
    frame headers are read as they arrive (payloads skipped by count) and a buffered frame
    type declaring more than :data:`CONTROL_FRAME_LIMIT` is refused; on the encoder stream
    each string's declared length is read and one longer than the table capacity refused.
    What is kept per stream is a partial header (at most 16 bytes)."""

    def __init__(self) -> None:
        #: stream id -> [stream type (None: not read yet), bytes to skip, partial header,
        #: encoder stream: strings still to come in the current instruction]
        self.streams: dict[int, list[object]] = {}

    def check(self, stream_id: int, data: bytes, ended: bool) -> tuple[int, str]:
        """(H3 error code, why) if this data must not reach aioquic, else (0, "")."""
        state = self.streams.get(stream_id)
        if state is None:
            state = self.streams[stream_id] = [None, 0, b"", 0]
        if ended:  # (the control stream must not end: aioquic closes the connection)
            del self.streams[stream_id]
        elif state[0] == _OTHER:
            return 0, ""
        kind, skip, head, strings = state
        assert isinstance(skip, int) and isinstance(head, bytes) and isinstance(strings, int)
        at = 0
        if kind is None:
            got = _varint(head + data[:8], 0)
            if got is None:
                state[2] = (head + data)[:8]
                return 0, ""
            kind, at = got[0], got[1] - len(head)
            head = b""
            state[0] = kind
        if kind == _CONTROL:
            why = self._control(state, data, at, skip, head)
            return (0x107, why) if why else (0, "")  # H3_EXCESSIVE_LOAD
        if kind == _QPACK_ENCODER:
            why = self._encoder(state, data, at, skip, head, strings)
            return (0x201, why) if why else (0, "")  # QPACK_ENCODER_STREAM_ERROR
        # The decoder stream carries integers only; WebTransport streams are the session's
        # (node/transports/wt_session.py); other types aioquic discards.
        state[0] = _OTHER
        return 0, ""

    @staticmethod
    def _control(state: list[object], data: bytes, at: int, skip: int, head: bytes) -> str:
        while at < len(data):
            at, skip, head, frame = _next_frame(data, at, skip, head)
            if frame is None:
                continue
            kind, length = frame
            if kind in _BUFFERED_CONTROL and length > CONTROL_FRAME_LIMIT:
                return (f"HTTP/3 control frame of type 0x{kind:x} declares {length} "
                        f"bytes, more than {CONTROL_FRAME_LIMIT}")
            skip = length
        state[1], state[2] = skip, head
        return ""

    @staticmethod
    def _encoder(state: list[object], data: bytes, at: int, skip: int, head: bytes,
                 strings: int) -> str:
        while at < len(data):
            if skip:
                step = min(skip, len(data) - at)
                skip -= step
                at += step
                continue
            chunk = head + data[at:at + 16]
            first = chunk[0]
            if strings:  # a string: H + 7-bit length
                got, bits = _prefix_int(chunk, 0, 7), 7
            elif first & 0x80:  # insert with a name reference: its index, then the value
                got, bits = _prefix_int(chunk, 0, 6), 6
            elif first & 0x40:  # insert with a literal name: the name's length
                got, bits = _prefix_int(chunk, 0, 5), 5
            else:  # set capacity, duplicate: an integer
                got, bits = _prefix_int(chunk, 0, 5), 5
            if got is None:
                head, at = chunk, len(data)
                break
            at += got[1] - len(head)
            head = b""
            value = got[0]
            string = strings or (bits == 5 and first & 0x40)
            if string and not (0 <= value <= QPACK_TABLE_CAPACITY):
                return (f"QPACK encoder stream: a string declares "
                        f"{value if value >= 0 else 'an endless'} bytes, more than the "
                        f"table capacity {QPACK_TABLE_CAPACITY}")
            if strings:
                strings -= 1
                skip = value
            elif first & 0x80:
                strings = 1  # the value
            elif first & 0x40:
                strings, skip = 1, value  # the name's bytes, then the value
        state[1], state[2], state[3] = skip, head, strings
        return ""

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
