#!/usr/bin/env bash
# `make demo`: build ctrl-exec, create a throw-away CA and dispatcher, enrol one
# agent on 127.0.0.1, run an allowlisted script whose argument is full of shell
# metacharacters, try a script that is not allowlisted, and print the audit
# lines of both sides. Everything lives in a temporary directory and the agent
# is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --quiet
BIN="$PWD/target/debug/ctrl-exec"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ctrl-exec-demo.XXXXXX")
AGENT_PID=""
cleanup() {
    [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A free port on loopback: try random ones until nothing answers.
while :; do
    PORT=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || break
done

say "A private CA and a dispatcher identity (RSA-4096, as upstream) in $WORK"
mkdir -p "$WORK/dispatcher"
export CTRL_EXEC_CONFIG="$WORK/dispatcher/ctrl-exec.conf"
cat > "$CTRL_EXEC_CONFIG" <<CONF
cert = dispatcher.crt
key = dispatcher.key
ca = ca.crt
ca_dir = .
registry_dir = agents
dispatcher_id = demo-dispatcher
log = stderr
CONF
"$BIN" setup-ca
"$BIN" setup-ctrl-exec

say "Enrol agent 'demo-agent' on 127.0.0.1:$PORT (no network needed)"
"$BIN" enroll demo-agent --ip 127.0.0.1 --agent-port "$PORT" --bind 127.0.0.1 --out "$WORK/agent"
mkdir -p "$WORK/scripts"
cat > "$WORK/scripts/greet.sh" <<'SH'
#!/bin/sh
# Print each argument on its own line, exactly as received.
for a in "$@"; do printf 'arg: <%s>\n' "$a"; done
echo "context on stdin: $(head -c 120)..."
SH
chmod 755 "$WORK/scripts/greet.sh"
echo "greet = $WORK/scripts/greet.sh timeout=10" >> "$WORK/agent/scripts.conf"
echo "allowlist: $(grep -v '^#' "$WORK/agent/scripts.conf")"

say "Start the agent"
"$BIN" agent serve --config "$WORK/agent/agent.conf" --log-stderr 2> "$WORK/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do grep -q 'ACTION=start' "$WORK/agent.log" 2>/dev/null && break; sleep 0.05; done
grep -q 'ACTION=start' "$WORK/agent.log" || { cat "$WORK/agent.log"; echo "agent did not start"; exit 1; }
echo "agent pid $AGENT_PID listening on 127.0.0.1:$PORT"

NASTY="; \$(touch $WORK/pwned) \"q\" 'x' *"
say "Run the allowlisted script with the argument: $NASTY"
set -x
"$BIN" run demo-agent greet -- "$NASTY" "second arg" 2> "$WORK/dispatcher.log"
{ set +x; } 2>/dev/null
if [ -e "$WORK/pwned" ]; then echo "FAILED: an argument was executed"; exit 1; fi
echo "(no file $WORK/pwned was created: the argument was data, not a command)"

say "Run a script that is not allowlisted (refused by the agent)"
set -x
if "$BIN" run demo-agent rm-rf-everything -- / 2>> "$WORK/dispatcher.log"; then
    { set +x; } 2>/dev/null; echo "FAILED: a non-allowlisted script ran"; exit 1
fi
{ set +x; } 2>/dev/null
echo "(exit status 1, as expected)"

say "Audit lines on the dispatcher (syslog ident ctrl-exec-dispatcher)"
cat "$WORK/dispatcher.log"
say "Audit lines on the agent (syslog ident ctrl-exec-agent)"
cat "$WORK/agent.log"
REQ=$(grep -o 'REQID=[0-9a-f]*' "$WORK/dispatcher.log" | head -1)
echo
echo "The first run's $REQ appears on both sides: $(grep -c "$REQ" "$WORK/dispatcher.log") dispatcher line(s), $(grep -c "$REQ" "$WORK/agent.log") agent line(s)."
say "Demo finished; stopping the agent and removing $WORK"
