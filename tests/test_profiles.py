"""config.toml: precedence of flags, variables, profiles and defaults; groups."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from jobctl._cli import build_parser
from jobctl._errors import ConfigError
from jobctl._profiles import Target, load, select

CONFIG = """
[defaults]
certificate = "certs/alice.pem"
key = "~/alice.key"
port = 9000

[servers.web1]
address = "10.0.0.5"
ca = "/etc/web-ca.pem"

[servers.web2]
address = "10.0.0.6"
port = 9100
certificate = "/other/bob.pem"

[groups]
web = ["web1", "web2"]
everything = ["web", "web1"]
"""


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    for name in ("JOBCTL_CERTIFICATE", "JOBCTL_KEY", "JOBCTL_CA", "JOBCTL_ADDRESS",
                 "JOBCTL_PORT", "JOBCTL_SERVER_NAME", "JOBCTL_SERVER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOBCTL_CONFIG", str(path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no default files
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return path


def selected(*argv: str) -> tuple[argparse.Namespace, list[Target] | None]:
    args = list(argv)
    parser = build_parser(args)
    ns = parser.parse_args(args)
    return ns, select(ns, parser)


def test_a_server_fills_what_the_command_line_left(config: Path, tmp_path: Path) -> None:
    ns, targets = selected("-s", "web1", "list")
    assert targets is None
    assert (ns.address, ns.port, ns.ca) == ("10.0.0.5", 9000, "/etc/web-ca.pem")
    assert ns.certificate == str(tmp_path / "certs" / "alice.pem")  # relative to the file
    assert ns.key == str(tmp_path / "home" / "alice.key")


def test_flags_and_variables_beat_the_profile(config: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ns, _ = selected("-s", "web2", "-p", "7000", "list")
    assert (ns.address, ns.port, ns.certificate) == ("10.0.0.6", 7000, "/other/bob.pem")
    monkeypatch.setenv("JOBCTL_CERTIFICATE", "/env/carol.pem")
    monkeypatch.setenv("JOBCTL_ADDRESS", "10.9.9.9")
    ns, _ = selected("-s", "web2", "list")
    assert (ns.address, ns.certificate) == ("10.9.9.9", "/env/carol.pem")
    monkeypatch.setenv("JOBCTL_SERVER", "web1")
    ns, _ = selected("list")
    assert ns.server == "web1"


def test_groups_expand_in_order_once(config: Path) -> None:
    _, targets = selected("-s", "everything", "list")
    assert targets is not None
    assert [(t.name, t.address, t.port) for t in targets] == [
        ("web1", "10.0.0.5", 9000), ("web2", "10.0.0.6", 9100)]
    assert [t.ca for t in targets] == ["/etc/web-ca.pem", None]  # web2: trust on first use
    _, every = selected("-s", "all", "list")
    assert every is not None and [t.name for t in every] == ["web1", "web2"]


@pytest.mark.parametrize(("text", "message"), [
    ('[servers.a]\naddress = "x"\nport = 0\n', "port must be a number from 1 to 65535"),
    ('[servers.a]\naddress = 5\n', "address must be a non-empty string"),
    ('[server.a]\naddress = "x"\n', "unknown table 'server'"),
    ('[servers.a]\naddress = "x"\n[groups]\ng = ["g"]\n', "group 'g' contains itself"),
    ('[servers.a]\naddress = "x"\n[groups]\ng = ["b"]\n', "no server or group 'b'"),
    ('[servers.a]\naddress = "x"\n[groups]\na = ["a"]\n', "'a' is both a server and a group"),
    ("[servers.a\n", "Expected ']'"),
])
def test_mistakes_are_config_errors(config: Path, text: str, message: str) -> None:
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg = load()
        cfg.members("g" if "groups" in text else "a")


def test_unknown_name_lists_the_known_ones(config: Path) -> None:
    with pytest.raises(ConfigError, match=r"no server or group 'web3' .*known: all, everything, "
                                          r"web, web1, web2"):
        selected("-s", "web3", "list")
