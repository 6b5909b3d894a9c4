#!/bin/sh
# Container entrypoint. `docker run IMAGE` serves; `docker run IMAGE --device cuda` passes the flags to
# `bitfit serve`; any other command (`docker run IMAGE bitfit --help`) runs as given. exec keeps the server PID 1,
# so `docker stop` reaches it as SIGTERM and it shuts down cleanly.
set -eu

# Docker and compose secrets arrive as files; the server reads the token from the environment.
if [ -n "${BITFIT_ADMIN_TOKEN_FILE:-}" ]; then
  BITFIT_ADMIN_TOKEN=$(cat "$BITFIT_ADMIN_TOKEN_FILE")
  export BITFIT_ADMIN_TOKEN
fi

case "${1:-}" in
  -*) set -- bitfit serve "$@" ;;
esac

# A host folder bind-mounted on /data keeps its host owner; say how to fix that instead of failing deep inside.
if [ "${1:-}" = bitfit ] && [ "${2:-}" = serve ] && [ ! -w /data ]; then
  echo "bitfit: /data is not writable by uid $(id -u); give the store folder to it: chown -R $(id -u):$(id -g) DIR" >&2
  exit 1
fi

exec "$@"
