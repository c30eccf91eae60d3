"""The wire format: what the real client sends decodes; everything else is refused with a reason."""

from __future__ import annotations

import msgpack
import pytest

from node import protocol
from node.protocol import ProtocolError, Signalling

pytestmark = pytest.mark.unit


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def state(**kw: object) -> bytes:
    return pack({"id": "alice", **kw})


# -- what the real client sends ------------------------------------------------

def test_client_join_decodes() -> None:
    sig = protocol.decode(pack({"t": "control", "op": "channel_join", "c": "room", "pl": state()}))
    assert sig == Signalling(t="control", op="channel_join", c="room", pl=state())


def test_peer_online_without_pl() -> None:
    sig = protocol.decode(pack({"t": "control", "op": "peer_online", "c": "room"}))
    assert sig.op == "peer_online" and sig.pl is None


def test_peer_online_pl_is_not_forwarded() -> None:
    sig = protocol.decode(pack({"t": "control", "op": "peer_online", "c": "r", "pl": b"\xc1"}))
    assert sig.pl is None


def test_data_decodes() -> None:
    pl = pack({"event": "mouse", "data": '{"x":1}'})
    sig = protocol.decode(pack({"t": "data", "c": "room", "pl": pl}))
    assert sig.t == "data" and sig.op is None and sig.pl == pl


def test_client_p_is_discarded() -> None:
    sig = protocol.decode(pack({"t": "control", "op": "peer_offline", "c": "r", "p": "mallory"}))
    assert sig.p is None


# -- rejections, each with its own reason ---------------------------------------

@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (pack([1, 2]), "must be a msgpack map"),
        (pack({"t": "control", "op": "peer_online", "c": "r"}) + b"\x00", "more than one"),
        (pack({"t": "x", "c": "r"}), "t must be"),
        (pack({"t": "control", "op": "peer_online"}), "c (channel)"),
        (pack({"t": "control", "op": "peer_online", "c": ""}), "c (channel)"),
        (pack({"t": "control", "op": "peer_online", "c": 5}), "c (channel)"),
        (pack({"t": "control", "op": "peer_online", "c": "x" * 129}), "longer than 128"),
        (pack({"t": "control", "op": "dance", "c": "r"}), "unknown control op"),
        (pack({"t": "control", "c": "r"}), "unknown control op"),
        (pack({"t": "control", "op": "peer_state", "c": "r"}), "peer_state without pl"),
        (pack({"t": "control", "op": "peer_state", "c": "r", "pl": "str"}), "pl must be msgpack bin"),
        (pack({"t": "control", "op": "peer_state", "c": "r", "pl": pack(3)}), "encode a msgpack map"),
        (pack({"t": "control", "op": "peer_state", "c": "r", "pl": b"\xc1"}), "pl: not valid"),
        (pack({"t": "control", "op": "peer_state", "c": "r", "pl": pack({b"k": 1})}),
         "keys must be strings"),
        (pack({"t": "control", "op": "peer_state", "c": "r",
               "pl": pack({"a": msgpack.ExtType(5, b"x")})}), "extension type"),
        (pack({"t": "data", "c": "r"}), "data message without pl"),
        (pack({"t": "data", "op": "peer_online", "c": "r", "pl": pack({})}), "carry no op"),
        (pack({"t": "data", "c": "r", "pl": pack({"data": "1"})}), "string 'event'"),
        (pack({"t": "data", "c": "r", "pl": pack(None)}), "encode a msgpack map"),
        (pack({"t": "control", "op": "peer_online", "c": "r", "sid": "1"}), "server-internal"),
        (pack({"t": "control", "op": "peer_online", "c": "r", "app": "other"}), "server-internal"),
        (pack({"t": "control", "op": "peer_online", "c": "r", "zz": 1}), "unknown key"),
        (pack({"t": "control", "op": "peer_online", "c": "r", "p": 7}), "p must be a string"),
        (b"\xa3a\xff\xfe", "not valid msgpack"),
    ],
)
def test_rejections_name_the_problem(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=None) as err:
        protocol.decode(frame)
    assert reason in str(err.value)


def test_deep_nesting_is_refused() -> None:
    deep: object = "x"
    for _ in range(40):
        deep = [deep]
    frame = pack({"t": "control", "op": "peer_state", "c": "r", "pl": pack({"a": deep})})
    with pytest.raises(ProtocolError, match="nested too deeply"):
        protocol.decode(frame)


def test_channel_limit_is_counted_in_utf8_bytes() -> None:
    name = "é" * 65  # 130 bytes, 65 characters
    with pytest.raises(ProtocolError, match="longer than"):
        protocol.decode(pack({"t": "control", "op": "peer_online", "c": name}))
    protocol.decode(pack({"t": "control", "op": "peer_online", "c": "é" * 64}))


# -- encoding for clients ----------------------------------------------------------

def test_encode_strips_internal_keys() -> None:
    sig = Signalling(t="control", op="peer_state", c="r", p="alice", pl=state(),
                     sid="7", app="app", mesh="eu")
    assert msgpack.unpackb(protocol.encode(sig)) == {
        "t": "control", "op": "peer_state", "c": "r", "p": "alice", "pl": state()
    }


def test_encode_keeps_pl_as_bin() -> None:
    raw = protocol.encode(Signalling(t="data", c="r", p="a", pl=b"\x80"))
    # 0xc4 is msgpack bin8: the client's reader needs bin, not str.
    assert b"\xa2pl\xc4\x01\x80" in raw


def test_join_ack_shape() -> None:
    assert msgpack.unpackb(protocol.encode_join_ack("room", "eu-west")) == {
        "t": "control", "op": "channel_join", "c": "room", "mesh": "eu-west"
    }


def test_encode_data_is_what_subscribe_reads() -> None:
    frame = msgpack.unpackb(protocol.encode_data("r", "news", '{"a":1}', p="backend"))
    assert frame["t"] == "data" and frame["p"] == "backend"
    assert msgpack.unpackb(frame["pl"]) == {"event": "news", "data": '{"a":1}'}


@pytest.mark.parametrize(("raw", "ok"), [("alice", True), ("", False), ("a" * 129, False),
                                          ("a\nb", False), ("名前 with space", True)])
def test_client_id_rules(raw: str, ok: bool) -> None:
    if ok:
        assert protocol.check_client_id(raw) == raw
    else:
        with pytest.raises(ProtocolError):
            protocol.check_client_id(raw)


@pytest.mark.parametrize(("target", "split"), [
    ("/v1?publickey=k&id=a", ("/v1", "publickey=k&id=a")),
    ("/v1", ("/v1", "")),
    ("//other/v1?id=a", ("//other/v1", "id=a")),  # not an authority: not /v1
    ("https://other/v1?id=a", ("https://other/v1", "id=a")),
    ("/v1?id=a?b", ("/v1", "id=a?b")),
])
def test_split_target_keeps_the_path_as_sent(target: str, split: tuple[str, str]) -> None:
    assert protocol.split_target(target) == split
