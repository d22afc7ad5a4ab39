#!/usr/bin/env bash
# End-to-end smoke test across architectures: an agent built for TARGET
# (default mips, big-endian) runs under qemu-user and serves a run from the
# x86_64 CLI over mTLS on loopback. Exits non-zero on any failure.
#   cross/smoke.sh [TARGET] [CLI-BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-mips}
CLI=${2:-target/x86_64-unknown-linux-musl/release/ctrl-exec}
read -r _ triple _ < <(awk -v n="$name" '$1 == n' openwrt-feed/targets.txt)
AGENT_BIN="$PWD/target/$triple/release/ctrl-exec"
CLI="$(cd "$(dirname "$CLI")" && pwd)/$(basename "$CLI")"
case "$name" in
    mips) QEMU=(qemu-mips-static -cpu 24Kc) ;;
    mipsel) QEMU=(qemu-mipsel-static -cpu 24KEc) ;;
    arm) QEMU=(qemu-arm-static -cpu arm1176) ;;
    armv7) QEMU=(qemu-arm-static -cpu cortex-a7) ;;
    aarch64) QEMU=(qemu-aarch64-static -cpu cortex-a53) ;;
    x86_64) QEMU=() ;;
    *) echo "unknown target $name" >&2; exit 2 ;;
esac
for f in "$AGENT_BIN" "$CLI"; do [ -x "$f" ] || { echo "missing $f: build it first (make cross / make static)" >&2; exit 1; }; done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ctrl-exec-smoke.XXXXXX")
AGENT_PID=""
cleanup() {
    [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
while :; do
    PORT=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || break
done
export CTRL_EXEC_CONFIG="$WORK/ctrl-exec.conf"
cat > "$CTRL_EXEC_CONFIG" <<CONF
cert = dispatcher.crt
key = dispatcher.key
ca = ca.crt
ca_dir = .
registry_dir = agents
dispatcher_id = smoke
key_type = rsa2048
log = stderr
read_timeout = 120
connect_timeout = 60
CONF
"$CLI" setup-ca >/dev/null 2>&1
"$CLI" setup-ctrl-exec >/dev/null 2>&1
"$CLI" enroll router --ip 127.0.0.1 --agent-port "$PORT" --bind 127.0.0.1 --bundle > "$WORK/bundle" 2>/dev/null
# The foreign binary unpacks the bundle itself: bundle format across builds.
"${QEMU[@]}" "$AGENT_BIN" agent install-bundle --dir "$WORK/agent" < "$WORK/bundle" >/dev/null
mkdir -p "$WORK/scripts"
printf '#!/bin/sh\necho "uname=$(uname -m) args=$*"\n' > "$WORK/scripts/hello.sh"
chmod 755 "$WORK/scripts/hello.sh"
echo "hello = $WORK/scripts/hello.sh timeout=30" >> "$WORK/agent/scripts.conf"
echo "[smoke] $name agent: $(file -b "$AGENT_BIN" | cut -d, -f1-2) under ${QEMU[*]:-native}"
"${QEMU[@]}" "$AGENT_BIN" agent serve --config "$WORK/agent/agent.conf" --log-stderr 2> "$WORK/agent.log" &
AGENT_PID=$!
for _ in $(seq 600); do grep -q 'ACTION=start' "$WORK/agent.log" 2>/dev/null && break; sleep 0.1; done
grep -q 'ACTION=start' "$WORK/agent.log" || { cat "$WORK/agent.log"; echo "[smoke] agent did not start" >&2; exit 1; }
out=$("$CLI" run --json router hello -- 'a b' '$(id)' 2>"$WORK/cli.log") || { cat "$WORK/cli.log" "$WORK/agent.log"; echo "$out"; exit 1; }
echo "[smoke] reply: $out"
grep -q '"exit":0' <<<"$out" || { echo "[smoke] run failed" >&2; exit 1; }
grep -q 'args=a b $(id)' <<<"$out" || { echo "[smoke] arguments did not arrive verbatim" >&2; exit 1; }
"$CLI" ping router >/dev/null 2>&1 || { echo "[smoke] ping failed" >&2; exit 1; }
grep -q 'ACTION=run .*EXIT=0' "$WORK/agent.log" || { cat "$WORK/agent.log"; exit 1; }
echo "[smoke] ok: x86_64 CLI -> $name agent run and ping"
