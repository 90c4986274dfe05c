#!/usr/bin/env bash
# `make demo`: migrate, seed the demo clusters + endpoints, create a demo API key, then run the fake
# model server and the gateway (gunicorn + uvicorn worker) on 127.0.0.1 until Ctrl-C.
# `demo-model` goes to the model server directly; `demo-model-hpc` runs through the `local` backend: the
# compute function that runs on cluster nodes, in a local process pool, streaming back through the relay.
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_PORT="${GATEWAY_PORT:-8000}"
MODEL_PORT="${MODEL_PORT:-8001}"
SECOND_MODEL_PORT="${SECOND_MODEL_PORT:-8002}"
COLD_MODEL_PORT="${COLD_MODEL_PORT:-8003}"
BASE_URL="http://127.0.0.1:${GATEWAY_PORT}/resource_server/v1"
# Where compute functions send stream chunks: this gateway itself.
export RELAY_PUBLIC_URL="${RELAY_PUBLIC_URL:-http://127.0.0.1:${GATEWAY_PORT}}"

# Cluster demo-b's batch jobs come from a fake PBS (fakes/scheduler) reading this scenario file; it starts
# with no job. States are checked every 2 s here (30 s by default), so a person sees changes promptly.
mkdir -p var
export FAKE_SCHEDULER_STATE="${FAKE_SCHEDULER_STATE:-$PWD/var/demo-scheduler.json}"
python -c "from fakes.scheduler.scenario import Scenario; Scenario(server='demo-pbs').write(__import__('pathlib').Path('$FAKE_SCHEDULER_STATE'))"
export HEALTH_PROBE_SECONDS="${HEALTH_PROBE_SECONDS:-2}"

python manage.py migrate --verbosity 0
python manage.py seed_demo --model-url "http://127.0.0.1:${MODEL_PORT}/v1" \
  --second-model-url "http://127.0.0.1:${SECOND_MODEL_PORT}/v1" \
  --scheduler-commands "$PWD/fakes/scheduler" --cold-model-url "http://127.0.0.1:${COLD_MODEL_PORT}/v1"
KEY="$(python manage.py create_api_key --user demo@example.org --name demo 2>/dev/null)"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; echo "Stopped."; }
trap cleanup EXIT INT TERM

# The fakes are not installed with the product: `python -m` finds fakes/ here, at the repository root.
python -m fakes.model_server --port "$MODEL_PORT" --model demo-model --model demo-model-hpc \
  --ttft 0.05 --tokens-per-second 40 &
pids+=($!)
python -m fakes.model_server --port "$SECOND_MODEL_PORT" --model demo-model --ttft 0.05 --tokens-per-second 40 &
pids+=($!)
gunicorn -c deploy/gunicorn.conf.py --bind "127.0.0.1:${GATEWAY_PORT}" --workers 1 &
pids+=($!)

for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:${GATEWAY_PORT}/resource_server/health" >/dev/null && break
  sleep 0.1
done

cat <<MSG

The gateway is running at ${BASE_URL}  (admin: http://127.0.0.1:${GATEWAY_PORT}/admin/ after
'python manage.py createsuperuser'; API docs: http://127.0.0.1:${GATEWAY_PORT}/resource_server/docs)

Your demo API key (shown once):  ${KEY}

Try it with curl:

  curl ${BASE_URL}/chat/completions \\
    -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \\
    -d '{"model": "demo-model", "messages": [{"role": "user", "content": "Hello!"}]}'

or with the OpenAI Python client (.venv/bin/python):

  from openai import OpenAI
  client = OpenAI(base_url="${BASE_URL}", api_key="${KEY}")
  reply = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "Hello!"}])
  print(reply.choices[0].message.content)
  for chunk in client.chat.completions.create(model="demo-model", stream=True,
                                              messages=[{"role": "user", "content": "Tell me more"}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

The same through the HPC path (the compute function run by the \`local\` backend, streamed via the relay):

  for chunk in client.chat.completions.create(model="demo-model-hpc", stream=True,
                                              messages=[{"role": "user", "content": "Tell me more"}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)

  (or FIRST's path: base_url="http://127.0.0.1:${GATEWAY_PORT}/resource_server/local-hpc/vllm/v1")

Two clusters serve demo-model (demo, demo-b): each answer's X-Gateway-Route header says which was chosen
and why (curl -i). Stop one model server and the next request goes to the other, with no error.

A cold model: demo-model-big runs only as batch job demo-big on demo-b's (fake) PBS, and no job runs:

  curl -i ${BASE_URL}/chat/completions -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \
    -d '{"model": "demo-model-big", "messages": [{"role": "user", "content": "Hi"}]}'     # 503 model_offline

In another terminal, start its job and watch it go queued -> starting -> live:

  .venv/bin/python -m fakes.demo_cold_start --state ${FAKE_SCHEDULER_STATE}

and meanwhile: curl ${BASE_URL}/models -H "Authorization: Bearer ${KEY}"
               curl http://127.0.0.1:${GATEWAY_PORT}/resource_server/demo-b/jobs -H "Authorization: Bearer ${KEY}"
               a request that waits for the model, printing its progress:
  curl -N ${BASE_URL}/chat/completions -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \
    -H "X-Gateway-Max-Wait: 120" -d '{"model": "demo-model-big", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'

Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
