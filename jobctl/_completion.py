"""Shell completion scripts, generated from the parser by shtab.

Job IDs complete from ``jobctl list`` (run with the options already on the
command line, so ``-a``/``-p``/``-c`` select the same server); that list's
tab-separated form (stdout not a terminal) gives the ID and the command, which
zsh and fish show as descriptions.
"""

from __future__ import annotations

import argparse

#: A shell function per shell that prints the job IDs (and descriptions).
_PREAMBLE = {
    "bash": r'''
_jobctl_job_ids() {
  local opts=() i w
  for ((i = 1; i < COMP_CWORD; i++)); do
    w=${COMP_WORDS[i]}
    case $w in
      -c|--certificate|-k|--key|-C|--certificate-authority|-a|--address|-p|--port|--server-name)
        opts+=("$w" "${COMP_WORDS[i+1]}"); ((i++)) ;;
    esac
  done
  jobctl "${opts[@]}" list 2>/dev/null | cut -f1
}
''',
    "zsh": r'''
_jobctl_job_ids() {
  local -a ids opts
  local i
  for ((i = 2; i < CURRENT; i++)); do
    case ${words[i]} in
      -c|--certificate|-k|--key|-C|--certificate-authority|-a|--address|-p|--port|--server-name)
        opts+=(${words[i]} ${words[i+1]}); ((i++)) ;;
    esac
  done
  ids=(${(f)"$(jobctl $opts list 2>/dev/null | awk -F'\t' '{print $1 ":" $3 " " $6}')"})
  _describe -t jobs 'job ID' ids
}
''',
    "fish": r'''
function __jobctl_job_ids
  set -l tokens (commandline -opc)
  set -l opts
  set -l i 2
  while test $i -lt (count $tokens)
    switch $tokens[$i]
      case -c --certificate -k --key -C --certificate-authority -a --address -p --port --server-name
        set -a opts $tokens[$i] $tokens[(math $i + 1)]
        set i (math $i + 1)
    end
    set i (math $i + 1)
  end
  jobctl $opts list 2>/dev/null | awk -F'\t' '{print $1 "\t" $3 " " $6}'
end
''',
}

_JOB_ID = {"bash": "_jobctl_job_ids", "zsh": "_jobctl_job_ids", "fish": "(__jobctl_job_ids)"}


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (bash, zsh or fish), from jobctl's whole
    parser (``parser``: passed in, so that this module never imports the command line)."""
    import shtab

    for action in _id_actions(parser):
        action.complete = _JOB_ID  # type: ignore[attr-defined]
    result: str = shtab.complete(parser, shell=shell, preamble=_PREAMBLE[shell])
    return result


def _id_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_id_actions(sub))
        elif action.dest in ("id", "ids"):
            found.append(action)
    return found
