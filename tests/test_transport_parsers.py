"""The transports' parsers on their own: reliable-stream splitting, capsules, the extended
CONNECT check and the connection URL's query.

Inputs are built here (msgpack, hand-made varints and headers), never with the code under
test, so an encoder bug cannot hide a decoder bug.
"""

from __future__ import annotations

import time

import msgpack
import pytest
from aioquic.buffer import Buffer, encode_uint_var

from node.protocol import ProtocolError, parse_query
from node.transports.webtransport import check_connect
from node.transports.wt_session import (
    CLOSE_WEBTRANSPORT_SESSION,
    MAX_CAPSULE_BYTES,
    FrameSplitter,
    MessageTooBig,
    decode_close_capsule,
    encode_close_capsule,
    parse_capsules,
)

pytestmark = pytest.mark.unit


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def message_of(size: int) -> bytes:
    """A data-like map of exactly ``size`` packed bytes (sizes past the bin8 jump)."""
    overhead = len(pack({"t": "data", "pl": b"\0" * 256})) - 256
    body = pack({"t": "data", "pl": b"\0" * (size - overhead)})
    assert len(body) == size
    return body


def varint(value: int, size: int) -> bytes:
    """A QUIC varint of exactly ``size`` bytes (non-minimal encodings are valid)."""
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size]
    assert value < 1 << (8 * size - 2)
    return (value | prefix << (8 * size - 2)).to_bytes(size, "big")


def capsule(ctype: int, payload: bytes, type_size: int | None = None,
            len_size: int | None = None) -> bytes:
    t = encode_uint_var(ctype) if type_size is None else varint(ctype, type_size)
    n = encode_uint_var(len(payload)) if len_size is None else varint(len(payload), len_size)
    return t + n + payload


def feed_all(splitter: FrameSplitter, *chunks: bytes) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


# -- FrameSplitter -------------------------------------------------------------------

MESSAGES = [
    pack({"t": "control", "op": "channel_join", "c": "room", "pl": pack({"id": "alice"})}),
    pack({"t": "data", "c": "room", "pl": pack({"event": "e", "data": '"é😀"'})}),
    pack({"t": "control", "op": "peer_online", "c": "room"}),
    pack({"t": "data", "c": "r", "pl": b"\xc1" * 300}),  # bin16; the payload is never parsed
    b"\xce\x00\x00\x00\x01",  # 1 as a uint32: a non-canonical encoding, kept as sent
    pack([1, 2, {"nested": [None, True, 1.5]}]),
]
STREAM = b"".join(MESSAGES)


def test_splitter_cut_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        splitter = FrameSplitter(1 << 16)
        assert feed_all(splitter, STREAM[:cut], STREAM[cut:]) == MESSAGES, cut
        assert splitter.pending == 0


def test_splitter_fed_one_byte_at_a_time_reports_pending() -> None:
    splitter = FrameSplitter(1 << 16)
    ends = [sum(len(m) for m in MESSAGES[:i + 1]) for i in range(len(MESSAGES))]
    out: list[bytes] = []
    for i in range(len(STREAM)):
        out += splitter.feed(STREAM[i:i + 1])
        done = max((e for e in ends if e <= i + 1), default=0)
        assert splitter.pending == i + 1 - done, i
    assert out == MESSAGES


def test_splitter_several_messages_in_one_chunk_and_empty_feeds() -> None:
    splitter = FrameSplitter(1 << 16)
    assert splitter.feed(b"") == [] and splitter.pending == 0
    assert splitter.feed(STREAM + STREAM[:3]) == MESSAGES
    assert splitter.pending == 3
    assert splitter.feed(b"") == [] and splitter.pending == 3
    assert splitter.feed(STREAM[3:]) == MESSAGES


@pytest.mark.parametrize("max_message", [1000, 10_000])  # below and above its 4096-byte chunk
def test_splitter_message_exactly_at_the_limit_passes(max_message: int) -> None:
    body = message_of(max_message)
    assert FrameSplitter(max_message).feed(body) == [body]
    splitter = FrameSplitter(max_message)
    assert feed_all(splitter, *(body[i:i + 7] for i in range(0, len(body), 7))) == [body]
    assert splitter.pending == 0


@pytest.mark.parametrize("max_message", [1000, 10_000])
def test_splitter_message_one_byte_over_the_limit_is_too_big(max_message: int) -> None:
    with pytest.raises(MessageTooBig):
        FrameSplitter(max_message).feed(message_of(max_message + 1))


@pytest.mark.parametrize("max_message", [1000, 10_000])
def test_splitter_message_one_byte_over_fed_bytewise_is_too_big(max_message: int) -> None:
    body = message_of(max_message + 1)
    with pytest.raises(MessageTooBig):
        feed_all(FrameSplitter(max_message), *(body[i:i + 1] for i in range(len(body))))


@pytest.mark.parametrize("max_message", [1000, 10_000])
def test_splitter_message_far_over_the_limit_is_too_big(max_message: int) -> None:
    body = message_of(3 * max_message + 4096)
    with pytest.raises(MessageTooBig):
        FrameSplitter(max_message).feed(body)
    splitter = FrameSplitter(max_message)
    with pytest.raises(MessageTooBig):
        feed_all(splitter, *(body[i:i + 100] for i in range(0, len(body), 100)))


@pytest.mark.parametrize("garbage", [
    b"\xc1",  # the one byte msgpack never uses
    b"\xd4\x01\x00\xc1",  # a fixext1 is fine, the \xc1 after it is not
    b"\xc1" + MESSAGES[0],
])
def test_splitter_invalid_msgpack_is_a_protocol_error(garbage: bytes) -> None:
    splitter = FrameSplitter(1 << 16)
    with pytest.raises(ProtocolError) as info:
        splitter.feed(MESSAGES[0] + garbage)
    assert not isinstance(info.value, MessageTooBig)


# Headers that declare 1 GiB: bin32, str32, ext32, array32, map32.
HUGE_HEADERS = [b"\xc6", b"\xdb", b"\xc9", b"\xdd", b"\xdf"]


@pytest.mark.parametrize("kind", HUGE_HEADERS)
def test_splitter_huge_declared_length_buffers_at_most_max_message(kind: bytes) -> None:
    header = kind + (1 << 30).to_bytes(4, "big") + (b"\x01" if kind == b"\xc9" else b"")
    splitter = FrameSplitter(1000)
    started = time.monotonic()
    with pytest.raises(MessageTooBig):
        splitter.feed(header)
        for _ in range(100):
            splitter.feed(b"\x00" * 100)
            assert splitter.pending <= 1000
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("kind", HUGE_HEADERS)
def test_splitter_huge_declared_length_is_refused_on_the_header(kind: bytes) -> None:
    header = kind + (1 << 30).to_bytes(4, "big") + (b"\x01" if kind == b"\xc9" else b"")
    with pytest.raises(MessageTooBig):
        FrameSplitter(1000).feed(header + b"\x00" * 10)


# -- capsules ------------------------------------------------------------------------

def test_capsules_several_at_once_and_partial_ones_left_in_the_buffer() -> None:
    caps = [(CLOSE_WEBTRANSPORT_SESSION, b"\x00\x00\x03\xe9bye"), (0x78AE, b""),
            (0x17, b"grease"), (0x2843, b"x" * 300)]
    wire = b"".join(capsule(t, p) for t, p in caps)
    assert parse_capsules(bytearray(wire)) == caps
    for cut in range(len(wire) + 1):
        buf = bytearray(wire[:cut])
        first = parse_capsules(buf)
        assert caps[:len(first)] == first
        assert bytes(buf) == wire[len(b"".join(capsule(t, p) for t, p in first)):cut]
        buf += wire[cut:]
        assert first + parse_capsules(buf) == caps, cut
        assert buf == bytearray()


@pytest.mark.parametrize("n", [0, 1, 1000, (2**62 - 1 - 0x17) // 0x29])
def test_grease_capsules_parse_and_do_not_disturb_the_next(n: int) -> None:
    grease = 0x29 * n + 0x17  # reserved capsule types
    buf = bytearray(capsule(grease, b"\xff" * 5) + capsule(CLOSE_WEBTRANSPORT_SESSION, b"\0" * 4))
    assert parse_capsules(buf) == [(grease, b"\xff" * 5), (CLOSE_WEBTRANSPORT_SESSION, b"\0" * 4)]


@pytest.mark.parametrize("type_size", [1, 2, 4, 8])
@pytest.mark.parametrize("len_size", [1, 2, 4, 8])
def test_capsule_varints_of_every_size(type_size: int, len_size: int) -> None:
    ctype = {1: 0x17, 2: 0x2843, 4: 0x78AE, 8: 0x78AE}[type_size]
    payload = b"p" * 50
    wire = capsule(ctype, payload, type_size, len_size) + capsule(0x17, b"")
    assert parse_capsules(bytearray(wire)) == [(ctype, payload), (0x17, b"")]
    buf = bytearray(wire[:type_size + len_size - 1])  # the length varint cut short
    assert parse_capsules(buf) == [] and len(buf) == type_size + len_size - 1


def test_capsule_at_the_size_limit_waits_for_its_bytes_and_one_over_is_refused() -> None:
    wire = capsule(0x17, b"g" * MAX_CAPSULE_BYTES)
    buf = bytearray(wire[:-1])
    assert parse_capsules(buf) == [] and bytes(buf) == wire[:-1]
    buf += wire[-1:]
    assert parse_capsules(buf) == [(0x17, b"g" * MAX_CAPSULE_BYTES)]
    # Refused on the header alone: nothing of it needs to be buffered.
    with pytest.raises(ProtocolError):
        parse_capsules(bytearray(encode_uint_var(0x17) + encode_uint_var(MAX_CAPSULE_BYTES + 1)))
    with pytest.raises(ProtocolError):
        parse_capsules(bytearray(capsule(0x17, b"") + encode_uint_var(0x17)
                                 + varint(2**62 - 1, 8)))


def test_close_capsule_encoding() -> None:
    buf = Buffer(data=encode_close_capsule(4008, "channel full"))
    assert buf.pull_uint_var() == CLOSE_WEBTRANSPORT_SESSION
    length = buf.pull_uint_var()
    assert buf.pull_bytes(length) == (4008).to_bytes(4, "big") + b"channel full" and buf.eof()


@pytest.mark.parametrize(("reason", "sent"), [
    ("x" * 2000, b"x" * 1024),
    ("é" * 600, "é".encode() * 512),  # 1200 bytes: cut at 1024, on a character boundary
    ("x" * 1023 + "é", b"x" * 1023),  # the 2-byte character would end at 1025: dropped
])
def test_close_capsule_reason_is_cut_to_1024_bytes_of_valid_utf8(reason: str, sent: bytes) -> None:
    buf = Buffer(data=encode_close_capsule(1000, reason))
    assert buf.pull_uint_var() == CLOSE_WEBTRANSPORT_SESSION
    assert buf.pull_bytes(buf.pull_uint_var())[4:] == sent


def test_close_capsule_decoding() -> None:
    assert decode_close_capsule((2**32 - 1).to_bytes(4, "big") + "bye ✓".encode()) == (
        2**32 - 1, "bye ✓")
    assert decode_close_capsule(b"\0\0\0\0") == (0, "")
    assert decode_close_capsule(b"\0\0\x03\xe8\xff") == (1000, "\ufffd")  # not UTF-8: shown
    assert decode_close_capsule(b"\x01") == (0, "")  # too short for a code: a plain close


# -- check_connect -------------------------------------------------------------------

def connect_headers(**overrides: bytes | None) -> dict[bytes, bytes]:
    headers = {b":method": b"CONNECT", b":protocol": b"webtransport", b":scheme": b"https",
               b":authority": b"127.0.0.1:8443", b":path": b"/v1?publickey=k&id=alice"}
    for name, value in overrides.items():
        key = f":{name}".encode()
        if value is None:
            headers.pop(key)
        else:
            headers[key] = value
    return headers


def test_check_connect_accepts_what_chromium_sends() -> None:
    assert check_connect(connect_headers()) == (0, "", "publickey=k&id=alice")
    assert check_connect(connect_headers(path=b"/v1")) == (0, "", "")


@pytest.mark.parametrize(("overrides", "status", "said"), [
    ({"protocol": b"websocket"}, 400, "'websocket'"),
    ({"protocol": None}, 400, "'none'"),
    ({"protocol": b""}, 400, "'none'"),
    ({"protocol": b"WebTransport"}, 400, "use webtransport"),
    ({"scheme": b"http"}, 400, "'http'"),
    ({"scheme": None}, 400, ":scheme ''"),
    ({"path": b"/v2?id=a"}, 404, "/v2"),
    ({"path": b"/v1/"}, 404, "/v1/"),
    ({"path": b"/"}, 404, "at /"),
    ({"path": None}, 404, "endpoint at"),
    ({"protocol": b"\xff\xfewt"}, 400, "\ufffd"),
    ({"scheme": b"http\xc3"}, 400, "\ufffd"),
    ({"path": b"/v\xff1"}, 404, "\ufffd"),
])
def test_check_connect_refusals(overrides: dict[str, bytes | None], status: int,
                                said: str) -> None:
    got_status, reason, query = check_connect(connect_headers(**overrides))
    assert (got_status, query) == (status, "") and said in reason, reason


def test_check_connect_reasons_do_not_echo_long_input() -> None:
    for name in ("protocol", "scheme", "path"):
        _, reason, _ = check_connect(connect_headers(**{name: b"/" + b"A" * 10_000}))
        assert 0 < len(reason) < 200, name


def test_check_connect_non_utf8_query_is_replaced_not_fatal() -> None:
    assert check_connect(connect_headers(path=b"/v1?id=\xff")) == (0, "", "id=\ufffd")


@pytest.mark.parametrize("path", [b"//other/v1?id=a", b"https://other/v1?id=a"])
def test_check_connect_path_must_be_exactly_v1(path: bytes) -> None:
    assert check_connect(connect_headers(path=path))[0] == 404


# -- parse_query ---------------------------------------------------------------------

@pytest.mark.parametrize(("query", "params"), [
    ("publickey=k&id=alice", {"publickey": "k", "id": "alice"}),
    ("id=a%20b%2Fc%26d%3De", {"id": "a b/c&d=e"}),  # percent-decoded after splitting
    ("id=%C3%A9%F0%9F%98%80", {"id": "é😀"}),
    ("i%64=x", {"id": "x"}),  # names are decoded too
    ("id=a+b", {"id": "a+b"}),  # '+' is not a space here
    ("id=a%2Bb", {"id": "a+b"}),
    ("id=first&id=second", {"id": "first"}),
    ("id=&id=second", {"id": ""}),  # the first value wins even when empty
    ("id=", {"id": ""}),
    ("id", {"id": ""}),  # no '='
    ("flag&id=a", {"flag": "", "id": "a"}),
    ("id=a=b", {"id": "a=b"}),  # only the first '=' separates
    ("id=%zz", {"id": "%zz"}),  # a broken escape stays as written
    # A byte that is not UTF-8 stays a lone surrogate (check_client_id refuses it), not
    # U+FFFD: two different raw ids must not become one (issue 15).
    ("id=%ff", {"id": "\udcff"}),
])
def test_parse_query(query: str, params: dict[str, str]) -> None:
    got = parse_query(query)
    assert {k: v for k, v in got.items() if k} == params


@pytest.mark.parametrize("query", ["", "&", "&&id=a&&"])
def test_parse_query_empty_parts_are_harmless(query: str) -> None:
    got = parse_query(query)
    assert got.get("id", "a") == "a" and set(got) <= {"", "id"}
