"""Which telemetry jobd runs with: ``--telemetry off`` or ``otlp``.

The interface (``jobd/_telemetry.py``, whose classes are also the "off"
implementation) and the OpenTelemetry implementation (``jobd/_otel.py``)
do not know each other's choice: this factory, above both, picks one.
"""

from __future__ import annotations

import os

from jobd._log import EventLog
from jobd._telemetry import NULL, Telemetry, TelemetryError

#: What ``--telemetry`` accepts.
MODES = ("off", "otlp")


def telemetry_disabled_by_environment() -> bool:
    """``OTEL_SDK_DISABLED=true``: the standard switch that turns every signal off."""
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def open_telemetry(mode: str, *, service_version: str, log: EventLog | None = None
                   ) -> Telemetry:
    """The telemetry for ``--telemetry mode``: :data:`NULL` for ``off`` (or when
    ``OTEL_SDK_DISABLED=true``), else OpenTelemetry over OTLP/HTTP (whose SDK's
    own log messages go through ``log``, rate-limited: ``jobd._otel``).

    Raises :class:`TelemetryError` when ``otlp`` cannot be set up: the extra is
    not installed, or the environment asks for an OTLP transport jobd lacks.
    """
    if mode not in MODES:
        raise TelemetryError(f"unknown telemetry mode {mode!r} (one of: {', '.join(MODES)})")
    if mode == "off" or telemetry_disabled_by_environment():
        return NULL
    try:
        from jobd import _otel
    except ImportError as exc:
        raise TelemetryError(
            f"--telemetry otlp needs OpenTelemetry ({exc.name or exc} is not installed): "
            "install jobd with the otel extra, pip install 'jobd[otel]'") from None
    return _otel.open_otel(service_version, log)


__all__ = ["MODES", "open_telemetry", "telemetry_disabled_by_environment"]
