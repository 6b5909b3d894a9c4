# shellcheck shell=bash
# A private Docker engine for checks on a machine with no Docker running: its own socket, data root, exec root and
# bridge, so it never touches a system Docker, and everything it made goes away with engine_stop. Source this file:
#
#   source docker/engine.sh
#   engine_install                 # apt-get install docker.io debootstrap, where missing
#   engine_start /tmp/some-dir     # exports DOCKER_HOST and DOCKER (the client command); returns once it answers
#   ...
#   engine_stop /tmp/some-dir      # stops dockerd (by PID), its containerd, unmounts, removes the bridge and the dir
#
# Published ports (-p 127.0.0.1:PORT:8000) go through docker-proxy on the loopback address; iptables is left alone,
# so nothing has to be undone in the host's firewall afterwards.

ENGINE_BRIDGE=${ENGINE_BRIDGE:-bitfitci0}      # at most 15 characters
ENGINE_SUBNET=${ENGINE_SUBNET:-172.31.250.1/24}
# The data root lives in memory: deleting an image's ~100k small files from this kind of disk takes minutes, and an
# unmount takes none. About 3 GB are used at the peak; 0 puts the data root on disk instead.
ENGINE_TMPFS_SIZE=${ENGINE_TMPFS_SIZE:-8g}

engine_install() {
  local missing=()
  command -v dockerd > /dev/null || missing+=(docker.io)
  command -v debootstrap > /dev/null || missing+=(debootstrap)
  command -v ip > /dev/null || missing+=(iproute2)
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "engine: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # docker.io's maintainer scripts try to start a system service; a policy-rc.d refusal there is harmless.
  local log rc=0
  log=$(mktemp /tmp/bitfit-engine-apt.XXXXXX)
  apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$log" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || tail -n 30 "$log" >&2
  rm -f "$log"
  return "$rc"
}

engine_start() {
  local dir=$1
  mkdir -p "$dir/data"
  if [ "$ENGINE_TMPFS_SIZE" != 0 ]; then mount -t tmpfs -o "size=$ENGINE_TMPFS_SIZE,mode=0711" tmpfs "$dir/data"; fi
  if ! ip link show "$ENGINE_BRIDGE" > /dev/null 2>&1; then
    ip link add "$ENGINE_BRIDGE" type bridge
    ip addr add "$ENGINE_SUBNET" dev "$ENGINE_BRIDGE"
    touch "$dir/bridge.ours"
  fi
  ip link set "$ENGINE_BRIDGE" up
  dockerd --host "unix://$dir/docker.sock" --data-root "$dir/data" --exec-root "$dir/exec" \
    --pidfile "$dir/dockerd.pid" --bridge "$ENGINE_BRIDGE" --iptables=false --ip-masq=false \
    --log-level warn > "$dir/dockerd.log" 2>&1 &
  echo $! > "$dir/dockerd.launched"
  export DOCKER_HOST="unix://$dir/docker.sock"
  # The client from the same package as the daemon: an API version they both speak.
  DOCKER=$([ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker)
  export DOCKER
  for _ in $(seq 1 60); do
    if $DOCKER version > /dev/null 2>&1; then
      echo "engine: dockerd $($DOCKER version --format '{{.Server.Version}}') up, pid $(cat "$dir/dockerd.launched"), socket $dir/docker.sock"
      return 0
    fi
    kill -0 "$(cat "$dir/dockerd.launched")" 2> /dev/null || break
    sleep 1
  done
  echo "engine: dockerd did not come up; its log:" >&2
  tail -n 30 "$dir/dockerd.log" >&2
  return 1
}

# Safe to call more than once and after a half-finished start.
engine_stop() {
  local dir=$1 pid m t0=$SECONDS
  [ -d "$dir" ] || return 0
  pid=$(cat "$dir/dockerd.launched" 2> /dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 30); do kill -0 "$pid" 2> /dev/null || break; sleep 1; done
    kill -0 "$pid" 2> /dev/null && { echo "engine: dockerd $pid ignored SIGTERM, killing it" >&2; kill -KILL "$pid"; }
    wait "$pid" 2> /dev/null || true
    echo "engine: dockerd $pid stopped after $((SECONDS - t0)) s"
  fi
  # dockerd stops the containerd it launched; after a SIGKILL that one is left behind.
  pid=$(cat "$dir/exec/containerd/containerd.pid" 2> /dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2> /dev/null; then kill -TERM "$pid"; sleep 2; kill -KILL "$pid" 2> /dev/null || true; fi
  # Overlay, shm and netns mounts under the data and exec roots, deepest first.
  awk -v d="$dir" '$2 ~ "^"d {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
  if [ -e "$dir/bridge.ours" ]; then ip link delete "$ENGINE_BRIDGE" 2> /dev/null || true; fi
  rm -rf "$dir"
  echo "engine: stopped and removed $dir in $((SECONDS - t0)) s"
}
