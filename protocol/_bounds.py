"""How large any field of a request may be, and the decoding limits derived from it.

Theory
------
Everything a client sends that the server stores or echoes back is bounded
here, so that (1) every job status fits in one frame whatever its owner asked
for (a status that does not fit would break ``list`` for every role), (2) no
request makes the server do more than a small, fixed amount of work, and (3)
decoding a frame costs no more than a small multiple of its size.

The field bounds follow the kernel's own where there is one (PATH_MAX,
MAX_ARG_STRLEN, PID_MAX_LIMIT): nothing a real ``execve``/``chdir``/cgroup
would take is refused. The decoding limits (:data:`REQUEST_DECODE_LIMITS`)
follow from the field bounds: no request needs a longer string, a longer
binary, a longer array, a larger map or more containers than they allow, so
the server's unpacker refuses any of those from its header, before it
allocates anything. Replies (a page of statuses, output chunks) are decoded by
the client with limits derived from the frame's size instead: a server is not
held to the request bounds, and a client decodes whatever a frame can hold.

With these bounds the largest status is argv (256 KiB, at most 8,192
entries: ~270 KiB encoded) plus limits (2 x 16 device paths of 4 KiB: ~130
KiB) plus an error text (at most :data:`~protocol.MAX_ERROR_MESSAGE`
characters) plus an owner (a certificate's CN): well under half a frame.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (issue 26: start-up)
if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    from ._record import record as dataclass


#: The largest job ID (and list ``after``, and output position): jobd keeps IDs in
#: SQLite and positions are file offsets, both signed 64-bit. A larger value names
#: no job, so it is refused while decoding (``bad_request``), not looked up.
MAX_JOB_ID = 2**63 - 1

#: The longest path the kernel accepts (PATH_MAX is 4096 and counts the
#: terminating NUL): a longer ``cwd`` or device path could never work.
MAX_PATH_BYTES = 4095
#: The longest single argument or environment string (``NAME=value``) that
#: ``execve`` accepts: MAX_ARG_STRLEN (32 pages of 4 KiB) counts the NUL.
MAX_ARG_BYTES = 131_071
#: The most arguments in one command line. Linux counts argument bytes, not
#: arguments; 8,192 covers any command line a person or xargs builds, and keeps
#: the per-entry overhead of a stored argv small.
MAX_ARGV_ENTRIES = 8192
#: The whole command line (the sum of the arguments' lengths): generous for any
#: real command, and small enough that every status carrying it fits in a frame.
MAX_ARGV_BYTES = 256 * 1024
#: The most environment variables in one start request (a login shell has ~50).
MAX_ENV_ENTRIES = 4096
#: The whole environment (the sum of ``len(name) + 1 + len(value)``): passed to
#: ``execve``, whose total for arguments and environment together is 2 MiB on a
#: default stack limit, and kept in the job's record for ``rerun`` (never echoed
#: in a status).
MAX_ENV_BYTES = 256 * 1024
#: Device entries per direction (``io_read_bps``, ``io_write_bps``): a job
#: names the few disks it uses; each entry is a stat() and a cgroup write.
MAX_IO_DEVICES = 16
#: memory, io rates: the cgroup files take unsigned 64-bit values (and "max");
#: anything from 8 EiB up is no limit at all and only invites overflow.
MAX_LIMIT_VALUE = 2**63 - 1
#: pids: the kernel's PID_MAX_LIMIT on 64-bit systems; ``pids.max`` refuses more.
MAX_PIDS = 4 * 1024 * 1024
#: The most bytes in one ``input`` frame (minor 2): a pipe read's worth, a
#: quarter of the default frame limit. (Also ``protocol.MAX_INPUT_CHUNK``.)
MAX_INPUT_BYTES = 256 * 1024
#: cpus: the largest CONFIG_NR_CPUS the kernel supports (8,192).
MAX_CPUS = 8192.0


@dataclass(frozen=True)
class DecodeLimits:
    """Caps for one frame's msgpack decoding (see ``decode_payload``).

    Fields:
      max_str_len / max_bin_len: the longest string / binary.
      max_array_len / max_map_len: the most elements of one array / entries of one map.
      max_items: the most arrays, maps and elements in the whole frame, each
        container counting 1 plus its length (the frame's own map included):
        many small containers, or many full ones, cost as much as one huge one.
    """

    max_str_len: int
    max_bin_len: int
    max_array_len: int
    max_map_len: int
    max_items: int


#: What the server accepts in one client frame. The longest str is a device path,
#: the longest bin an ``input`` frame's data (else an argument or an environment
#: value), the longest array argv; a request map has at most 8 fields (64 leaves
#: room for optional fields of later minor versions). The largest request, a
#: start with the longest argv and the largest environment, counts about 24,700
#: items (argv 1 + 8,192; env 1 + 4,096 + 4,096 pairs of 3; limits ~140):
#: 32,768 leaves room. Decoding
#: stops as soon as a container completes over the budget, so a frame never
#: becomes more than ~40,000 Python objects (a few MB) however it is built.
REQUEST_DECODE_LIMITS = DecodeLimits(
    max_str_len=MAX_PATH_BYTES,
    max_bin_len=max(MAX_ARG_BYTES, MAX_INPUT_BYTES),
    max_array_len=MAX_ARGV_ENTRIES,
    max_map_len=64,
    max_items=32 * 1024,
)



__all__ = [
    "MAX_ARGV_BYTES",
    "MAX_ARGV_ENTRIES",
    "MAX_ARG_BYTES",
    "MAX_CPUS",
    "MAX_ENV_BYTES",
    "MAX_ENV_ENTRIES",
    "MAX_IO_DEVICES",
    "MAX_LIMIT_VALUE",
    "MAX_PATH_BYTES",
    "MAX_PIDS",
    "REQUEST_DECODE_LIMITS",
    "DecodeLimits",
]
