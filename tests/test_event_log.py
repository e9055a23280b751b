"""jobd's event log: the text format escapes every control character, JSON stays exact."""

from __future__ import annotations

import io
import json

import pytest

from jobd._log import EventLog

HOSTILE = [
    "\x1b]0;PWNED\x07\x1b[2J\x1b[1;1H\rforged row\n",
    "nul\x00byte",
    "del\x7f",
    "c1 csi\x9b31m and nel\x85",
    "line\u2028separator\u2029",
    "undecodable \udcff byte",
    "tab\there",
]


def _line(fmt: str, value: str) -> str:
    stream = io.StringIO()
    EventLog(fmt, stream=stream).info("job-started", id=1, argv=value)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text[:-1]


@pytest.mark.parametrize("value", HOSTILE)
def test_text_log_escapes_control_characters(value: str) -> None:
    line = _line("text", value)
    unsafe = [c for c in line if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
              or c in "\u2028\u2029" or 0xD800 <= ord(c) <= 0xDFFF]
    assert unsafe == [], repr(line)
    quoted = line.split(" argv=", 1)[1]
    # the value is a JSON string literal: it reads back exactly
    assert json.loads(quoted) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_json_log_stays_exact(value: str) -> None:
    record = json.loads(_line("json", value))
    assert record["argv"] == value
    assert record["event"] == "job-started"


def test_plain_values_stay_bare() -> None:
    assert _line("text", "sleep").endswith(" id=1 argv=sleep")
    assert _line("text", "héllo wörld").endswith(' argv="héllo wörld"')


class _CountingStream(io.StringIO):
    """A stream that records each write (a write to stderr is one system call)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_lines_logged_in_one_turn_of_the_loop_are_one_write() -> None:
    """Issue 26: two lines per job, one write each, were a fifth of a start storm."""
    import threading

    import trio

    stream = _CountingStream()
    log = EventLog("text", stream=stream)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.write_batches)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(3):  # one turn: no checkpoint in between
                log.info("job-started", id=n)
            await trio.testing.wait_all_tasks_blocked()
            assert len(stream.writes) == 1, stream.writes
            assert [line.split()[-1] for line in stream.writes[0].splitlines()] == \
                ["id=0", "id=1", "id=2"]
            # another thread's line is not queued: written at once
            other = threading.Thread(target=log.info, args=("engine",), kwargs={"n": 9})
            other.start()
            other.join()
            assert stream.writes[-1].endswith("engine n=9\n")
            log.info("job-ended", id=7)  # still queued when the task is cancelled
            nursery.cancel_scope.cancel()
        assert stream.writes[-1].endswith("job-ended id=7\n")
        log.info("after", id=8)  # the task is gone: written at once
        assert stream.writes[-1].endswith("after id=8\n")

    trio.run(main)
