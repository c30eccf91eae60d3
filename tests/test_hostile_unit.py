"""Issue 15, the pure rules: what a hostile frame may cost (node/protocol.py, node/limits.py).

The socket-level outcomes (the offender closed or refused, others served) are in
tests/test_hostile.py and tests/test_hostile_http.py; SECURITY.md has the cost model.
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node import protocol
from node.config import Settings
from node.limits import DROP, OK, Guard
from node.presence import Close, Peer, Presence
from node.protocol import ProtocolError, Signalling

pytestmark = pytest.mark.unit


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def state_frame(channel: str, pl: bytes) -> bytes:
    return pack({"t": "control", "op": "peer_state", "c": channel, "pl": pl})


# -- (2) the rate limit cannot be multiplied by channels ---------------------------------


def _guard(**env: str) -> tuple[Guard, Presence]:
    presence = Presence("m")
    return Guard(Settings.from_env(env), presence), presence


def _join(g: Guard, p: Presence, peer: Peer, channel: str, now: float) -> Any:
    sig = Signalling(t="control", op="channel_join", c=channel)
    verdict = g.check(peer, sig, now)
    if verdict == OK:
        p.handle(peer, sig)
    return verdict


def _peer(g: Guard, p: Presence, sid: str, now: float = 0.0) -> Peer:
    peer = Peer(sid=sid, client_id=sid, app="app", transport="t")
    p.connect(peer)
    g.opened(peer, now)
    return peer


def online(c: str) -> Signalling:
    return Signalling(t="control", op="peer_online", c=c)


def state(c: str) -> Signalling:
    return Signalling(t="control", op="peer_state", c=c, pl=pack({}))


def test_a_rejoin_costs_one_token_per_channel_and_buys_no_more_than_it_pays() -> None:
    """The issue's attack: re-join one of 64 channels, then spend the announcement credit
    on every channel. Each round now costs 64 tokens for the 128 credited answers, so over
    ten seconds the sender gets at most about three times the rate through, not 124x."""
    g, p = _guard(RATE_LIMIT="10", RATE_BURST="20", MAX_CHANNELS_PER_PEER="64")
    attacker = _peer(g, p, "a", -10_000.0)
    channels = [f"c{i}" for i in range(64)]
    for i, c in enumerate(channels):  # joined long ago: the debt is paid back by t=0
        now = -10_000.0 + 100 * i
        assert _join(g, p, attacker, c, now) == OK
        for answered in channels[:i + 1]:  # each ack answered, as the real client does
            assert g.check(attacker, online(answered), now) == OK
            assert g.check(attacker, state(answered), now) == OK
    passed, closed, t = 0, False, 0.0
    while t < 10.0 and not closed:
        t += 0.001
        for sig in [Signalling(t="control", op="channel_join", c="c0")] + \
                [s for c in channels for s in (online(c), state(c))]:
            verdict = g.check(attacker, sig, t)
            if isinstance(verdict, Close):
                closed = True
                assert verdict.fault.code == 1008
                break
            passed += verdict == OK
    assert passed <= 3 * 10 * max(t, 1.0) + 3 * 20 + 2 * 64, passed
    assert closed  # far over twice the rate for a while: closed, as any flood


def test_credit_is_per_channel_and_only_what_was_asked() -> None:
    g, p = _guard(RATE_LIMIT="1", RATE_BURST="1")
    peer = _peer(g, p, "a", -1000.0)
    for c in ("one", "two"):
        assert _join(g, p, peer, c, -1000.0 + (c == "two") * 100) == OK
    # Both acks asked each channel joined at the time for one announcement; the bucket
    # holds one token.
    assert [g.check(peer, online("one"), 0.0) for _ in range(3)] == [OK, OK, OK]
    assert g.check(peer, online("one"), 0.0) == DROP  # "one" had 2 credits + 1 token
    assert g.check(peer, online("two"), 0.0) == OK  # one credit of its own
    assert g.check(peer, online("two"), 0.0) != OK  # not one of "one"'s (dropped, a flood)
    g.buckets["a"].excess = 0.0  # (forgive the flood for the rest of the test)
    # A peer_online heard asks one peer_state per channel, spent only in that channel.
    g.asked_state([peer])
    # Two acks and this peer_online asked three of "one", and the bucket refilled a token.
    assert [g.check(peer, state("one"), 1000.0) for _ in range(4)] == [OK] * 4
    assert g.check(peer, state("one"), 1000.0) == DROP
    g.buckets["a"].excess = 0.0
    # A new channel inherits no credit asked before it was joined (its own ack's only).
    g.asked_state([peer] * 10)
    assert _join(g, p, peer, "three", 2000.0) == OK
    assert [g.check(peer, state("three"), 2000.0) for _ in range(2)] == [OK, DROP]


def test_leaving_forgets_the_channels_credit_entry() -> None:
    g, p = _guard()
    peer = _peer(g, p, "a")
    for i in range(50):  # join and leave many names: the credit table does not grow
        assert _join(g, p, peer, f"x{i}", float(i)) == OK
        off = Signalling(t="control", op="peer_offline", c=f"x{i}")
        assert g.check(peer, off, float(i)) == OK
        p.handle(peer, off)
    assert len(g.buckets["a"].spent) == 0


# -- (3) decode work is bounded before it is done -----------------------------------------


def test_a_payload_of_sixty_thousand_nils_is_refused_on_its_header() -> None:
    frame = state_frame("room", pack([None] * 60_000))
    with pytest.raises(ProtocolError, match="array longer than 1024"):
        protocol.decode(frame)


def test_many_small_containers_are_refused_once_over_the_item_budget() -> None:
    pl = pack({"a": [[None] * 1000 for _ in range(60)]})
    with pytest.raises(ProtocolError, match="more than 1024 msgpack objects"):
        protocol.decode(state_frame("room", pl))
    # A real state (tens of objects) and a data event pass.
    protocol.decode(state_frame("room", pack({"id": "x", "cursor": {"x": 1, "y": 2},
                                              "tags": list(range(100))})))


def test_the_head_is_read_without_decoding_the_payload() -> None:
    sig = protocol.decode_head(state_frame("room", b"\xc1" * 100))  # pl not msgpack at all
    assert (sig.op, sig.c, sig.pl) == ("peer_state", "room", b"\xc1" * 100)
    with pytest.raises(ProtocolError, match="pl: not valid"):
        protocol.check_payload(sig)


@pytest.mark.parametrize(("frame", "reason"), [
    (pack({f"k{i}": 1 for i in range(9)}), "more than 8 keys"),
    (pack({"t": "control", "op": "peer_online", "c": [None] * 60_000}), "c (channel) must"),
    (pack({"t": "control", "op": "peer_online", "c": "x" * 600}), "longer than 512"),
    (pack([None] * 60_000), "must be a msgpack map, got list"),
    (pack({"t": "control", "op": "peer_online", "c": "r"}) + b"\xc0", "more than one"),
    (pack({"t": "control", "op": "peer_online", "c": "r"})[:-1], "truncated"),
])
def test_the_head_refuses_at_a_bounded_cost(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        protocol.decode_head(frame)
    assert reason in str(err.value)


# Any msgpack value, with containers up to 2,000 items: the frames a client could send,
# far over the item budget in any shape (wide, deep, many small containers).
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=2000) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=300),
    max_leaves=6000,
)


def _frames(value: Any) -> list[bytes]:
    pl = pack(value)
    return [state_frame("room", pl), pack({"t": "data", "c": "room", "pl": pl}),
            pack({"t": "control", "op": "peer_online", "c": value}), pack(value)]


#: The most a frame of any shape may allocate while being decoded, in bytes. A payload
#: within MAX_PAYLOAD_ITEMS objects, and its copy: about 120 KiB for 1024 objects of the
#: largest kinds plus the frame's size (the bin copy). Without the limits, 60,000 nils
#: in a 60 KB frame allocated 480 KB, and 60 lists of 1,000 nils as much.
DECODE_BUDGET = 192 * 1024


# The shapes always, then 80 drawn ones (each up to 6,000 leaves: most of the time
# of the unit suite went to drawing 150 of them).
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(_values)
@example([None] * 60_000)
@example([[None] * 1000 for _ in range(60)])
@example({f"k{i}": [b"x" * 40] * 2000 for i in range(30)})
def test_no_frame_costs_more_than_the_budget_to_decode(value: Any) -> None:
    for frame in _frames(value):
        # What a frame costs each time it is sent: a first call may also fill one-time
        # caches (seen once: 1.9 MB, not again), so it is not measured. No collection
        # inside the window either: what the collector frees runs others' code.
        try:
            sig = protocol.decode(frame)
        except ProtocolError:
            sig = None
        budget = DECODE_BUDGET + 2 * len(frame)
        peak = _decode_peak(frame)
        if peak > budget:
            # tracemalloc sees every thread: another's allocation (left by an earlier test
            # in the same run) once showed as 1.9 MB. A frame's own cost is the same each
            # time: the least of three is kept.
            peak = min(peak, _decode_peak(frame), _decode_peak(frame))
        assert peak <= budget, (peak, len(frame))
        if sig is not None and sig.pl is not None:
            assert _count(msgpack.unpackb(sig.pl, strict_map_key=False)) \
                <= protocol.MAX_PAYLOAD_ITEMS


def _decode_peak(frame: bytes) -> int:
    gc.disable()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with contextlib.suppress(ProtocolError):
            protocol.decode(frame)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(1 + _count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    return 1


def test_the_budget_fails_without_the_limits() -> None:
    """The measure is not vacuous: the same frames decoded without limits exceed it."""
    frame = pack([[None] * 1000 for _ in range(60)])
    tracemalloc.start()
    try:
        msgpack.unpackb(frame)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak > DECODE_BUDGET + 2 * len(frame)


# -- (11) names ------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "reason"), [
    ("id=%E2%80%AEnimda", "id contains format characters (U+202E)"),  # right-to-left override
    ("id=al%E2%80%8Bice", "id contains format characters (U+200B)"),  # zero-width space
    ("id=a%00", "id contains control characters (U+0000)"),
    ("id=a%C2%85", "id contains control characters (U+0085)"),  # C1 control (NEL)
    ("id=%E3%85%A4", "id contains invisible characters (U+3164)"),  # Hangul filler
    ("id=a%E2%80%A8b", "id contains line separator characters (U+2028)"),
    ("id=%EE%80%80", "id contains private-use characters (U+E000)"),
    ("id=%C2%A0alice", "id starts or ends with a space other than U+0020 (U+00A0)"),
    ("id=al%FFice", "id is not valid UTF-8"),
    ("id=al%EF%BF%BDice", ""),  # U+FFFD itself is visible: a different id from al%FFice
    ("id=%D0%B0lice", ""),  # Cyrillic a: visible, another script (not a spoof we can judge)
    ("id=Jos%C3%A9 M", ""),
])
def test_ids_refuse_what_hides_or_reorders_with_the_reason(query: str, reason: str) -> None:
    raw = protocol.parse_query(query)["id"]
    if not reason:
        assert protocol.check_client_id(raw) == raw
        return
    with pytest.raises(ProtocolError) as err:
        protocol.check_client_id(raw)
    assert str(err.value) == reason


def test_one_rule_for_ids_channels_and_the_api() -> None:
    from node.api import ApiError, check_app, check_channel, check_id

    for bad in ("a\u202eb", "a\tb", "\u2066x"):
        assert protocol.name_problem(bad)
        for check in (check_app, check_channel, check_id):
            with pytest.raises(ApiError):
                check(bad)
        with pytest.raises(ProtocolError):
            protocol.decode(pack({"t": "control", "op": "peer_online", "c": bad}))


# -- (10) logs ------------------------------------------------------------------------------


def test_warnings_and_errors_are_rate_limited_per_template() -> None:
    import logging

    from node.cli import RepeatLimit

    now = [0.0]
    limit = RepeatLimit(burst=3, interval=10.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.WARNING, *args: Any) -> logging.LogRecord:
        return logging.LogRecord("prscd.ws", level, __file__, 1, msg, args, None)

    passed = [limit.filter(record("refused status=%d", logging.WARNING, i)) for i in range(50)]
    assert passed == [True] * 3 + [False] * 47  # one template, whatever its arguments
    assert limit.filter(record("another template"))  # others are not held back
    assert all(limit.filter(record("chatty", logging.INFO)) for _ in range(100))  # INFO is not
    now[0] = 11.0
    later = record("refused status=%d", logging.WARNING, 7)
    assert limit.filter(later)
    assert later.getMessage() == "refused status=7 (and 47 like it left out in the last 10 s)"


def test_library_loggers_are_quiet_unless_debug() -> None:
    import logging

    from node.cli import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(False)
        for name in ("quic", "http3", "websockets", "aiohttp.access", "asyncio"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        setup_logging(True)
        assert logging.getLogger("quic").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name in ("websockets", "aioquic", "quic", "http3", "nats", "asyncio", "aiohttp",
                     "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)


# -- (1) HTTP/3 frame lengths ---------------------------------------------------------------


def _h3_varint(value: int) -> bytes:
    for size, prefix in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | (prefix << (8 * size - 8))).to_bytes(size, "big")
    raise ValueError(value)


def test_frame_headers_are_checked_as_they_arrive_whatever_the_packets() -> None:
    from node.transports.h3frames import FrameLengths

    frames = FrameLengths(1000)
    small = _h3_varint(0x1) + _h3_varint(10) + bytes(10)  # HEADERS of 10 bytes
    data = _h3_varint(0x0) + _h3_varint(50_000) + bytes(50_000)  # DATA: streamed, any size
    stream = small + data + small
    for i in range(0, len(stream), 7):  # in 7-byte packets: headers split across them
        assert frames.check(0, stream[i:i + 7], False) == ""
    huge = _h3_varint(0x1) + _h3_varint(4 * 1024 * 1024)
    reason = ""
    for i in range(len(huge)):  # refused on the byte that completes the declared length
        reason = frames.check(0, huge[i:i + 1], False)
        if reason:
            assert i == len(huge) - 1
            break
    assert reason == "HTTP/3 frame of type 0x1 declares 4194304 bytes, more than 1000"
    assert 0 not in frames.streams
    # A WebTransport bidirectional stream: raw data after its signal, not frames.
    assert frames.check(4, _h3_varint(0x41) + _h3_varint(0) + bytes(100_000), False) == ""
    assert frames.check(4, bytes(100_000), True) == ""
    assert 4 not in frames.streams


# -- HTTP/3 unidirectional streams: declared lengths read before aioquic buffers ------------


def _uni_fed(chunks: list[bytes]) -> tuple[int, str]:
    from node.transports.h3frames import UniStreams

    uni = UniStreams()
    for chunk in chunks:
        code, why = uni.check(2, chunk, False)
        if code:
            return code, why
    return 0, ""


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def _encoder_stream() -> bytes:
    """A real QPACK encoder's instructions (capacity, inserts with literal names)."""
    import pylsqpack

    encoder = pylsqpack.Encoder()
    out = encoder.apply_settings(max_table_capacity=4096, blocked_streams=16)
    for i in range(5):
        out += encoder.encode(i * 4, [(b"x-custom-name", b"v" * 100), (b"x-other", b"abc")])[0]
    return out


def test_real_control_and_encoder_streams_pass_whole_and_byte_by_byte() -> None:
    from aioquic.buffer import encode_uint_var

    settings_frame = encode_uint_var(0x4) + encode_uint_var(6) + bytes.fromhex("01000640001000")[:6]
    control = b"\x00" + settings_frame + b"\x0d\x01\x05" + b"\x21\x03abc"  # + an unknown type
    encoder = b"\x02" + _encoder_stream()
    assert len(encoder) > 100  # (inserts were made)
    for stream in (control, encoder, b"\x03\x81\x01\x42", b"\x54\x00" + bytes(5000)):
        assert _uni_fed([stream]) == (0, "")
        assert _uni_fed(_bytewise(stream)) == (0, "")


@pytest.mark.parametrize(("stream", "code", "why"), [
    (b"\x00\x04\x80\x01\x00\x00", 0x107, "control frame of type 0x4 declares 65536 bytes"),
    (b"\x00\x04\x01\x00\x0d\x80\x40\x00\x00", 0x107, "type 0xd declares 4194304 bytes"),
    # Insert with a literal name declaring 100,000 bytes (5-bit prefix, then 7-bit groups).
    (b"\x02\x5f\x81\x8d\x06", 0x201, "a string declares 100000 bytes"),
    # Insert with a name reference (static index 1), its value declaring 5,000 bytes.
    (b"\x02\xc1\x7f\x89\x26", 0x201, "a string declares 5000 bytes"),
    # A length that never ends.
    (b"\x02\x5f" + b"\xff" * 12, 0x201, "an endless bytes"),
])
def test_declared_lengths_over_the_limit_are_refused_on_their_header(
        stream: bytes, code: int, why: str) -> None:
    for chunks in ([stream], _bytewise(stream)):
        got = _uni_fed(chunks)
        assert got[0] == code and why in got[1], got


def test_unknown_control_frames_are_skipped_by_count_without_keeping_bytes() -> None:
    from node.transports.h3frames import UniStreams

    uni = UniStreams()
    assert uni.check(2, b"\x00\x21\x80\x10\x00\x00", False) == (0, "")  # 1 MiB unknown
    for _ in range(64):
        assert uni.check(2, bytes(16384), False) == (0, "")
    assert uni.streams[2][1] == 0 and uni.streams[2][2] == b""
    assert uni.check(2, b"\x04\x80\x01\x00\x00", False)[0] == 0x107  # the next frame: checked
