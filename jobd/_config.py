"""jobd's configuration: the command line and the settings it produces."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobd._version import __version__
from protocol import parse_duration, parse_size

if TYPE_CHECKING:
    from jobd.engine import LimitPolicy

DEFAULT_ADDRESS = "localhost"
DEFAULT_PORT = 8000
DEFAULT_STOP_GRACE = 2.0
DEFAULT_OUTPUT_CAP = 1 << 30
#: A TLS handshake plus the hello frame must finish in this many seconds: a
#: peer that connects and then says nothing holds a slot for no longer.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Enough for every operator and script of one host at once, few enough that
#: the file-descriptor limit (1024 by default) is never the first to break.
DEFAULT_MAX_CONNECTIONS = 1000
#: Connection slots only admin certificates may take: a few, enough for an
#: operator to get in and clean up while others hold every other slot.
DEFAULT_ADMIN_RESERVED_CONNECTIONS = 3
#: Running jobs per non-admin owner: far more than one person runs by hand, few
#: enough that one user's jobs (about four descriptors each) cannot use up
#: jobd's descriptors under the systemd unit's LimitNOFILE=65536.
DEFAULT_MAX_JOBS_PER_USER = 256

def default_state_dir() -> Path:
    """``$STATE_DIRECTORY``, else /var/lib/jobd for root, else ``$XDG_STATE_HOME/jobd``."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(state.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/jobd")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "jobd"


@dataclass(frozen=True)
class ServerConfig:
    certificate: Path
    key: Path
    ca: Path
    address: str = DEFAULT_ADDRESS
    port: int = DEFAULT_PORT
    state_dir: Path = Path("/var/lib/jobd")
    crl: Path | None = None
    log_format: str = "text"
    log_level: str = "info"
    stop_grace: float = DEFAULT_STOP_GRACE
    output_cap: int = DEFAULT_OUTPUT_CAP
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: None: the default share (see jobd._admission).
    max_connections_per_identity: int | None = None
    admin_reserved_connections: int = DEFAULT_ADMIN_RESERVED_CONNECTIONS
    max_handshakes_per_source: int | None = None
    #: Running jobs per owner; admin certificates are exempt. None: no limit.
    max_jobs_per_user: int | None = DEFAULT_MAX_JOBS_PER_USER
    #: Per-job limit defaults and caps (docs/isolation.md); None: none.
    limits: LimitPolicy | None = None
    cgroup_root: Path | None = None
    #: How a restart finds every process of a jobd that died: auto, cgroup or gate.
    job_tracking: str = "auto"
    #: ``off`` or ``otlp`` (OpenTelemetry, configured by the OTEL_* variables).
    telemetry: str = "off"
    #: History: finished jobs kept this many seconds, this many of them, this many
    #: bytes of their logs (None: no limit); an owner's logs at most this many bytes.
    retain: float | None = None
    retain_count: int | None = None
    max_log_space: int | None = None
    max_log_space_per_user: int | None = None


def _positive_float(text: str) -> float:
    """Seconds, 0 included. NaN and infinity are refused: a NaN deadline crashes the
    stop sequence, an infinite one means a shutdown that never ends."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds: {text}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _timeout(text: str) -> float:
    """Seconds, more than 0 (with 0 every connection would time out at once)."""
    value = _positive_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _count_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_size(text: str) -> int:
    value = _size(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text}")
    return value


def _cpus(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of CPUs above 0: {text}")
    return value


def _duration(text: str) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobd",
        description="Run commands for authenticated clients over mutual TLS 1.3.",
        epilog="SIGTERM or SIGINT: stop accepting, stop every job, exit 0. "
        "SIGHUP: reload certificate, key, CA and CRL for new connections. "
        "Certificates: `jobd ca init|sign|revoke|crl` (a small CA) and "
        "`jobd cert request` (a server key and CSR); see `jobd ca --help` "
        "(needs the jobd[ca] extra).",
    )
    p.add_argument("--version", action="version", version=f"jobd {__version__}")
    p.add_argument("-c", "--certificate", type=Path, required=True,
                   help="server certificate (PEM)")
    p.add_argument("-k", "--key", type=Path, required=True,
                   help="server private key (PEM); no access for group or others (chmod 600)")
    p.add_argument("-C", "--certificate-authority", dest="ca", type=Path, required=True,
                   help="CA certificate that client certificates must chain to (PEM)")
    p.add_argument("-a", "--address", default=DEFAULT_ADDRESS,
                   help="address to listen on: IPv4 or IPv6 literal or host name "
                   "(default: %(default)s)")
    p.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                   help="port; 0 lets the OS choose and logs it (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where job records and output live (default: $STATE_DIRECTORY, "
                   "else /var/lib/jobd for root, else $XDG_STATE_HOME/jobd)")
    p.add_argument("--crl", type=Path, default=None,
                   help="certificate revocation lists (PEM) checked for client certificates; "
                   "the file may hold CRLs only")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="event log format on stderr (default: %(default)s)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="least severe event logged (default: %(default)s)")
    p.add_argument("--stop-grace", type=_positive_float, default=DEFAULT_STOP_GRACE,
                   metavar="SECONDS",
                   help="wait between SIGINT, SIGTERM and SIGKILL when stopping a job "
                   "(default: %(default)s)")
    p.add_argument("--output-cap", type=_size, default=DEFAULT_OUTPUT_CAP, metavar="SIZE",
                   help="output bytes kept per job; the rest is drained and counted "
                   "(default: 1G)")
    p.add_argument("--handshake-timeout", type=_timeout,
                   default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                   help="time a new connection has for TLS and hello (default: %(default)s)")
    p.add_argument("--max-connections", type=_count, default=DEFAULT_MAX_CONNECTIONS,
                   metavar="N", help="connections served at once; more are refused "
                   "(default: %(default)s)")
    p.add_argument("--telemetry", choices=("off", "otlp"), default="off",
                   help="otlp: send traces, metrics and logs to an OpenTelemetry collector "
                   "over OTLP/HTTP, configured by the standard OTEL_* environment variables "
                   "(needs the jobd[otel] extra); off: none, OpenTelemetry is not even "
                   "imported (default: %(default)s)")
    p.add_argument("--max-connections-per-identity", type=_count, default=None, metavar="N",
                   help="connections one certificate name (CN) may hold at once; more are "
                   "refused with limit_exceeded (default: 64, or a quarter of "
                   "--max-connections if less)")
    p.add_argument("--admin-reserved-connections", type=_count_or_zero, default=None,
                   metavar="N", help="of --max-connections, slots only admin certificates "
                   f"may take (default: {DEFAULT_ADMIN_RESERVED_CONNECTIONS}, fewer if "
                   "--max-connections is below 4)")
    p.add_argument("--max-handshakes-per-source", type=_count, default=None, metavar="N",
                   help="connections from one address still in their TLS handshake; more "
                   "are closed at once (default: 32, or half of --max-connections if less)")
    p.add_argument("--max-jobs-per-user", type=_count_or_zero,
                   default=DEFAULT_MAX_JOBS_PER_USER, metavar="N",
                   help="running jobs per owner (CN); admin certificates are exempt; "
                   "0: no limit (default: %(default)s)")
    limits = p.add_argument_group(
        "per-job limits",
        "A job that asks for no limit gets the default, or else the maximum; a request "
        "above a maximum is refused (limit_exceeded). Default: none. See docs/isolation.md.")
    limits.add_argument("--default-memory", type=_limit_size, metavar="SIZE",
                        help="memory limit of a job that asks for none (e.g. 512M)")
    limits.add_argument("--max-memory", type=_limit_size, metavar="SIZE",
                        help="largest --memory a job may ask for")
    limits.add_argument("--default-cpus", type=_cpus, metavar="N",
                        help="CPU limit, in CPUs, of a job that asks for none (e.g. 1.5)")
    limits.add_argument("--max-cpus", type=_cpus, metavar="N",
                        help="largest --cpus a job may ask for")
    limits.add_argument("--default-pids", type=_count, metavar="N",
                        help="process limit of a job that asks for none")
    limits.add_argument("--max-pids", type=_count, metavar="N",
                        help="largest --pids a job may ask for")
    limits.add_argument("--max-io-bps", type=_limit_size, metavar="RATE",
                        help="largest --io-read-bps/--io-write-bps rate (bytes per second)")
    limits.add_argument("--cgroup-root", type=Path, metavar="DIR",
                        help="a delegated cgroup v2 directory for the jobs' cgroups "
                        "(default: jobd's own cgroup if delegated, else the v1 hierarchies)")
    limits.add_argument("--job-tracking", choices=("auto", "cgroup", "gate"), default="auto",
                        help="how a restart after a crash finds every process jobd started: "
                        "cgroup (jobd's own cgroup, where every job is born), gate (each "
                        "command runs only once its record is on disk: slower starts), "
                        "auto (cgroup where possible, else gate; the default)")
    history = p.add_argument_group(
        "history", "what is kept of finished jobs (by default everything, until deleted); "
        "the oldest finished jobs go first, each removal is logged (job-pruned)")
    history.add_argument("--retain", type=_duration, metavar="DURATION",
                         help="remove finished jobs this long after their end "
                         "(e.g. 30d, 12h, 90m, 3600)")
    history.add_argument("--retain-count", type=_count_or_zero, metavar="N",
                         help="keep at most N finished jobs")
    history.add_argument("--max-log-space", type=_size, metavar="SIZE",
                         help="keep at most SIZE of finished jobs' output logs "
                         "(whole jobs are removed)")
    history.add_argument("--max-log-space-per-user", type=_size, metavar="SIZE",
                         help="an owner's jobs' logs take at most SIZE; output beyond it "
                         "is dropped and counted in dropped_bytes")
    return p


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    # Imported here: jobd._config stays importable without the engine (and trio),
    # for jobctl's size parser.
    from jobd.engine import LimitPolicy

    parser = build_parser()
    ns = parser.parse_args(argv)
    reserved = ns.admin_reserved_connections
    if reserved is None:
        reserved = min(DEFAULT_ADMIN_RESERVED_CONNECTIONS, ns.max_connections - 1)
    elif reserved >= ns.max_connections:
        parser.error("--admin-reserved-connections must be below --max-connections")
    for name in ("memory", "cpus", "pids"):
        default, cap = getattr(ns, f"default_{name}"), getattr(ns, f"max_{name}")
        if default is not None and cap is not None and default > cap:
            parser.error(f"--default-{name} is above --max-{name}")
    return ServerConfig(
        certificate=ns.certificate,
        key=ns.key,
        ca=ns.ca,
        address=ns.address,
        port=ns.port,
        state_dir=ns.state_dir if ns.state_dir is not None else default_state_dir(),
        crl=ns.crl,
        log_format=ns.log_format,
        log_level=ns.log_level,
        stop_grace=ns.stop_grace,
        output_cap=ns.output_cap,
        handshake_timeout=ns.handshake_timeout,
        max_connections=ns.max_connections,
        max_connections_per_identity=ns.max_connections_per_identity,
        admin_reserved_connections=reserved,
        max_handshakes_per_source=ns.max_handshakes_per_source,
        max_jobs_per_user=ns.max_jobs_per_user or None,
        limits=LimitPolicy(
            default_memory=ns.default_memory, max_memory=ns.max_memory,
            default_cpus=ns.default_cpus, max_cpus=ns.max_cpus,
            default_pids=ns.default_pids, max_pids=ns.max_pids, max_io_bps=ns.max_io_bps),
        cgroup_root=ns.cgroup_root,
        job_tracking=ns.job_tracking,
        telemetry=ns.telemetry,
        retain=ns.retain,
        retain_count=ns.retain_count,
        max_log_space=ns.max_log_space,
        max_log_space_per_user=ns.max_log_space_per_user,
    )
