#!/usr/bin/env bash
# Start one or more vLLM servers on this node, each on its own port, and wait until each answers /health.
# Meant for an endpoint's worker_init, so that workers start only once the models can serve.
#
# Usage: launch_vllm.sh [-f MODELS_FILE] [-m SPEC]... [-l LOG_DIR] [-H HOST] [-t TIMEOUT_S] [-i POLL_S]
#   SPEC        [VAR=value ...] MODEL PORT [vllm serve arguments...]
#               e.g. "CUDA_VISIBLE_DEVICES=0,1 meta-llama/Llama-3.1-8B-Instruct 8000 --tensor-parallel-size 2"
#   -f FILE     one SPEC per line; blank lines and lines starting with # are skipped
#   -m SPEC     a SPEC on the command line (repeatable)
#   -l LOG_DIR  where vllm-PORT.log and vllm-PORT.pid go (default: ./vllm-logs)
#   -H HOST     interface vLLM binds (default: 127.0.0.1, reachable only by workers on this node)
#   -t SECONDS  how long to wait for all servers together (default: 1800; big models load slowly)
#   -i SECONDS  health poll interval (default: 5)
# Environment: VLLM_BIN, the vLLM command (default: vllm), e.g. a wrapper that runs it in a container.
# A port that already answers /health is left alone, so re-running on a warm node is harmless.
# Exit status: 0 all healthy; 1 a server exited or was not healthy in time (log tails are printed; a
# slow server is left running); 2 bad usage.
set -euo pipefail

log_dir=./vllm-logs
host=127.0.0.1
timeout_s=1800
poll_s=5
specs=()

usage() {
    sed -n '2,18s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

while getopts "f:m:l:H:t:i:h" option; do
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
        *) usage ;;
    esac
done
[[ ${#specs[@]} -gt 0 ]] || usage

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

mkdir -p "$log_dir"
ports=()
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
    ports+=("$port")
    if healthy "$port"; then
        echo "launch_vllm: port $port already serves; leaving it alone"
        continue
    fi
    echo "launch_vllm: starting $model on $host:$port"
    nohup env ${assignments[@]+"${assignments[@]}"} "${VLLM_BIN:-vllm}" serve "$model" \
        --host "$host" --port "$port" "${words[@]:2}" \
        >"$log_dir/vllm-$port.log" 2>&1 </dev/null &
    echo $! >"$log_dir/vllm-$port.pid"
done

deadline=$((SECONDS + timeout_s))
pending=("${ports[@]}")
status=0
while [[ ${#pending[@]} -gt 0 ]]; do
    waiting=()
    for port in "${pending[@]}"; do
        if healthy "$port"; then
            echo "launch_vllm: port $port is healthy"
        elif [[ -f "$log_dir/vllm-$port.pid" ]] && ! kill -0 "$(cat "$log_dir/vllm-$port.pid")" 2>/dev/null; then
            echo "launch_vllm: the server for port $port exited" >&2
            log_tail "$port"
            status=1
        else
            waiting+=("$port")
        fi
    done
    pending=(${waiting[@]+"${waiting[@]}"})
    [[ ${#pending[@]} -eq 0 ]] && break
    if ((SECONDS >= deadline)); then
        for port in "${pending[@]}"; do
            echo "launch_vllm: port $port not healthy after ${timeout_s}s; leaving it to finish loading" >&2
            log_tail "$port"
        done
        status=1
        break
    fi
    sleep "$poll_s"
done
exit "$status"
