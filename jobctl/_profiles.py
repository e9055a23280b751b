"""Named servers and groups: ``~/.config/jobctl/config.toml`` and ``-s NAME``.

    [defaults]                 # any server field; servers override it
    certificate = "~/.config/jobctl/alice.pem"
    key = "~/.config/jobctl/alice.key"
    ca = "~/.config/jobctl/ca.pem"
    [servers.web1]
    address = "10.0.0.5"
    port = 8000                # also: server_name, certificate, key, ca
    [groups]
    web = ["web1", "web2"]

``JOBCTL_CONFIG`` names another file. The file is read only when a server is
selected (``-s NAME`` or ``JOBCTL_SERVER``): other runs never pay for it.
Precedence, highest first: a command-line flag, its ``JOBCTL_*`` variable,
the server's own field, ``[defaults]``, the built-in default. Paths may
start with ``~``; a relative path is relative to the config file's directory.
A group may name servers and other groups; ``all`` is every server unless
the file defines a group of that name.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError

#: A config file larger than this is a mistake (and is not read whole).
MAX_CONFIG = 1024 * 1024
#: How deep groups may nest (a group naming a group naming ...): far beyond any
#: real fleet's layout, and a bound on the expansion's stack (issue 22 item 13).
MAX_GROUP_DEPTH = 32
#: server field -> (namespace attribute, environment variable)
FIELDS = {
    "address": ("address", "JOBCTL_ADDRESS"),
    "port": ("port", "JOBCTL_PORT"),
    "server_name": ("server_name", "JOBCTL_SERVER_NAME"),
    "certificate": ("certificate", "JOBCTL_CERTIFICATE"),
    "key": ("key", "JOBCTL_KEY"),
    "ca": ("ca", "JOBCTL_CA"),
}
PATH_FIELDS = ("certificate", "key", "ca")


@dataclass(frozen=True)
class Target:
    """One server to connect to: what :func:`jobctl.connect` needs, and a name.

    ``ca`` None means trust on first use (``trust_on_first_use`` records a new
    server's pin without asking).
    """

    name: str
    address: str
    port: int
    certificate: str
    key: str
    ca: str | None = None
    server_name: str | None = None
    trust_on_first_use: bool = False


def config_path() -> Path:
    if os.environ.get("JOBCTL_CONFIG"):
        return Path(os.environ["JOBCTL_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jobctl" / "config.toml"


class Config:
    """A parsed, checked config file."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        unknown = set(data) - {"defaults", "servers", "groups"}
        if unknown:
            self._fail(f"unknown table {sorted(unknown)[0]!r} "
                       "(expected defaults, servers, groups)")
        self.defaults = self._fields("defaults", data.get("defaults", {}))
        servers = data.get("servers", {})
        if not isinstance(servers, dict):
            self._fail("servers must be a table of [servers.NAME] tables")
        self.servers = {name: self._fields(f"servers.{name}", fields)
                        for name, fields in servers.items()}
        groups = data.get("groups", {})
        if not isinstance(groups, dict):
            self._fail("groups must be a table: NAME = [\"server\", ...]")
        self.groups: dict[str, list[str]] = {}
        for name, members in groups.items():
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                self._fail(f"groups.{name} must be a list of server or group names")
            if name in self.servers:
                self._fail(f"{name!r} is both a server and a group")
            self.groups[name] = members
        if "all" not in self.groups and "all" not in self.servers:
            self.groups["all"] = list(self.servers)

    def _fail(self, message: str) -> None:
        raise ConfigError(f"{self.path}: {message}")

    def _fields(self, where: str, fields: Any) -> dict[str, Any]:
        if not isinstance(fields, dict):
            self._fail(f"{where} must be a table")
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key not in FIELDS:
                self._fail(f"{where}: unknown field {key!r} (fields: {', '.join(FIELDS)})")
            if key == "port":
                if not isinstance(value, int) or isinstance(value, bool) \
                        or not 0 < value < 65536:
                    self._fail(f"{where}: port must be a number from 1 to 65535")
            elif not isinstance(value, str) or not value:
                self._fail(f"{where}: {key} must be a non-empty string")
            elif not value.isprintable():
                # A NUL reached getaddrinfo or open() as a TypeError traceback; a
                # newline or an escape sequence would be printed in messages.
                self._fail(f"{where}: {key} must not contain control characters")
            if key in PATH_FIELDS:
                path = Path(value).expanduser()
                value = str(path if path.is_absolute() else self.path.parent / path)
            out[key] = value
        return out

    def members(self, name: str) -> list[str] | None:
        """The servers a group names (depth first, each once), or None for a server."""
        if name in self.servers:
            return None
        if name not in self.groups:
            known = sorted(set(self.servers) | set(self.groups))
            raise ConfigError(f"no server or group {name!r} in {self.path} "
                              f"(known: {', '.join(known) or 'none'})")
        # Iterative depth-first expansion: each group is expanded once (a group named
        # twice, or by two groups, adds nothing the second time: without that, 40
        # groups each naming the next twice took 2**40 steps), the path is bounded by
        # MAX_GROUP_DEPTH (a 3,000-deep chain was a RecursionError), and a group on
        # the path naming itself again is a cycle.
        out: list[str] = []
        seen_servers: set[str] = set()
        expanded: set[str] = {name}
        path: list[str] = [name]
        todo: list[Iterator[str]] = [iter(self.groups[name])]
        while todo:
            member = next(todo[-1], None)
            if member is None:
                todo.pop()
                path.pop()
            elif member in self.servers:
                if member not in seen_servers:
                    seen_servers.add(member)
                    out.append(member)
            elif member in path:
                self._fail(f"group {member!r} contains itself")
            elif member in expanded:
                continue
            elif member in self.groups:
                if len(path) >= MAX_GROUP_DEPTH:
                    self._fail(f"groups nest deeper than {MAX_GROUP_DEPTH} levels "
                               f"(from {name!r} through {path[-1]!r} to {member!r})")
                expanded.add(member)
                path.append(member)
                todo.append(iter(self.groups[member]))
            else:
                self._fail(f"groups.{path[-1]}: no server or group {member!r}")
        return out

    def fields(self, server: str) -> dict[str, Any]:
        return {**self.defaults, **self.servers[server]}


def load(path: Path | None = None) -> Config:
    import tomllib

    path = path if path is not None else config_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)
    except FileNotFoundError:
        raise ConfigError(f"no config file {path} (needed for -s/JOBCTL_SERVER; "
                          "JOBCTL_CONFIG names another)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG:
        raise ConfigError(f"{path} is larger than {MAX_CONFIG} bytes")
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError(f"{path}: arrays or tables nested too deeply") from None
    return Config(path, data)


def _explicit(ns: argparse.Namespace, parser: argparse.ArgumentParser, dest: str,
              env: str) -> bool:
    """Whether the user set this option: its variable, or a flag (a value other
    than the parser's default)."""
    return bool(os.environ.get(env)) or getattr(ns, dest) != parser.get_default(dest)


def select(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Target] | None:
    """Apply ``-s NAME``: for a server, fill ``ns`` from its profile and return
    None; for a group, return one :class:`Target` per member (fan-out)."""
    name = ns.server or os.environ.get("JOBCTL_SERVER") or ""
    config = load()
    explicit = {f: _explicit(ns, parser, dest, env) for f, (dest, env) in FIELDS.items()}
    members = config.members(name)
    if members is None:
        for field, value in config.fields(name).items():
            dest = FIELDS[field][0]
            if not explicit[field]:
                setattr(ns, dest, value)
        return None
    for field in ("address", "port", "server_name"):
        # A flag is a mistake; the variables (a default for single servers) are ignored.
        if getattr(ns, FIELDS[field][0]) != parser.get_default(FIELDS[field][0]):
            raise ConfigError(f"{name!r} is a group: its servers' {field} come from "
                              f"{config.path}, not from the command line")
    targets = []
    for member in members:
        fields = config.fields(member)
        for field, (dest, _env) in FIELDS.items():
            if explicit[field] and field not in ("address", "port", "server_name"):
                fields[field] = getattr(ns, dest)
            elif field not in fields and field in PATH_FIELDS and getattr(ns, dest):
                fields[field] = getattr(ns, dest)  # the built-in default files
        if "address" not in fields:
            raise ConfigError(f"{config.path}: servers.{member} has no address")
        for field in ("certificate", "key"):
            if not fields.get(field):
                raise ConfigError(f"{config.path}: servers.{member} has no {field} "
                                  "(nor [defaults], -c/-k, JOBCTL_*)")
        targets.append(Target(
            name=member, address=fields["address"], port=int(fields.get("port", 8000)),
            certificate=fields["certificate"], key=fields["key"], ca=fields.get("ca"),
            server_name=fields.get("server_name"),
            trust_on_first_use=bool(getattr(ns, "trust_on_first_use", False))))
    return targets

