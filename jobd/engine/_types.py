"""The engine's public value types and errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol import JobStatus

#: What ``EngineConfig.on_event`` is called with: ``("started" | "ended" | "lost", status)``.
EventCallback = Callable[[str, JobStatus], None]


@dataclass(frozen=True)
class LimitPolicy:
    """The server's defaults and caps for per-job limits (docs/isolation.md).

    Fields:
      default_memory / default_cpus / default_pids: limits of a job that asks for
        none (bytes, CPUs, tasks); None: no limit, or the cap if there is one.
      max_memory / max_cpus / max_pids / max_io_bps: caps; a request above one is
        LimitExceeded. max_io_bps caps each --io-read-bps/--io-write-bps rate.
    """

    default_memory: int | None = None
    max_memory: int | None = None
    default_cpus: float | None = None
    max_cpus: float | None = None
    default_pids: int | None = None
    max_pids: int | None = None
    max_io_bps: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "cpus", "pids"):
            default, cap = getattr(self, f"default_{name}"), getattr(self, f"max_{name}")
            for value in (default, cap):
                if value is not None and not value > 0:  # also refuses NaN
                    raise ValueError(f"{name} limits must be positive")
            if default is not None and cap is not None and default > cap:
                raise ValueError(f"the default {name} limit is above the maximum")
        if self.max_io_bps is not None and self.max_io_bps <= 0:
            raise ValueError("max_io_bps must be positive")


#: The values of ``EngineConfig.tracking``.
TRACKING = ("auto", "cgroup", "gate")


@dataclass(frozen=True)
class EngineConfig:
    """How the job engine runs.

    Fields:
      state_dir: where job records and output logs live (see docs/engine.md).
      stop_grace: seconds between SIGINT, SIGTERM and SIGKILL of the stop sequence.
      output_cap: per-job cap on kept output bytes (record headers not counted).
      on_event: called synchronously with ("started" | "ended" | "lost", status), for
        the daemon's event log. A failed start is reported as "ended" (state error).
      limits: the server's defaults and caps for per-job limits.
      cgroup_root: a delegated cgroup v2 directory for the jobs' cgroups; None:
        find one (see docs/isolation.md).
      retain: seconds a finished job is kept after its end; None: forever.
      retain_count: the most finished jobs kept (the oldest of the owner with the
        most go first: fair_victims); None: no cap.
      max_log_space: the most bytes of output logs kept for finished jobs (the
        oldest of the owner whose logs take the most go first, with their
        records); None: no cap.
      max_log_space_per_user: the most bytes of output logs one owner's jobs may
        hold; output beyond it is dropped and counted in dropped_bytes; None: no cap.
      tracking: how a restart finds every process of a jobd that died (_tracking.py):
        "cgroup" (jobd's own leaf cgroup), "gate" (every start through the spawn
        helper, which runs the command only once its record is committed), or
        "auto": cgroup where a hierarchy is writable, else gate.
    """

    state_dir: Path
    stop_grace: float = 2.0
    output_cap: int = 1 << 30
    on_event: EventCallback | None = None
    limits: LimitPolicy = field(default_factory=LimitPolicy)
    cgroup_root: Path | None = None
    retain: float | None = None
    retain_count: int | None = None
    max_log_space: int | None = None
    max_log_space_per_user: int | None = None
    tracking: str = "auto"

    def __post_init__(self) -> None:
        if self.tracking not in TRACKING:
            raise ValueError(f"tracking must be one of {', '.join(TRACKING)}")
        if self.retain is not None and not self.retain > 0:
            raise ValueError("retain must be a positive number of seconds")
        for name in ("retain_count", "max_log_space", "max_log_space_per_user"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if not self.stop_grace >= 0:  # also refuses NaN
            raise ValueError("stop_grace must be 0 or more seconds")
        if self.output_cap < 0:
            raise ValueError("output_cap must not be negative")


@dataclass(frozen=True)
class OutputChunk:
    """Consecutive output of one stream.

    Fields:
      fd: 1 for stdout, 2 for stderr; TERMINAL_FD (3) for a terminal's resize,
        read only when asked for (``resizes``): ``data`` is the new size
        (``TERMINAL_SIZE``: rows, columns) and ``time_ns`` when it was resized.
      data: the bytes, never empty.
      position: the log offset just after the last record in this chunk; reading
        again from it resumes right after this chunk, nothing lost or repeated.
      time_ns: when jobd read the bytes (ns since the Unix epoch), for a chunk
        read with ``timestamps``: one record, never coalesced. Else None.
    """

    fd: int
    data: bytes
    position: int
    time_ns: int | None = None


class EngineError(Exception):
    """A request the engine cannot carry out."""


class JobNotFound(EngineError):
    """No job has this ID (or it was deleted)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"process not found: {job_id}")
        self.job_id = job_id


class InvalidState(EngineError):
    """The job is not in a state that allows the request; ``status`` says which it is."""

    def __init__(self, status: JobStatus) -> None:
        if status.running:
            super().__init__("process is running")
        else:
            super().__init__(f"process not running: {status.describe()}")
        self.status = status


class NoInput(InvalidState):
    """Input for a job that was started without ``stdin`` or a terminal."""

    def __init__(self, status: JobStatus) -> None:
        EngineError.__init__(self, "process has no input: it was started without stdin or "
                                   "a terminal (jobctl start -i or -t)")
        self.status = status


class BadLimits(EngineError):
    """A start request's limits that make no sense as given (a device named twice)."""


class LimitExceeded(EngineError):
    """A start request asked for more than the server allows (or less than the kernel can)."""


class Unenforceable(EngineError):
    """A limit or namespace this machine cannot give (no controller, no such device).

    Permanent: the same request fails the same way until the machine changes,
    so the server answers ``bad_request``, never the retryable ``unavailable``."""


class BadPosition(EngineError):
    """An output position that is not a record boundary of the job's log."""
