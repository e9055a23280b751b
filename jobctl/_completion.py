"""Shell completion scripts, generated from the parser by shtab.

Job IDs complete from ``jobctl list`` (run with the options already on the
command line, so ``-s``/``-a``/``-p``/``-c`` select the same server, group or
profile; ``JOBCTL_SERVER`` applies by itself), in the numeric order the server
lists them; that list's tab-separated form (stdout not a terminal) gives the ID
and the command, which zsh and fish show as descriptions. ``-s`` completes the
server and group names of config.toml (``jobctl completion --server-names``).
"""

from __future__ import annotations

import argparse

#: The global options with a value that select the server (and the identity):
#: the job-ID completion passes them on to ``jobctl list``.
_SERVER_OPTIONS = ("-c --certificate -k --key -C --certificate-authority -a --address -p --port "
                   "--server-name -s --server -i --identity")

#: Shell functions per shell: the job IDs (with descriptions where the shell
#: shows them), in the numeric order ``jobctl list`` gives them, from the server
#: (or group, or profile) the command line names; and the names in config.toml.
_PREAMBLE = {
    "bash": r"""
_jobctl_job_ids() {
  local opts=() i w
  for ((i = 1; i < COMP_CWORD; i++)); do
    w=${COMP_WORDS[i]}
    case $w in
      @CASE@)
        opts+=("$w" "${COMP_WORDS[i+1]}"); ((i++)) ;;
    esac
  done
  compopt -o nosort 2>/dev/null  # numeric order, as listed (bash 4.4)
  jobctl "${opts[@]}" --no-prefix list 2>/dev/null | cut -f1
}
_jobctl_servers() {
  jobctl completion --server-names 2>/dev/null
}
_jobctl_identities() {
  jobctl completion --identity-names 2>/dev/null
}
""",
    "zsh": r"""
_jobctl_job_ids() {
  local -a ids opts
  local i
  for ((i = 2; i < CURRENT; i++)); do
    case ${words[i]} in
      @CASE@)
        opts+=(${words[i]} ${words[i+1]}); ((i++)) ;;
    esac
  done
  ids=(${(f)"$(jobctl $opts --no-prefix list 2>/dev/null | awk -F'\t' '{print $1 ":" $3 " " $6}')"})
  _describe -V -t jobs 'job ID' ids
}
_jobctl_servers() {
  local -a names
  names=(${(f)"$(jobctl completion --server-names 2>/dev/null)"})
  compadd -a names
}
_jobctl_identities() {
  local -a names
  names=(${(f)"$(jobctl completion --identity-names 2>/dev/null)"})
  compadd -a names
}
""",
    "fish": r"""
function __jobctl_job_ids
  set -l tokens (commandline -opc)
  set -l opts
  set -l i 2
  while test $i -lt (count $tokens)
    switch $tokens[$i]
      case @FISHCASE@
        set -a opts $tokens[$i] $tokens[(math $i + 1)]
        set i (math $i + 1)
    end
    set i (math $i + 1)
  end
  jobctl $opts --no-prefix list 2>/dev/null | awk -F'\t' '{print $1 "\t" $3 " " $6}'
end
function __jobctl_servers
  jobctl completion --server-names 2>/dev/null
end
function __jobctl_identities
  jobctl completion --identity-names 2>/dev/null
end
""",
}
for _shell in _PREAMBLE:
    _PREAMBLE[_shell] = (_PREAMBLE[_shell].replace("@CASE@", _SERVER_OPTIONS.replace(" ", "|"))
                         .replace("@FISHCASE@", _SERVER_OPTIONS))

_JOB_ID = {"bash": "_jobctl_job_ids", "zsh": "_jobctl_job_ids", "fish": "(__jobctl_job_ids)"}
_SERVER = {"bash": "_jobctl_servers", "zsh": "_jobctl_servers", "fish": "(__jobctl_servers)"}
_IDENTITY = {"bash": "_jobctl_identities", "zsh": "_jobctl_identities",
             "fish": "(__jobctl_identities)"}


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (bash, zsh or fish), from jobctl's whole
    parser (``parser``: passed in, so that this module never imports the command line)."""
    import shtab

    for action in _actions(parser, ("id", "ids")):
        action.complete = _JOB_ID  # type: ignore[attr-defined]
    for action in _actions(parser, ("server",)):
        action.complete = _SERVER  # type: ignore[attr-defined]
    for action in _actions(parser, ("identity",)):
        action.complete = _IDENTITY  # type: ignore[attr-defined]
    result: str = shtab.complete(parser, shell=shell, preamble=_PREAMBLE[shell])
    return result


def _actions(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_actions(sub, dests))
        elif action.dest in dests:
            found.append(action)
    return found


def server_names(identities: bool = False) -> list[str]:
    """The servers and groups (and ``all``) config.toml names, for ``-s``, or its
    identities, for ``-i``; nothing when there is no config file."""
    from ._errors import ConfigError
    from ._profiles import load

    try:
        config = load()
    except ConfigError:
        return []
    if identities:
        return sorted(config.identities)
    return sorted(set(config.servers) | set(config.groups))
