"""Hypothesis against a live jobd over TLS: generated frames and bytes, then it still serves.

Each example opens a TLS connection with a valid certificate (role observe,
so that nothing generated can run or stop a job), optionally says hello,
sends a few generated frames (real messages, random maps, lying length
prefixes, random payloads, raw bytes), ends its side, and reads until jobd
closes. Whatever jobd answered must be whole, valid frames; the connection
must close promptly; a bystander keeps being served; memory stays flat.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol as p

from .conftest import JobdProcess
from .hostile import Bystander, RawTLS, bystander, frame, jobd, packed, vm_rss

__all__ = ["bystander", "jobd"]  # the fixtures


FIELDS = ["type", "job", "argv", "cwd", "env", "limits", "grace", "after", "position",
          "version", "minor", "software", "memory", "isolate"]

leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
          | st.binary(max_size=24))
values: st.SearchStrategy[Any] = st.recursive(
    leaves,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), children,
                                        max_size=4)),
    max_leaves=12,
)
maps = st.builds(
    lambda kind, rest: {"type": kind, **rest},
    st.sampled_from([*sorted(p.MESSAGE_TYPES), "", "hello ", "x"]) | values,
    st.dictionaries(st.sampled_from(FIELDS[1:]), values, max_size=5),
)
real_messages = st.sampled_from([
    p.Hello(), p.Hello(version=7), p.ListJobs(), p.ListJobs(p.MAX_JOB_ID), p.GetStatus(1),
    p.Output(1), p.Output(1, 20), p.Stream(2**40), p.Start((b"true",)), p.Stop(1, 0),
    p.Delete(1), p.Welcome(1, 0, "x", "y", "admin", 10),
]).map(p.encode_frame)
frames = st.one_of(
    maps.map(packed),
    real_messages,
    st.binary(min_size=1, max_size=200).map(frame),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(
        lambda t: frame(t[1], length=t[0])),
    st.binary(max_size=64),
)


def test_fuzzed_traffic_never_hurts_the_server(jobd: JobdProcess, bystander: Bystander) -> None:
    rss_before = vm_rss(jobd.proc.pid)
    seen = {"examples": 0, "errors": 0}

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hello=st.booleans(), chunks=st.lists(frames, min_size=1, max_size=4))
    def one_connection(hello: bool, chunks: list[bytes]) -> None:
        with RawTLS.to(jobd, "olga") as conn:
            if hello:
                conn.hello()
            for chunk in chunks:
                if not conn.send(chunk):
                    break
            conn.half_close()
            reply = conn.read_until_closed(timeout=20)  # frames are decoded as they come
        assert reply.closed, f"jobd kept the connection open: {reply}"
        assert reply.garbage == b"", reply
        for message in reply.messages:
            assert isinstance(message, p.ServerMessage), message
        seen["examples"] += 1
        seen["errors"] += len(reply.errors)
        bystander.client.status(bystander.job)  # the persistent connection still answers

    one_connection()
    assert seen["examples"] >= 150 and seen["errors"] > 0, seen
    bystander.check()
    assert vm_rss(jobd.proc.pid) - rss_before < 30 * 2**20
    with RawTLS.to(jobd, "olga") as conn:
        assert conn.hello().identity == "olga"
