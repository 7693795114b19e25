#!/usr/bin/env bash
# Install the poolers used by tests/scaling/: PgBouncer and pgpool-II (Debian
# packages pgbouncer and pgpool2).  Idempotent: safe to run again.
#
# The tests start their own PgBouncer and pgpool-II on private loopback ports
# (20000-29999), as the unprivileged `postgres` OS user.  The distribution's
# services are not wanted: they are kept from starting during the install
# (policy-rc.d) and stopped and disabled if they run anyway, so nothing of
# theirs listens on 6432 (PgBouncer) or 5433/9898 (pgpool-II).
set -euo pipefail

APT_PACKAGES=(pgbouncer pgpool2)
SERVICES=(pgbouncer pgpool2)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-scaling: apt-get install ${missing[*]}"
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        # Deny service starts during this install only.
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        trap '$SUDO rm -f "$policy"' EXIT
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# If the distribution's services run anyway (a machine booted with systemd, an
# earlier install without policy-rc.d), stop them and keep them from starting.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for s in "${SERVICES[@]}"; do
        $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true
    done
else
    for s in "${SERVICES[@]}"; do
        if [ -x "/etc/init.d/$s" ] && "/etc/init.d/$s" status >/dev/null 2>&1; then
            $SUDO "/etc/init.d/$s" stop >/dev/null 2>&1 || true
        fi
    done
fi

pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
pgpool=$(command -v pgpool || echo /usr/sbin/pgpool)
for exe in "$pgbouncer" "$pgpool"; do
    if [ ! -x "$exe" ]; then
        echo "install-scaling: $exe is missing after the install" >&2
        exit 1
    fi
done
echo "install-scaling: ready: $("$pgbouncer" --version | head -n1); $("$pgpool" --version 2>&1 | head -n1)"
