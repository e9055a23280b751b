#!/usr/bin/env bash
# bench/setup.sh: install what the benchmarks compare jobd against, if missing.
#
#   sshd and ssh (openssh-server, openssh-client): the reference users run today;
#   socat: a raw TLS 1.3 pipe, the limit of the transport.
#
# Debian/Ubuntu only (apt-get); run as root. Does nothing when all are present.
set -euo pipefail

need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v socat >/dev/null 2>&1 || need+=(socat)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "bench/setup.sh: missing ${need[*]} and no apt-get to install them" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "bench/setup.sh: missing ${need[*]}; run as root to install them" >&2
    exit 1
fi
echo "bench/setup.sh: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: the package must not start (or enable) a system sshd.
policy=/usr/sbin/policy-rc.d
created=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created=1
fi
trap '[ "$created" -eq 1 ] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
