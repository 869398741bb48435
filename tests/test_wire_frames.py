"""The frame scanner: boundaries, carry, streaming, bad lengths; the C loop against Python."""

from __future__ import annotations

import itertools
import random
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import MessageTooLarge, ProtocolViolation
from proxy.wire import frames
from proxy.wire.frames import (
    HEADER_SIZE,
    MARK,
    REPORT,
    FrameScanner,
    frame,
    frame_end,
    type_table,
)

try:
    from proxy.wire import _speedups
except ImportError:  # pragma: no cover - the build without a compiler
    _speedups = None  # type: ignore[assignment]

IMPLEMENTATIONS = ["python", "c"]


@pytest.fixture(params=IMPLEMENTATIONS)
def scan_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with FrameScanner using one loop or the other."""
    if request.param == "c":
        if not frames.ACCELERATED:
            pytest.skip("the C extension is not built")
        monkeypatch.setattr(frames, "_scan", _speedups.scan)
    else:
        monkeypatch.setattr(frames, "_scan", frames._scan_python)
    return str(request.param)


# ---------------------------------------------------------------------------------------------
# A realistic server -> client stream


def _row_description() -> bytes:
    body = (
        b"\x00\x02"
        + b"id\x00\x00\x00\x40\x00\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"
        + b"name\x00\x00\x00\x40\x00\x00\x02\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00"
    )
    return frame(b"T", body)


def _data_row(*values: bytes | None) -> bytes:
    body = len(values).to_bytes(2, "big")
    for value in values:
        body += b"\xff\xff\xff\xff" if value is None else len(value).to_bytes(4, "big") + value
    return frame(b"D", body)


BIG_ROW = _data_row(b"x" * 200_000)

SERVER_STREAM: list[bytes] = [
    b"R\x00\x00\x00\x08\x00\x00\x00\x00",  # AuthenticationOk
    b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",  # ParameterStatus
    b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef",  # BackendKeyData
    b"Z\x00\x00\x00\x05I",  # ReadyForQuery
    b"1\x00\x00\x00\x04",  # ParseComplete (empty body)
    b"2\x00\x00\x00\x04",  # BindComplete (empty body)
    _row_description(),
    _data_row(b"1", b"alice"),
    _data_row(b"2", None),
    BIG_ROW,
    _data_row(b"3", b""),
    b"C\x00\x00\x00\x0dSELECT 4\x00",
    b"n\x00\x00\x00\x04",  # NoData (empty body)
    b"N\x00\x00\x00\x14SNOTICE\x00Mhello\x00\x00",
    b"I\x00\x00\x00\x04",  # EmptyQueryResponse (empty body)
    b"Z\x00\x00\x00\x05T",
    b"H\x00\x00\x00\x07\x00\x00\x00",  # CopyOutResponse, text, no columns
    b"d\x00\x00\x00\x0aabcdef",  # CopyData
    frame(b"d", b"y" * 70_000),
    b"c\x00\x00\x00\x04",  # CopyDone
    b"C\x00\x00\x00\x0bCOPY 2\x00",
    b"E\x00\x00\x00\x18SERROR\x00C42601\x00Mbad\x00\x00",
    b"Z\x00\x00\x00\x05E",
]
STREAM = b"".join(SERVER_STREAM)

#: what the relay's FAST server table reports: all but rows, copy data and asynchronous ones
TABLE = type_table(
    set(range(256)) - {ord("D"), ord("d"), ord("N"), ord("A"), ord("S")},
    mark={ord("Z")},
    flag_4={ord("E")},
)


def test_the_golden_stream_has_the_frames_it_claims() -> None:
    # Every hand-written frame's length field agrees with its size; otherwise every other
    # test here would be checking a malformed stream.
    for raw in SERVER_STREAM:
        assert frame_end(raw, 0) == len(raw), raw[:16]


@dataclass
class Outcome:
    """What a run of feeds yields: forwarded bytes and reported frames, in order."""

    forwarded: bytearray = field(default_factory=bytearray)
    reported: list[bytes] = field(default_factory=list)
    flags: int = 0
    marked: int = 0
    max_buffered: int = 0
    mid_frame_feeds: int = 0


def run(
    scanner: FrameScanner, chunks: Iterator[bytes] | Sequence[bytes], *, watch: bool = False
) -> Outcome:
    """Feed ``chunks``, checking the per-feed contract of :data:`frames.Scan` as we go.

    ``watch`` also records how much the scanner holds back after each feed.
    """
    out = Outcome()
    forwarded = out.forwarded
    for chunk in chunks:
        buf, ready, kinds, starts, flags, marked, after, _need = scanner.feed(chunk)
        if ready:
            assert 0 < ready <= len(buf)
            forwarded += buf[:ready]
        if kinds or starts or flags or marked or after:
            check_reports(scanner.table, buf, ready, kinds, starts, flags, marked, after, out)
        if watch:
            out.max_buffered = max(out.max_buffered, scanner.buffered)
            out.mid_frame_feeds += scanner.mid_frame
    return out


def check_reports(
    table: bytes,
    buf: bytes,
    ready: int,
    kinds: bytes,
    starts: list[int],
    flags: int,
    marked: int,
    after: int,
    out: Outcome,
) -> None:
    """One feed's reports agree with the table and lie inside the forwardable prefix."""
    assert len(kinds) == len(starts)
    assert starts == sorted(starts)
    expected_flags = marked_seen = last_marked = 0
    for index, (typ, start) in enumerate(zip(kinds, starts, strict=True)):
        assert buf[start] == typ
        end = frame_end(buf, start)
        assert end <= ready, "a reported frame must be whole and forwardable"
        out.reported.append(buf[start:end])
        value = table[typ]
        assert value & REPORT
        expected_flags |= value
        if value & MARK:
            marked_seen += 1
            last_marked = index + 1
    assert flags == expected_flags
    assert marked == marked_seen
    assert after == last_marked
    out.flags |= flags
    out.marked += marked


def expected_reports(stream: Sequence[bytes], table: bytes) -> list[bytes]:
    return [raw for raw in stream if table[raw[0]] & REPORT]


def one_byte_at_a_time(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


def random_chunks(data: bytes, seed: int, largest: int = 9000) -> Iterator[bytes]:
    rnd = random.Random(seed)
    pos = 0
    while pos < len(data):
        size = rnd.choice([1, 2, 3, 4, 5, 6, rnd.randint(1, 64), rnd.randint(1, largest)])
        yield data[pos : pos + size]
        pos += size


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(scanner: FrameScanner, chunks: Iterator[bytes] | Sequence[bytes]) -> None:
    for chunk in chunks:
        scanner.feed(chunk)


# ---------------------------------------------------------------------------------------------
# Feeding


@pytest.mark.usefixtures("scan_impl")
@pytest.mark.parametrize("streaming", [False, True], ids=["buffered", "streamed"])
def test_any_chunking_gives_the_same_bytes_and_frames(streaming: bool) -> None:
    streamable = frozenset({ord("D"), ord("d")}) if streaming else frozenset()
    want = expected_reports(SERVER_STREAM, TABLE)
    assert len(want) == 15  # the test really covers many reported frames

    feeds: dict[str, Iterator[bytes] | list[bytes]] = {
        "whole": [STREAM],
        "bytes": one_byte_at_a_time(STREAM),
        **{f"random{seed}": random_chunks(STREAM, seed) for seed in range(4)},
        "frames": list(SERVER_STREAM),
        "empty feeds": [b"", *split_at(STREAM, [3, 5, 7000]), b""],
    }
    for name, chunks in feeds.items():
        scanner = FrameScanner(TABLE, streamable=streamable)
        got = run(scanner, chunks)
        assert bytes(got.forwarded) == STREAM, name
        assert got.reported == want, name
        assert got.marked == 3, name
        assert got.flags == REPORT | MARK | 4, name
        assert scanner.buffered == 0
        assert not scanner.mid_frame


@pytest.mark.usefixtures("scan_impl")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=40), streaming=st.booleans())
def test_arbitrary_split_points(cuts: list[int], streaming: bool) -> None:
    streamable = frozenset({ord("D"), ord("d")}) if streaming else frozenset()
    got = run(FrameScanner(TABLE, streamable=streamable), split_at(STREAM, cuts))
    assert bytes(got.forwarded) == STREAM
    assert got.reported == expected_reports(SERVER_STREAM, TABLE)


def test_whole_frames_come_back_as_the_buffer_given() -> None:
    # The common case: no copy, no carry, everything forwardable in one write.
    data = b"".join(SERVER_STREAM[:8])
    buf, ready, kinds, starts, *_ = FrameScanner(TABLE).feed(data)
    assert buf is data
    assert ready == len(data)
    assert kinds == b"RKZ12T"
    assert starts[0] == 0


@pytest.mark.usefixtures("scan_impl")
def test_incomplete_frame_is_carried_until_complete() -> None:
    scanner = FrameScanner(TABLE)
    z = b"Z\x00\x00\x00\x05I"
    assert scanner.feed(b"1\x00\x00\x00\x04Z\x00")[1:3] == (5, b"1")
    assert scanner.buffered == 2
    assert scanner.mid_frame
    # not enough yet: nothing forwardable, nothing reported
    assert scanner.feed(b"\x00\x00")[:3] == (b"", 0, b"")
    assert scanner.buffered == 4
    buf, ready, kinds, starts, _flags, marked, after, _ = scanner.feed(b"\x05I2\x00")
    assert buf[:ready] == z
    assert (kinds, starts, marked, after) == (b"Z", [0], 1, 1)
    assert scanner.buffered == 2  # "2\x00" waits for the rest of its header


@pytest.mark.usefixtures("scan_impl")
def test_large_streamable_frame_is_forwarded_before_it_completes() -> None:
    # DataRow is unreported and streamable: the relay forwards it as it arrives and never
    # holds it whole.
    scanner = FrameScanner(TABLE, streamable=frozenset({ord("D")}), stream_threshold=65536)
    head = b"".join(SERVER_STREAM[3:9])  # ... a RowDescription and two small rows
    tail = b"".join(SERVER_STREAM[10:13])
    data = head + BIG_ROW + tail
    chunk = 1000
    forwarded = bytearray()
    in_big = 0
    for pos in range(0, len(data), chunk):
        buf, ready, *_ = scanner.feed(data[pos : pos + chunk])
        forwarded += buf[:ready]
        assert scanner.buffered < chunk + 64
        if len(head) + HEADER_SIZE <= pos + chunk < len(head) + len(BIG_ROW):
            # every feed inside the big row is forwardable at once
            in_big += 1
            assert ready == len(buf)
            assert scanner.mid_frame
            assert len(forwarded) == pos + chunk
    assert in_big > 150
    assert bytes(forwarded) == data
    assert not scanner.mid_frame


@pytest.mark.usefixtures("scan_impl")
def test_streaming_survives_a_header_split_one_byte_at_a_time() -> None:
    scanner = FrameScanner(TABLE, streamable=frozenset({ord("D")}))
    data = b"1\x00\x00\x00\x04" + BIG_ROW + b"Z\x00\x00\x00\x05I"
    got = run(scanner, one_byte_at_a_time(data), watch=True)
    assert bytes(got.forwarded) == data
    assert got.reported == [b"1\x00\x00\x00\x04", b"Z\x00\x00\x00\x05I"]
    assert got.max_buffered <= HEADER_SIZE
    assert got.mid_frame_feeds >= len(BIG_ROW) - 1


@pytest.mark.usefixtures("scan_impl")
def test_streamed_frame_ending_mid_feed_reports_what_follows() -> None:
    scanner = FrameScanner(TABLE, streamable=frozenset({ord("D")}))
    cut = 100_000
    first = BIG_ROW[:cut]
    buf, ready, kinds, *_ = scanner.feed(first)
    assert (ready, kinds) == (cut, b"")
    rest = BIG_ROW[cut:] + b"C\x00\x00\x00\x0dSELECT 1\x00" + b"Z\x00\x00\x00\x05I" + b"Z\x00"
    buf, ready, kinds, starts, _flags, marked, after, _ = scanner.feed(rest)
    assert buf is rest
    assert ready == len(rest) - 2
    assert kinds == b"CZ"
    assert starts == [len(BIG_ROW) - cut, len(BIG_ROW) - cut + 14]
    assert (marked, after) == (1, 2)
    assert scanner.buffered == 2


@pytest.mark.usefixtures("scan_impl")
def test_reported_or_unstreamable_large_frames_are_held_whole() -> None:
    # A reported type must be seen whole, and so must a type not declared streamable.
    for table, streamable in [
        (type_table({ord("D")}), frozenset({ord("D")})),
        (TABLE, frozenset({ord("d")})),
    ]:
        scanner = FrameScanner(table, streamable=streamable)
        got = run(scanner, random_chunks(BIG_ROW, seed=7), watch=True)
        assert got.max_buffered >= len(BIG_ROW) - 9000
        assert bytes(got.forwarded) == BIG_ROW
        assert got.reported == ([BIG_ROW] if table[ord("D")] else [])


@pytest.mark.usefixtures("scan_impl")
@pytest.mark.parametrize(("body_size", "streamed"), [(100, False), (101, True)])
def test_stream_threshold_is_on_the_length_field(body_size: int, streamed: bool) -> None:
    # The length field counts itself: a 100-byte body under a threshold of 104 is not streamed.
    scanner = FrameScanner(b"\x00" * 256, streamable=frozenset({ord("d")}), stream_threshold=104)
    data = frame(b"d", b"z" * body_size)
    _buf, ready, *_ = scanner.feed(data[:-1])
    assert ready == (len(data) - 1 if streamed else 0)
    assert scanner.buffered == (0 if streamed else len(data) - 1)
    _buf, ready, *_ = scanner.feed(data[-1:])
    assert ready == (1 if streamed else len(data))
    assert not scanner.mid_frame


# ---------------------------------------------------------------------------------------------
# Bad lengths


BAD_LENGTHS = [-1, -(2**31), 0, 3]


@pytest.mark.usefixtures("scan_impl")
@pytest.mark.parametrize("length", [*BAD_LENGTHS, 1001, 2**31 - 1])
def test_bad_length_raises_message_too_large_whole_or_split(length: int) -> None:
    bad = b"Q" + struct.pack("!i", length) + b"SELECT 1\x00"
    good = b"S\x00\x00\x00\x04"
    data = good + bad
    for cut in range(len(data) + 1):
        scanner = FrameScanner(type_table({ord("S")}), max_length=1000)
        with pytest.raises(MessageTooLarge) as caught:
            feed_all(scanner, split_at(data, [cut]))
        assert caught.value.length == length, cut
        assert caught.value.limit == 1000
        assert isinstance(caught.value, ProtocolViolation)


@pytest.mark.usefixtures("scan_impl")
def test_bad_length_one_byte_at_a_time() -> None:
    scanner = FrameScanner(TABLE, max_length=1000)
    data = b"1\x00\x00\x00\x04" + b"d\x00\x00\x03\xe9"
    with pytest.raises(MessageTooLarge) as caught:
        feed_all(scanner, one_byte_at_a_time(data))
    assert caught.value.length == 1001


@pytest.mark.usefixtures("scan_impl")
def test_bad_length_after_a_streamed_frame() -> None:
    scanner = FrameScanner(TABLE, streamable=frozenset({ord("D")}), max_length=300_000)
    scanner.feed(BIG_ROW[:70_000])
    assert scanner.mid_frame
    with pytest.raises(MessageTooLarge) as caught:
        scanner.feed(BIG_ROW[70_000:] + b"Z\x00\x00\x00\x02")
    assert caught.value.length == 2


@pytest.mark.usefixtures("scan_impl")
def test_length_at_the_limit_is_allowed() -> None:
    scanner = FrameScanner(TABLE, max_length=1004)
    data = frame(b"Q", b"q" * 1000)
    _buf, ready, kinds, *_ = scanner.feed(data)
    assert (ready, kinds) == (len(data), b"Q")


def test_too_large_message_text() -> None:
    assert "invalid message length -1" in str(MessageTooLarge(-1, 10))
    assert "exceeds the limit of 10" in str(MessageTooLarge(11, 10))


# ---------------------------------------------------------------------------------------------
# Small helpers


def test_type_table_bits() -> None:
    table = type_table({ord("P")}, mark={ord("S")}, flag_4={ord("Q")}, flag_8=[ord("P")])
    assert len(table) == 256
    assert table[ord("P")] == REPORT | 8
    assert table[ord("S")] == REPORT | MARK
    assert table[ord("Q")] == REPORT | 4
    assert sum(1 for value in table if value) == 3


def test_frame_and_frame_end() -> None:
    assert frame(b"Z", b"I") == b"Z\x00\x00\x00\x05I"
    assert frame(b"S", b"") == b"S\x00\x00\x00\x04"
    buf = b"xx" + frame(b"Q", b"abc\x00") + b"yy"
    assert frame_end(buf, 2) == len(buf) - 2


# ---------------------------------------------------------------------------------------------
# The C loop against the reference


def test_the_extension_is_built_where_a_compiler_exists() -> None:
    if shutil.which("cc") or shutil.which("gcc"):
        assert frames.ACCELERATED, "a C compiler is present but _speedups did not build"
        assert frames._scan is _speedups.scan
    else:  # pragma: no cover
        assert frames._scan is frames._scan_python


needs_c = pytest.mark.skipif(not frames.ACCELERATED, reason="the C extension is not built")


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """Mostly well-formed frames of few types, sometimes a bad length, sometimes cut short."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        typ = draw(st.sampled_from(b"ZDCESTd\x00\xff"))
        out.append(typ)
        if draw(st.integers(0, 15)) == 0:  # bad, or too long for what follows
            out += struct.pack("!i", draw(st.sampled_from([-1, 0, 3, 2**31 - 1, 5000])))
            out += draw(st.binary(max_size=10))
        else:
            size = draw(st.integers(0, 40))
            out += struct.pack("!i", 4 + size)
            out += draw(st.binary(min_size=size, max_size=size))
    if out and draw(st.booleans()):
        del out[draw(st.integers(0, len(out) - 1)) :]
    return bytes(out)


tables = st.one_of(
    st.binary(min_size=256, max_size=256),
    st.builds(
        lambda report, mark, extra: type_table(report, mark=mark, flag_4=extra),
        st.sets(st.sampled_from(b"ZDCESTd\x00\xff")),
        st.sets(st.sampled_from(b"ZDS")),
        st.sets(st.sampled_from(b"CE")),
    ),
)


@needs_c
@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(frame_streams(), st.binary(max_size=64)),
    table=tables,
    max_length=st.sampled_from([4, 5, 40, 1000, 2**31 - 1]),
    pos_seed=st.integers(0, 2**16),
)
def test_c_loop_matches_python_loop(
    data: bytes, table: bytes, max_length: int, pos_seed: int
) -> None:
    pos = pos_seed % (len(data) + 1)
    expected = frames._scan_python(data, pos, table, max_length)
    got = _speedups.scan(data, pos, table, max_length)
    assert got == expected
    assert got[0] is data
    assert type(got[2]) is bytes


@needs_c
def test_c_loop_reports_nothing_but_the_length_on_error() -> None:
    table = type_table({ord("Z")}, mark={ord("Z")})
    data = b"Z\x00\x00\x00\x05I" + b"Z\xff\xff\xff\xff"
    for scan in (frames._scan_python, _speedups.scan):
        assert scan(data, 0, table, 100) == (data, -1, b"", [], 0, 0, 0, -1)


@needs_c
def test_c_loop_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="256"):
        _speedups.scan(b"", 0, b"\x00" * 255, 10)
    for scan in (frames._scan_python, _speedups.scan):
        with pytest.raises(ValueError, match="negative"):
            scan(b"Z\x00\x00\x00\x05I", -3, b"\x00" * 256, 10)
    with pytest.raises(TypeError):
        _speedups.scan(b"", 0, b"\x00" * 256)  # type: ignore[call-arg]
    # a position past the end scans nothing, as in Python
    assert _speedups.scan(b"Z", 9, b"\x01" * 256, 10) == frames._scan_python(
        b"Z", 9, b"\x01" * 256, 10
    )
