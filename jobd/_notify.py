"""systemd's readiness protocol (sd_notify), without libsystemd.

Theory of operation: a service started with ``Type=notify`` finds in
``$NOTIFY_SOCKET`` the address of a Unix datagram socket that systemd
listens on, and sends it newline-separated ``KEY=value`` assignments, one
datagram per message (see sd_notify(3)):

- ``READY=1`` once the service serves (jobd: once it listens), with a
  human-readable ``STATUS=`` shown by ``systemctl status``;
- ``RELOADING=1`` plus ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, microseconds)
  when a reload begins, then ``READY=1`` again when it is done: systemd ≥ 253
  (``Type=notify-reload``) needs the timestamp to tell this reload from an
  earlier one; older versions ignore the extra field;
- ``STOPPING=1`` when shutdown begins;
- ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the
  unit sets ``WatchdogSec=`` (systemd exports the variable, and
  ``$WATCHDOG_PID`` naming the process it is for): a service that misses a
  ping is considered hung and is killed (and restarted, with ``Restart=``).
  jobd pings from its event loop, so a frozen loop stops the pings.

The address is a file system path (``/run/systemd/notify``) or, when it
starts with ``@``, a Linux abstract socket whose name follows the ``@``.
Other forms (``vsock:…``, relative paths) are not supported and count as
"no notification socket".

Notification is best effort by design: outside systemd the variable is unset,
and a missing or broken socket must never take the daemon down. So every
function here returns ``True`` when the datagram was handed to the kernel and
``False`` otherwise, never raises for socket trouble, and logs nothing. The
send is a plain blocking call: a datagram to a listening systemd is queued at
once; a bounded timeout covers a receiver that stopped reading.
"""

from __future__ import annotations

import os
import socket
import time

#: Longest a send may block on a receiver whose queue is full. systemd reads
#: its notify socket promptly; this only bounds the pathological case.
SEND_TIMEOUT = 1.0


def _address(value: str) -> str | None:
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(message: str) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET``; ``True`` if it was sent.

    ``False`` when the variable is unset or empty, names an unsupported
    address, or the socket cannot be reached (missing, not a datagram socket,
    nobody listening, permission denied, timeout).
    """
    address = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message.encode("utf-8"), address)
    except (OSError, ValueError):
        # OSError: the socket is missing or broken (timeouts are OSErrors too).
        # ValueError: the address holds a NUL byte or cannot be encoded.
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new assignment: keep STATUS= one value.
    return " ".join(text.splitlines())


def notify_ready(status: str) -> bool:
    """``READY=1`` with ``STATUS=status``: the service is serving."""
    return notify(f"READY=1\nSTATUS={_one_line(status)}")


def notify_stopping() -> bool:
    """``STOPPING=1``: shutdown has begun."""
    return notify("STOPPING=1")


def notify_reloading() -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` now: a reload has begun.

    Send :func:`notify_ready` when the reload is done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd expects none.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so that one
    late ping is not yet a missed one. None when the variable is unset, not a
    positive integer, or ``$WATCHDOG_PID`` names another process (the variables
    were inherited, not meant for this one).
    """
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def notify_watchdog() -> bool:
    """``WATCHDOG=1``: the service is alive."""
    return notify("WATCHDOG=1")
