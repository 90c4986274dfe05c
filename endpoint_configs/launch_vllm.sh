#!/usr/bin/env bash
# Start one or more vLLM servers on this node, each on its own port under a supervisor, and wait until each
# answers /health. Meant for an endpoint's worker_init, so that workers start only once the models can serve.
#
# Usage: launch_vllm.sh [-f MODELS_FILE] [-m SPEC]... [-l LOG_DIR] [-H HOST] [-t TIMEOUT_S] [-i POLL_S]
#                       [-r RESTARTS] [-b BACKOFF_S] [-o BLOCK_PID [-w WALLTIME_S -s SHARED_DIR]]
#   SPEC        [VAR=value ...] MODEL PORT [vllm serve arguments...]
#               e.g. "CUDA_VISIBLE_DEVICES=0,1 meta-llama/Llama-3.1-8B-Instruct 8000 --tensor-parallel-size 2"
#   -f FILE     one SPEC per line; blank lines and lines starting with # are skipped
#   -m SPEC     a SPEC on the command line (repeatable)
#   -l LOG_DIR  where vllm-PORT.log, .pid, .supervisor.pid and .state go (default: $VLLM_LOG_DIR, else ./vllm-logs)
#   -H HOST     interface vLLM binds (default: 127.0.0.1, reachable only by workers on this node)
#   -t SECONDS  how long to wait for all servers together (default: 1800; big models load slowly)
#   -i SECONDS  health poll interval (default: 5)
#   -r COUNT    restarts of a server that dies after it served, per block (default: 5)
#   -b SECONDS  wait before the first restart, doubled for each next one up to 300 (default: 10)
#   -o PID      the block's job shell (worker_init passes $$): supervisors stop vLLM when it exits, and
#               when a server is out of restarts they end its process group, so the scheduler gets the node back
#   -w SECONDS  the block's walltime, and -s DIR a directory shared by the endpoint's blocks: stagger this
#               block against the other one (min_blocks 2) so their ends are half a walltime apart; it may
#               end itself early to get there (see "Walltime overlap" in endpoint_configs/README.md)
# Environment: VLLM_BIN, the vLLM command (default: vllm), e.g. a wrapper that runs it in a container.
# A port that already answers /health is left alone, so re-running on a warm node is harmless.
# vllm-PORT.state holds one JSON object: {"state": starting|serving|restarting|failed, "attempt",
# "max_attempts", "detail"}; compute_functions.inference reads it (via $VLLM_LOG_DIR) when vLLM is down.
# Exit status: 0 all healthy; 1 a server exited or was not healthy in time (log tails are printed and every
# server started here is stopped: worker_init must then `exit 1` so the block ends); 2 bad usage.
set -euo pipefail

log_dir=${VLLM_LOG_DIR:-./vllm-logs}
host=127.0.0.1
timeout_s=1800
poll_s=5
max_restarts=5
backoff_s=10
block_pid=
walltime_s=
shared_dir=
specs=()

usage() {
    sed -n '2,28s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while getopts "f:m:l:H:t:i:r:b:o:w:s:h" option; do
    case "$option" in
        f)
            [[ -r "$OPTARG" ]] || { echo "launch_vllm: cannot read $OPTARG" >&2; exit 2; }
            while IFS= read -r line || [[ -n "$line" ]]; do
                [[ "$line" =~ ^[[:space:]]*(#|$) ]] || specs+=("$line")
            done <"$OPTARG"
            ;;
        m) specs+=("$OPTARG") ;;
        l) log_dir=$OPTARG ;;
        H) host=$OPTARG ;;
        t) timeout_s=$OPTARG ;;
        i) poll_s=$OPTARG ;;
        r) max_restarts=$OPTARG ;;
        b) backoff_s=$OPTARG ;;
        o) block_pid=$OPTARG ;;
        w) walltime_s=$OPTARG ;;
        s) shared_dir=$OPTARG ;;
        *) usage ;;
    esac
done
[[ ${#specs[@]} -gt 0 ]] || usage
for number in "$timeout_s" "$max_restarts" "$backoff_s" ${block_pid:+"$block_pid"}; do
    [[ "$number" =~ ^[0-9]+$ ]] || usage
done
# Staggering needs all three: the walltime, where blocks meet, and the block to end.
[[ -z "$walltime_s$shared_dir" || ( "$walltime_s" =~ ^[0-9]+$ && -n "$shared_dir" && -n "$block_pid" ) ]] || usage

# 0.0.0.0 and :: are not addresses to connect to; check through loopback instead.
check_host=$host
[[ "$host" == "0.0.0.0" || "$host" == "::" ]] && check_host=127.0.0.1

healthy() {
    curl --silent --fail --output /dev/null --max-time 2 "http://$check_host:$1/health"
}

log_tail() {
    echo "---- last lines of $log_dir/vllm-$1.log ----" >&2
    tail -n 20 "$log_dir/vllm-$1.log" >&2 || true
}

alive() {
    kill -0 "$1" 2>/dev/null
}

# Written whole, then renamed, so the compute function never reads half a file.
write_state() { # PORT STATE ATTEMPT DETAIL
    local file="$log_dir/vllm-$1.state"
    printf '{"state": "%s", "attempt": %d, "max_attempts": %d, "detail": "%s"}\n' \
        "$2" "$3" "$max_restarts" "$4" >"$file.tmp"
    mv -f "$file.tmp" "$file"
}

# The block's job shell, or whoever ran this script when there is no block (by hand, tests).
owner=${block_pid:-$PPID}

# Sleep for up to $1 seconds, polling; fails as soon as the owner is gone.
owner_sleep() {
    local until=$((SECONDS + $1))
    while ((SECONDS < until)); do
        alive "$owner" || return 1
        sleep "$poll_s"
    done
}

# Ends the block by ending its process group (job shell, worker pool, supervisors), as Parsl cancels a block:
# the scheduler gets the node back. Only a group this script runs in, never anyone else's.
end_block() {
    local group
    group=$(ps -o pgid= -p "$block_pid" | tr -d ' ')
    if [[ -n "$group" && "$group" == "$(ps -o pgid= -p "$BASHPID" | tr -d ' ')" ]]; then
        kill -TERM -- "-$group"
    fi
}

# This block's end, chosen against the other block's (in SHARED_DIR/*.end): half a walltime from it, so that
# one block serves while the other's successor queues and loads. Ending earlier than the walltime is the
# only way to get there: the engine starts a block only for load, never on a clock.
plan_end() { # OWN_END_FILE
    local now end other candidate file lock="$shared_dir/.lock" tries=0
    now=$(date +%s)
    end=$((now + walltime_s))
    # mkdir is atomic on shared filesystems; a lock left by a killed block is taken over after a minute.
    until mkdir "$lock" 2>/dev/null; do
        ((++tries < 60)) || { rm -rf "$lock"; tries=0; }
        sleep 1
    done
    for file in "$shared_dir"/*.end; do
        [[ -f "$file" && "$file" != "$1" ]] || continue
        other=$(<"$file")
        [[ "$other" =~ ^[0-9]+$ ]] && ((other > now)) || continue
        if ((other - walltime_s / 2 >= now + walltime_s / 4)); then
            candidate=$((other - walltime_s / 2))
        else
            candidate=$((other + walltime_s / 2))
        fi
        ((candidate < end)) && end=$candidate
    done
    echo "$end" >"$1"
    rmdir "$lock"
    echo "$end"
}

# Runs in the background, one per server: starts it, waits until it serves, and restarts it when it dies.
# A server that never served is not restarted: the launcher reports it and the block ends.
# `kill ... || true`: the server may exit between the check and the kill, and under `set -e` a failed kill would
# end the supervisor itself, leaving no state and no restart.
stopped_by_launcher() { # run in supervise (bash scoping: its port, server and attempt)
    kill "$server" 2>/dev/null || true
    write_state "$port" failed "$attempt" "stopped: the block did not start"
    exit 0
}

supervise() { # PORT COMMAND...
    local port=$1 attempt=0 delay=$backoff_s code server up served=0 load_deadline
    shift
    # The launcher stops supervisors only when the block's start failed.
    trap stopped_by_launcher TERM
    write_state "$port" starting 0 "loading"
    while true; do
        "$@" >>"$log_dir/vllm-$port.log" 2>&1 </dev/null &
        server=$!
        echo "$server" >"$log_dir/vllm-$port.pid"
        up=0
        load_deadline=$((SECONDS + timeout_s))
        while alive "$server"; do
            if ! alive "$owner"; then
                kill "$server" 2>/dev/null || true
                exit 0
            fi
            if ((up == 0)) && healthy "$port"; then
                up=1
                served=1
                write_state "$port" serving "$attempt" "healthy"
            elif ((up == 0 && attempt > 0 && SECONDS >= load_deadline)); then
                kill "$server" 2>/dev/null || true  # a restart that hangs counts as a failed attempt
            fi
            sleep "$poll_s"
        done
        code=0
        wait "$server" || code=$?
        trap 'exit 0' TERM  # the server has ended: a stop from here on must not overwrite the state written below
        if ((served == 0)); then
            # Never served: no restart, the launcher reports it and the block ends.
            write_state "$port" failed 0 "exited with status $code before it was healthy"
            exit 0
        fi
        if ((attempt >= max_restarts)); then
            write_state "$port" failed "$attempt" "exited with status $code; no restarts left"
            echo "launch_vllm: the server for port $port exited ($code) with no restarts left" >>"$log_dir/vllm-$port.log"
            # The endpoint starts a fresh block on demand, instead of this node answering 503 until its walltime.
            [[ -z "$block_pid" ]] || end_block
            exit 0
        fi
        attempt=$((attempt + 1))
        write_state "$port" restarting "$attempt" "exited with status $code; restarting in ${delay}s"
        echo "launch_vllm: the server for port $port exited ($code); restart $attempt of $max_restarts in ${delay}s" \
            >>"$log_dir/vllm-$port.log"
        owner_sleep "$delay" || exit 0
        trap stopped_by_launcher TERM
        delay=$((delay * 2 > 300 ? 300 : delay * 2))
    done
}

mkdir -p "$log_dir"
if [[ -n "$walltime_s" ]]; then
    mkdir -p "$shared_dir"
    end_file="$shared_dir/$(hostname)-$block_pid.end"
    end_at=$(plan_end "$end_file")
    echo "launch_vllm: this block ends at $(date -d "@$end_at" 2>/dev/null || echo "$end_at")"
    (
        trap 'exit 0' TERM
        trap 'rm -f "$end_file"' EXIT
        while (($(date +%s) < end_at)); do
            alive "$owner" || exit 0
            sleep "$poll_s"
        done
        end_block
    ) </dev/null >/dev/null 2>&1 &
fi
started=()
supervisors=()
for spec in "${specs[@]}"; do
    # Plain word splitting, never eval: a spec is data, not shell code.
    read -r -a words <<<"$spec"
    assignments=()
    while [[ ${#words[@]} -gt 0 && "${words[0]}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
        assignments+=("${words[0]}")
        words=("${words[@]:1}")
    done
    if [[ ${#words[@]} -lt 2 || ! "${words[1]}" =~ ^[0-9]+$ ]]; then
        echo "launch_vllm: bad spec (want [VAR=value ...] MODEL PORT [args...]): $spec" >&2
        exit 2
    fi
    model=${words[0]}
    port=${words[1]}
    if healthy "$port"; then
        echo "launch_vllm: port $port already serves; leaving it alone"
        continue
    fi
    echo "launch_vllm: starting $model on $host:$port"
    started+=("$port")
    : >"$log_dir/vllm-$port.log"
    rm -f "$log_dir/vllm-$port.pid" "$log_dir/vllm-$port.state"
    supervise "$port" env ${assignments[@]+"${assignments[@]}"} "${VLLM_BIN:-vllm}" serve "$model" \
        --host "$host" --port "$port" "${words[@]:2}" </dev/null >/dev/null 2>&1 &
    supervisors+=($!)
    echo $! >"$log_dir/vllm-$port.supervisor.pid"
done

# What a supervisor last wrote for PORT: starting, serving, restarting or failed.
state_of() {
    sed -n 's/^{"state": "\([a-z]*\)".*/\1/p' "$log_dir/vllm-$1.state" 2>/dev/null
}

deadline=$((SECONDS + timeout_s))
pending=(${started[@]+"${started[@]}"})
status=0
while [[ ${#pending[@]} -gt 0 ]]; do
    waiting=()
    for port in "${pending[@]}"; do
        case "$(state_of "$port")" in
            serving) echo "launch_vllm: port $port is healthy" ;;
            failed)
                echo "launch_vllm: the server for port $port exited" >&2
                log_tail "$port"
                status=1
                ;;
            *) waiting+=("$port") ;;
        esac
    done
    pending=(${waiting[@]+"${waiting[@]}"})
    [[ ${#pending[@]} -eq 0 || $status -ne 0 ]] && break
    if ((SECONDS >= deadline)); then
        for port in "${pending[@]}"; do
            echo "launch_vllm: port $port not healthy after ${timeout_s}s" >&2
            log_tail "$port"
        done
        status=1
        break
    fi
    sleep "$poll_s"
done

if ((status != 0)); then
    # The block is about to end: stop what was started here so no GPU stays held by a half-loaded server.
    echo "launch_vllm: stopping the servers started here" >&2
    for supervisor in ${supervisors[@]+"${supervisors[@]}"}; do
        kill -TERM "$supervisor" 2>/dev/null || true
    done
fi
exit "$status"
