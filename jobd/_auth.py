"""Identity and authorization: who the peer is and what it may do (SPEC §3).

The whole policy is :data:`POLICY`, one table. Everything else asks it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from protocol._x509 import CLIENT_AUTH, allows


class Role(enum.StrEnum):
    OBSERVE = "observe"
    CONTROL = "control"
    ADMIN = "admin"


class Action(enum.StrEnum):
    START = "start"
    STOP = "stop"
    DELETE = "delete"
    READ = "read"  # status, stream, output, list
    PRUNE = "prune"  # remove finished jobs by age (every job at once: admin only)
    RERUN = "rerun"  # start a new job like an earlier one (its cwd and environment too)
    INPUT = "type into"  # send input to a job's stdin or terminal (attach with input)


class Scope(enum.Enum):
    NONE = "none"  # never
    OWN = "own"  # jobs whose owner is the caller
    ALL = "all"  # every job


POLICY: dict[Role, dict[Action, Scope]] = {
    Role.OBSERVE: {Action.START: Scope.NONE, Action.STOP: Scope.NONE,
                   Action.DELETE: Scope.NONE, Action.READ: Scope.ALL,
                   Action.PRUNE: Scope.NONE, Action.INPUT: Scope.NONE,
                   Action.RERUN: Scope.NONE},
    Role.CONTROL: {Action.START: Scope.ALL, Action.STOP: Scope.OWN,
                   Action.DELETE: Scope.OWN, Action.READ: Scope.OWN,
                   Action.PRUNE: Scope.NONE, Action.INPUT: Scope.OWN,
                   Action.RERUN: Scope.OWN},
    Role.ADMIN: {Action.START: Scope.ALL, Action.STOP: Scope.ALL,
                 Action.DELETE: Scope.ALL, Action.READ: Scope.ALL,
                 Action.PRUNE: Scope.ALL, Action.INPUT: Scope.ALL,
                 Action.RERUN: Scope.ALL},
}

ROLE_NAMES = ", ".join(r.value for r in Role)
NO_ROLE = f"certificate has no role: OU must be one of {ROLE_NAMES}"


NOT_FOR_CLIENTS = ("certificate is not for client authentication "
                   "(no clientAuth extended key usage)")


class IdentityError(Exception):
    """The verified certificate does not name exactly one caller and one role."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role

    def allowed(self, action: Action) -> bool:
        """May this caller do ``action`` on at least some job?"""
        return POLICY[self.role][action] is not Scope.NONE

    def sees(self, owner: str) -> bool:
        """May this caller read a job owned by ``owner``? Others get not_found."""
        return self.may(Action.READ, owner)

    def may(self, action: Action, owner: str) -> bool:
        scope = POLICY[self.role][action]
        return scope is Scope.ALL or (scope is Scope.OWN and owner == self.name)


def check_client_purpose(der: bytes | None) -> None:
    """Require the clientAuth EKU (RFC 5280 id-kp-clientAuth) on a client certificate.

    OpenSSL already refuses, during the handshake, a certificate whose EKU lists
    other purposes only; it accepts one without the extension, which is refused
    here: one CA's server certificates must not stand in for client certificates.
    """
    if not allows(der, CLIENT_AUTH):
        raise IdentityError(NOT_FOR_CLIENTS)


def identity_from_cert(cert: dict[str, Any] | None) -> Identity:
    """Read CN and the role OU from ``SSLSocket.getpeercert()``'s dict.

    ``subject`` is a tuple of RDNs, each a tuple of (key, value) pairs; a key
    may repeat, so every OU is collected and exactly one must exist and be a role.
    """
    if not cert:
        raise IdentityError("no client certificate")
    names: list[str] = []
    units: list[str] = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
            elif key == "organizationalUnitName":
                units.append(value)
    if len(names) != 1 or not names[0]:
        raise IdentityError("certificate has no CN" if not names else "certificate has several CNs")
    roles = {u for u in units if u in Role.__members__.values()}
    if len(roles) > 1:
        raise IdentityError(f"certificate has more than one role: OU must be one of {ROLE_NAMES}")
    if len(units) != 1 or not roles:
        raise IdentityError(NO_ROLE)
    return Identity(names[0], Role(units[0]))
