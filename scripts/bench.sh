#!/usr/bin/env bash
# `make bench`: figures for the foundation's performance targets, measured on
# loopback with the release binary and RSA-4096 certificates (upstream's key
# size). Prints, does not judge: compare with the targets in the issues.
#   - idle agent RSS (KiB), at start and after the latency runs
#   - median and p95 wall time of `ctrl-exec run` of a trivial script over N runs
#   - wall time of one `run` fanned out to 100 agents
#   - binary size (and gzip -9)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-200}
FANOUT=${FANOUT:-100}

# The shipping form is a static musl binary; fall back to the host (glibc)
# build when the musl target or musl-gcc is not installed.
# BENCH_BIN=<path> measures another build instead (e.g. the `profiling`
# profile, which keeps symbols for perf).
if [ -n "${BENCH_BIN:-}" ]; then
    BIN=$(realpath "$BENCH_BIN")
elif rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl && command -v musl-gcc >/dev/null; then
    cargo build --release --quiet --target x86_64-unknown-linux-musl
    BIN="$PWD/target/x86_64-unknown-linux-musl/release/ctrl-exec"
else
    echo "note: x86_64-unknown-linux-musl or musl-gcc missing; measuring the glibc build" >&2
    cargo build --release --quiet
    BIN="$PWD/target/release/ctrl-exec"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ctrl-exec-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Below the kernel's usual ephemeral range (32768-60999), so a port that
# tests free is not taken a moment later as the source port of an outgoing
# connection.
# Each port is handed out once per bench ($WORK/used), since an agent may
# not listen yet when the next port is chosen.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 12000))
        grep -qx "$p" "$WORK/used" 2>/dev/null && continue
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
        echo "$p" >> "$WORK/used"
        echo "$p"
        return
    done
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rss_split() { awk '/^RssAnon/ {a=$2} /^RssFile/ {f=$2} /^RssShmem/ {s=$2} END {printf "anon %d + file %d KiB", a, f+s}' "/proc/$1/status"; }
# time N runs of a command -> file of seconds
timeit() { # n out cmd...
    local n=$1 out=$2; shift 2
    : > "$out"
    for _ in $(seq "$n"); do
        local s=$EPOCHREALTIME
        "$@" >/dev/null 2>&1
        local e=$EPOCHREALTIME
        echo "$e - $s" | awk '{print $1 - $3}' >> "$out"
    done
}
# median and p95 of numbers on stdin (seconds) -> "median p95" in ms
stats() { sort -g | awk '{a[NR]=$1} END {m=a[int((NR+1)/2)]; p=a[int(NR*0.95+0.999)]; printf "%.1f %.1f\n", m*1000, p*1000}'; }

export CTRL_EXEC_CONFIG="$WORK/disp/ctrl-exec.conf"
mkdir -p "$WORK/disp" "$WORK/scripts"
cat > "$CTRL_EXEC_CONFIG" <<CONF
cert = dispatcher.crt
key = dispatcher.key
ca = ca.crt
ca_dir = .
registry_dir = agents
dispatcher_id = bench
log = stderr
CONF
"$BIN" setup-ca >/dev/null 2>&1
"$BIN" setup-ctrl-exec >/dev/null 2>&1
printf '#!/bin/sh\necho ok\n' > "$WORK/scripts/trivial.sh"
chmod 755 "$WORK/scripts/trivial.sh"

# One enrolled identity, cloned for the fan-out agents (they may share a
# certificate: the dispatcher trusts the CA, not a name), so the bench does not
# spend minutes generating 100 RSA-4096 keys.
PORT=$(free_port)
"$BIN" enroll b000 --ip 127.0.0.1 --agent-port "$PORT" --bind 127.0.0.1 --out "$WORK/a/b000" >/dev/null 2>&1
echo "trivial = $WORK/scripts/trivial.sh" >> "$WORK/a/b000/scripts.conf"
# One script name per API load client (see benches/api_load.rs): sync runs of
# one script on one host are serialised by the dispatcher lock.
for i in $(seq 0 31); do echo "trivial-$i = $WORK/scripts/trivial.sh"; done >> "$WORK/a/b000/scripts.conf"
echo "log = syslog" >> "$WORK/a/b000/agent.conf"
echo "syslog_socket = $WORK/no-syslog-here" >> "$WORK/a/b000/agent.conf"

start_agent() { # dir
    "$BIN" agent serve --config "$1/agent.conf" 2>>"$WORK/agents.log" &
    PIDS+=($!)
}
wait_port() { # port
    for _ in $(seq 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.025; done
    echo "agent on port $1 did not start" >&2; cat "$WORK/agents.log" >&2; exit 1
}

start_agent "$WORK/a/b000"
AGENT=${PIDS[0]}
wait_port "$PORT"
sleep 1
RSS_IDLE=$(rss_kib "$AGENT")

"$BIN" run b000 trivial >/dev/null 2>&1 # warm the page cache
RSS_SPLIT=$(rss_split "$AGENT")
# Full handshakes (both RSA-4096 signatures every time): session cache off.
CONF_FULL="$WORK/disp/full.conf"
{ cat "$CTRL_EXEC_CONFIG"; echo "tls_session_cache = off"; } > "$CONF_FULL"
timeit "$RUNS" "$WORK/lat-full" env CTRL_EXEC_CONFIG="$CONF_FULL" "$BIN" run b000 trivial
read -r FULL_MED FULL_P95 < <(stats < "$WORK/lat-full")
# Default: the dispatcher resumes its TLS session with the agent.
timeit "$RUNS" "$WORK/lat" "$BIN" run b000 trivial
read -r RUN_MED RUN_P95 < <(stats < "$WORK/lat")
timeit 50 "$WORK/plat" "$BIN" ping b000
read -r PING_MED PING_P95 < <(stats < "$WORK/plat")
sleep 1
RSS_AFTER=$(rss_kib "$AGENT")

# Fan-out: clone the agent FANOUT-1 times on new ports and register each.
NAMES=(b000)
for i in $(seq 1 $((FANOUT - 1))); do
    n=$(printf 'b%03d' "$i")
    p=$(free_port)
    cp -r "$WORK/a/b000" "$WORK/a/$n"
    sed -i "s/^port = .*/port = $p/" "$WORK/a/$n/agent.conf"
    sed -e "s/\"hostname\":\"b000\"/\"hostname\":\"$n\"/" -e "s/\"port\":$PORT/\"port\":$p/" \
        "$WORK/disp/agents/b000.json" > "$WORK/disp/agents/$n.json"
    start_agent "$WORK/a/$n"
    NAMES+=("$n")
    echo "$p" >> "$WORK/ports"
done
while read -r p; do wait_port "$p"; done < "$WORK/ports"
timeit 5 "$WORK/fan-full" env CTRL_EXEC_CONFIG="$CONF_FULL" "$BIN" run "${NAMES[@]}" trivial
"$BIN" run "${NAMES[@]}" trivial >/dev/null 2>&1 || { echo "fan-out run failed" >&2; "$BIN" run "${NAMES[@]}" trivial | grep -v OK | head >&2; exit 1; }
timeit 5 "$WORK/fan" "$BIN" run "${NAMES[@]}" trivial
read -r FANF_MED _ < <(stats < "$WORK/fan-full")
read -r FAN_MED _ < <(stats < "$WORK/fan")
CLI_RSS="n/a"
if [ -x /usr/bin/time ]; then
    /usr/bin/time -f '%M' -o "$WORK/cli-rss" env CTRL_EXEC_CONFIG="$CONF_FULL" "$BIN" run "${NAMES[@]}" trivial >/dev/null 2>&1 || true
    CLI_RSS=$(tail -1 "$WORK/cli-rss")
fi
AGENTS_RSS=0
for p in "${PIDS[@]}"; do AGENTS_RSS=$((AGENTS_RSS + $(rss_kib "$p"))); done

# The API server: 32 clients keep POST /run busy against 10 of the agents.
cargo build --release --quiet --bench api_load
LOADGEN=$(ls -t target/release/deps/api_load-* | grep -v '\.d$' | head -n1)
API_PORT=$(free_port)
{ echo "api_port = $API_PORT"; echo "api_auth_default = allow"; } >> "$CTRL_EXEC_CONFIG"
"$BIN" server 2>>"$WORK/api.log" >/dev/null &
API_PID=$!
PIDS+=("$API_PID")
wait_port "$API_PORT"
API_RSS_IDLE=$(rss_kib "$API_PID")
"$LOADGEN" "$API_PORT" 32 3 "${NAMES[@]:0:10}" >/dev/null # warm-up: TLS sessions to the agents
"$LOADGEN" "$API_PORT" 32 "${API_SECS:-10}" "${NAMES[@]:0:10}" > "$WORK/load" &
LOAD_PID=$!
sleep $(( ${API_SECS:-10} / 2 ))
API_RSS_LOAD=$(rss_kib "$API_PID")
# PERF_OUT=<file>: a system-wide profile of 3 s of that load (perf record -a -g).
if [ -n "${PERF_OUT:-}" ]; then
    perf record -a -g -o "$PERF_OUT" -- sleep 3 >/dev/null 2>&1 || echo "perf record failed" >&2
fi
wait "$LOAD_PID"
API_LOAD=$(cat "$WORK/load")
# The same with each client keeping its connection to the API open, as wrk
# and HTTP/1.1 client libraries do.
API_KEEP=$(API_LOAD_KEEP=1 "$LOADGEN" "$API_PORT" 32 "${API_SECS:-10}" "${NAMES[@]:0:10}")

# Per target: whatever `make cross` / `make static` has built.
TARGET_ROWS=""
while read -r name triple _; do
    case "$name" in ''|'#'*) continue ;; esac
    b="target/$triple/release/ctrl-exec"
    [ -f "$b" ] || { TARGET_ROWS+=$(printf '  %-8s %-32s not built (make cross TARGETS=%s)' "$name" "$triple" "$name")$'\n'; continue; }
    TARGET_ROWS+=$(printf '  %-8s %-32s %9s bytes, gzip -9 %9s bytes' "$name" "$triple" "$(stat -c %s "$b")" "$(gzip -9 -c "$b" | wc -c)")$'\n'
done < openwrt-feed/targets.txt
# The MIPS agent idling under qemu-user: qemu's own RSS (emulator plus
# translated code), an upper bound, not what a router would show.
MIPS_BIN="target/mips-unknown-linux-musl/release/ctrl-exec"
MIPS_RSS="not measured (build it with: make cross TARGETS=mips)"
if [ -x "$MIPS_BIN" ] && command -v qemu-mips-static >/dev/null; then
    p=$(free_port)
    cp -r "$WORK/a/b000" "$WORK/a/mips"
    sed -i "s/^port = .*/port = $p/" "$WORK/a/mips/agent.conf"
    qemu-mips-static -cpu 24Kc "$MIPS_BIN" agent serve --config "$WORK/a/mips/agent.conf" 2>>"$WORK/agents.log" &
    PIDS+=($!)
    wait_port "$p"
    sleep 2
    MIPS_RSS="$(rss_kib "${PIDS[-1]}") KiB ($(rss_split "${PIDS[-1]}"))"
fi

SIZE=$(stat -c %s "$BIN")
GZ=$(gzip -9 -c "$BIN" | wc -c)
cat <<REPORT

ctrl-exec $("$BIN" --version | cut -d' ' -f2) bench: $(nproc) cores, $(uname -m), RSA-4096 keys, loopback
binary: $BIN
        ($(file -b "$BIN" | cut -d, -f1,2,5 | sed 's/  */ /g'))

  idle agent RSS at start                 ${RSS_IDLE} KiB   (target <= 3072 KiB)
  idle agent RSS after $((2 * RUNS + 51)) requests        ${RSS_AFTER} KiB   (after one request: ${RSS_SPLIT})
  run, full TLS handshake, ${RUNS} runs     median ${FULL_MED} ms, p95 ${FULL_P95} ms   (target median <= 20 ms)
  run, resumed TLS session, ${RUNS} runs    median ${RUN_MED} ms, p95 ${RUN_P95} ms   (the default for repeat calls)
  ping, resumed, 50 runs                  median ${PING_MED} ms, p95 ${PING_P95} ms
  one run to ${FANOUT} agents, full handshakes median ${FANF_MED} ms of 5   (target <= 2000 ms)
  one run to ${FANOUT} agents, resumed        median ${FAN_MED} ms of 5
  CLI max RSS for that fan-out            ${CLI_RSS} KiB
  ${FANOUT} agents' RSS together               $((AGENTS_RSS / 1024)) MiB
  binary size                             ${SIZE} bytes (gzip -9: ${GZ} bytes)
  mips agent idle under qemu-mips-static  ${MIPS_RSS}
  API POST /run, 32 clients, 10 agents    ${API_LOAD}   (targets: >= 1000 rps, median <= 25 ms)
    the same, clients keep connections    ${API_KEEP}
  API server RSS, idle / under that load  ${API_RSS_IDLE} / ${API_RSS_LOAD} KiB

per target (static, release profile: opt-level z, LTO, panic=abort, stripped, trimmed OpenSSL):
${TARGET_ROWS}
REPORT
