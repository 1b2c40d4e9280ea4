#!/usr/bin/env bash
# The service guide's lines (docs/service.md, "Install"), run for real as root, then the
# upgrade, backup/restore and removal paths. tests/e2e/test_install.py runs it in a throwaway
# root (a private mount namespace with an overlay over /), never on the machine itself.
#   install_walkthrough.sh CHECKOUT
set -euxo pipefail
cd "$1"

./scripts/install
peerd --version
peerd init --name lab-a --network research --broker mqtt://127.0.0.1:1
chown -R peerd:peerd /var/lib/peerd
systemd-tmpfiles --create /usr/local/lib/tmpfiles.d/peerd.conf

# What systemctl would start: the unit's ExecStart= as the unit's user (with its UMask).
exec_start=$(sed -n 's/^ExecStart=//p' /usr/local/lib/systemd/system/peerd.service)
# shellcheck disable=SC2086 # ExecStart= is a command line: split it as systemd does
(umask 0077 && exec runuser -u peerd -- $exec_start) >/var/log/walk-daemon.log 2>&1 &
daemon=$!
for _ in $(seq 1 100); do
    if peerd status --json >/dev/null 2>&1; then break; fi
    sleep 0.1
done
peerd status --json || { cat /var/log/walk-daemon.log >&2; exit 1; }

printf 'walkthrough\n' >/root/walk.pass
chmod 600 /root/walk.pass
peerd backup /root/walk.bak --passphrase-file /root/walk.pass
if peerd restore /root/walk.bak --passphrase-file /root/walk.pass --force; then
    echo "restore over a running daemon was not refused" >&2
    exit 1
fi
kill -TERM "$daemon"
wait "$daemon" || true
peerd restore /root/walk.bak --passphrase-file /root/walk.pass --force
test "$(stat -c %U /var/lib/peerd/keys/identity.key)" = peerd

second=$(./scripts/install)
echo "$second"
case "$second" in *building*) echo "the second run rebuilt" >&2; exit 1 ;; esac
./scripts/install --uninstall
test ! -e /usr/local/bin/peerd
test ! -e /opt/peerd
test -f /var/lib/peerd/keys/identity.key
test -f /etc/peerd/peerd.toml
./scripts/install --uninstall --purge
test ! -e /var/lib/peerd
test ! -e /etc/peerd
echo "walkthrough: ok"
