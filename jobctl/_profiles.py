"""Named servers, identities and groups: ``~/.config/jobctl/config.toml``,
``-s NAME`` and ``-i NAME``.

    [identities.alice]         # who you are: a certificate and its key
    certificate = "~/.config/jobctl/alice.pem"
    key = "~/.config/jobctl/alice.key"
    [identities.ops]
    certificate = "ops.pem"
    key = "ops.key"
    [defaults]                 # any server field; servers override it
    identity = "alice"
    ca = "~/.config/jobctl/ca.pem"
    [servers.web1]
    address = "10.0.0.5"
    port = 8000                # also: server_name, ca, identity (its default one)
    [servers.web1-as-ops]      # the same server, another identity: not in `all`
    like = "web1"
    identity = "ops"
    [groups]
    web = ["web1", "web2"]

Identities are apart from servers, as ssh keeps ``IdentityFile`` apart from
``Host``: a server names its default identity, and ``-i NAME`` (or
``JOBCTL_IDENTITY``) picks another for this run, for one server or a whole
group. A server may still carry ``certificate`` and ``key`` itself (the
format before identities); ``jobctl config migrate`` rewrites such a file
into identities and servers, one server per endpoint.

``JOBCTL_CONFIG`` names another file. The file is read only when a server or
an identity is selected (``-s``/``JOBCTL_SERVER``, ``-i``/``JOBCTL_IDENTITY``):
other runs never pay for it. Precedence, highest first: a command-line flag
(``-c``, ``-k``, ...), then ``-i``/``JOBCTL_IDENTITY`` for the certificate and
key, the flag's ``JOBCTL_*`` variable, the server's own field (its identity's
files), ``[defaults]``, the built-in default. Paths may start with ``~``; a
relative path is relative to the config file's directory. A group may name
servers and other groups; ``all`` is every server once (not the ``like``
ones) unless the file defines a group of that name.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError

#: A config file larger than this is a mistake (and is not read whole).
MAX_CONFIG = 1024 * 1024
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
#: Fields of a server (and [defaults]) beyond FIELDS.
SERVER_ONLY = ("identity", "like")
#: The fields of an identity.
IDENTITY_FIELDS = ("certificate", "key")


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
        unknown = set(data) - {"defaults", "servers", "groups", "identities"}
        if unknown:
            self._fail(f"unknown table {sorted(unknown)[0]!r} "
                       "(expected defaults, identities, servers, groups)")
        identities = data.get("identities", {})
        if not isinstance(identities, dict):
            self._fail("identities must be a table of [identities.NAME] tables")
        self.identities: dict[str, dict[str, Any]] = {}
        for name, fields in identities.items():
            checked = self._fields(f"identities.{name}", fields, IDENTITY_FIELDS)
            for field in IDENTITY_FIELDS:
                if field not in checked:
                    self._fail(f"identities.{name} has no {field}")
            self.identities[name] = checked
        self.defaults = self._fields("defaults", data.get("defaults", {}))
        servers = data.get("servers", {})
        if not isinstance(servers, dict):
            self._fail("servers must be a table of [servers.NAME] tables")
        self.servers = {name: self._fields(f"servers.{name}", fields)
                        for name, fields in servers.items()}
        for where, fields in (("defaults", self.defaults),
                              *((f"servers.{n}", f) for n, f in self.servers.items())):
            if "identity" in fields:
                if fields["identity"] not in self.identities:
                    self._fail(f"{where}: no identity {fields['identity']!r} "
                               f"(identities: {', '.join(self.identities) or 'none'})")
                if "certificate" in fields or "key" in fields:
                    self._fail(f"{where}: give an identity or a certificate and key, not both")
        for name, fields in self.servers.items():
            like = fields.get("like")
            if like is not None and (like not in self.servers or "like" in self.servers[like]):
                self._fail(f"servers.{name}: like = {like!r} must name a server that is "
                           "not itself a like")
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
            # Every server once: a `like` is another identity on a server already in.
            self.groups["all"] = [n for n, f in self.servers.items() if "like" not in f]

    def _fail(self, message: str) -> None:
        raise ConfigError(f"{self.path}: {message}")

    def _fields(self, where: str, fields: Any,
                known: tuple[str, ...] = (*FIELDS, *SERVER_ONLY)) -> dict[str, Any]:
        if not isinstance(fields, dict):
            self._fail(f"{where} must be a table")
        out: dict[str, Any] = {}
        for key, value in fields.items():
            if key not in known:
                self._fail(f"{where}: unknown field {key!r} (fields: {', '.join(known)})")
            if key == "port":
                if not isinstance(value, int) or isinstance(value, bool) \
                        or not 0 < value < 65536:
                    self._fail(f"{where}: port must be a number from 1 to 65535")
            elif not isinstance(value, str) or not value:
                self._fail(f"{where}: {key} must be a non-empty string")
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
        out: list[str] = []
        stack: list[str] = []

        def expand(group: str) -> None:
            if group in stack:
                self._fail(f"group {group!r} contains itself")
            stack.append(group)
            for member in self.groups[group]:
                if member in self.servers:
                    if member not in out:
                        out.append(member)
                elif member in self.groups:
                    expand(member)
                else:
                    self._fail(f"groups.{group}: no server or group {member!r}")
            stack.pop()

        expand(name)
        return out

    def fields(self, server: str, identity: str | None = None) -> dict[str, Any]:
        """A server's fields, with [defaults] and its identity's files resolved;
        ``identity``: this identity's instead (``-i``)."""
        own = self.servers[server]
        base = self.servers[own["like"]] if "like" in own else {}
        merged = {**self.defaults, **base, **own}
        merged.pop("like", None)
        if "identity" in base and "identity" not in own:
            merged["identity"] = base["identity"]
        return self._resolve(merged, identity)

    def _resolve(self, fields: dict[str, Any], identity: str | None) -> dict[str, Any]:
        name = identity if identity is not None else fields.get("identity")
        fields.pop("identity", None)
        if name is not None:
            fields.update(self.identity(name))
        return fields

    def identity(self, name: str) -> dict[str, Any]:
        if name not in self.identities:
            raise ConfigError(f"no identity {name!r} in {self.path} "
                              f"(identities: {', '.join(self.identities) or 'none'})")
        return dict(self.identities[name])


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
    return Config(path, data)


def _explicit(ns: argparse.Namespace, parser: argparse.ArgumentParser, dest: str,
              env: str) -> bool:
    """Whether the user set this option: its variable, or a flag (a value other
    than the parser's default)."""
    return bool(os.environ.get(env)) or getattr(ns, dest) != parser.get_default(dest)


def select(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Target] | None:
    """Apply ``-s NAME`` and ``-i NAME``: for a server (or none: ``-i`` alone),
    fill ``ns`` from its profile and return None; for a group, return one
    :class:`Target` per member (fan-out)."""
    name = ns.server or os.environ.get("JOBCTL_SERVER") or ""
    identity = getattr(ns, "identity", None) or os.environ.get("JOBCTL_IDENTITY") or None
    config = load()
    explicit = {f: _explicit(ns, parser, dest, env) for f, (dest, env) in FIELDS.items()}
    if identity is not None:
        config.identity(identity)  # a clear error for an unknown one
        for field in IDENTITY_FIELDS:  # -i beats the variables, not the flags
            dest, _env = FIELDS[field]
            explicit[field] = getattr(ns, dest) != parser.get_default(dest) and \
                getattr(ns, dest) != os.environ.get(_env)
    if not name:  # -i alone: the identity's files for the server on the command line
        assert identity is not None
        for field, value in config.identity(identity).items():
            if not explicit[field]:
                setattr(ns, FIELDS[field][0], value)
        return None
    members = config.members(name)
    if members is None:
        for field, value in config.fields(name, identity).items():
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
        fields = config.fields(member, identity)
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
                                  "(nor an identity, [defaults], -i, -c/-k, JOBCTL_*)")
        targets.append(Target(
            name=member, address=fields["address"], port=int(fields.get("port", 8000)),
            certificate=fields["certificate"], key=fields["key"], ca=fields.get("ca"),
            server_name=fields.get("server_name"),
            trust_on_first_use=bool(getattr(ns, "trust_on_first_use", False))))
    return targets



# -- migration: profiles that carry their certificate, to identities and servers ----


def _toml_key(name: str) -> str:
    import json

    return name if name and all(c.isalnum() or c in "-_" for c in name) and name.isascii() \
        else json.dumps(name)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)


def migrate_text(path: Path) -> str | None:
    """``path``'s config in the format with identities, or None if it has nothing
    to migrate (no server and no [defaults] carries a certificate or key).

    Each distinct (certificate, key) pair becomes an identity named after the
    certificate's file (``alice.pem``: ``alice``); ``[defaults]`` and each server
    name theirs. Servers that were the same endpoint (address, port, server_name,
    CA) under several identities become one server, and the others ``like`` it
    with their own identity, so that ``all`` queries each server once.
    """
    load(path)  # the file as it is must be valid
    import tomllib

    data = tomllib.loads(path.read_text())
    defaults: dict[str, Any] = dict(data.get("defaults", {}))
    servers: dict[str, dict[str, Any]] = {n: dict(f) for n, f in data.get("servers", {}).items()}
    if not any(k in f for f in (defaults, *servers.values()) for k in IDENTITY_FIELDS):
        return None
    identities: dict[str, dict[str, Any]] = dict(data.get("identities", {}))
    by_pair: dict[tuple[Any, Any], str] = {
        (f.get("certificate"), f.get("key")): n for n, f in identities.items()}

    def identity_for(fields: dict[str, Any]) -> str | None:
        pair = (fields.get("certificate", defaults.get("certificate")),
                fields.get("key", defaults.get("key")))
        if pair == (None, None):
            return None
        if pair not in by_pair:
            stem = Path(str(pair[0] or pair[1])).stem or "identity"
            name, n = stem, 2
            while name in identities:
                name, n = f"{stem}-{n}", n + 1
            identities[name] = {k: v for k, v in zip(IDENTITY_FIELDS, pair, strict=True)
                                if v is not None}
            by_pair[pair] = name
        return by_pair[pair]

    default_identity = identity_for({}) if any(k in defaults for k in IDENTITY_FIELDS) else None
    seen: dict[tuple[Any, ...], str] = {}
    new_servers: dict[str, dict[str, Any]] = {}
    for name, fields in servers.items():
        own = identity_for(fields) if any(k in fields for k in IDENTITY_FIELDS) else None
        rest = {k: v for k, v in fields.items() if k not in IDENTITY_FIELDS}
        endpoint = tuple(rest.get(k, defaults.get(k)) for k in ("address", "port",
                                                                  "server_name", "ca"))
        if endpoint in seen and "like" not in rest:
            rest = {"like": seen[endpoint]}
            base = new_servers[seen[endpoint]].get("identity", default_identity)
            own = own or default_identity
            if own != base and own is not None:
                rest["identity"] = own
        else:
            seen.setdefault(endpoint, name)
            if own is not None and own != default_identity:
                rest["identity"] = own
        new_servers[name] = rest
    new_defaults = {k: v for k, v in defaults.items() if k not in IDENTITY_FIELDS}
    if default_identity is not None:
        new_defaults["identity"] = default_identity
    out = [f"# migrated by jobctl config migrate from {path.name}", ""]
    for name, fields in identities.items():
        out += [f"[identities.{_toml_key(name)}]",
                *(f"{k} = {_toml_value(v)}" for k, v in fields.items()), ""]
    if new_defaults:
        out += ["[defaults]", *(f"{k} = {_toml_value(v)}" for k, v in new_defaults.items()), ""]
    for name, fields in new_servers.items():
        out += [f"[servers.{_toml_key(name)}]",
                *(f"{k} = {_toml_value(v)}" for k, v in fields.items()), ""]
    groups = data.get("groups", {})
    if groups:
        out += ["[groups]", *(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in groups.items()),
                ""]
    return "\n".join(out)


def migrate(path: Path, *, write: bool) -> str:
    """Migrate ``path`` (see :func:`migrate_text`): print the new text, or with
    ``write`` replace the file, keeping the old one as ``config.toml.bak``."""
    text = migrate_text(path)
    if text is None:
        return f"{path}: nothing to migrate (identities are already apart from servers)\n"
    load_text(path, text)  # the result must load: never write a file jobctl refuses
    if not write:
        return text
    backup = path.with_name(path.name + ".bak")
    backup.write_bytes(path.read_bytes())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return f"{path}: migrated ({backup.name} keeps the old file)\n"


def load_text(path: Path, text: str) -> Config:
    import tomllib

    try:
        return Config(path, tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
