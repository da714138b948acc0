#!/bin/bash
# The container check (outside the default test suite; `make test-container`): build the Dockerfile with the
# engine this machine has, start the image, and check what the README promises:
#   1. JupyterLab prints its URL with a token (and refuses requests without it)
#   2. the labs are writable, and a learner's change survives a restart on the documented volume
#   3. no solutions/ in the learners' image
#   4. `workshop check` passes inside, MPI included (the container gets --shm-size=1g)
# It says what it could not do (no engine, no pullable base image, no runtime able to start a container) and
# how it did it instead. Run from the course's root directory, as root for the fallbacks. Takes 5-15 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-dl-at-scale-check}
BASE=$(sed -n 's/^FROM \([^ ]*\) AS base$/\1/p' Dockerfile)
WORK=$(mktemp -d /tmp/container-check.XXXXXX)
PASS=0; FAIL=0; NOTES=()
ok()   { echo "PASS: $*"; PASS=$((PASS + 1)); }
bad()  { echo "FAIL: $*"; FAIL=$((FAIL + 1)); }
note() { echo "NOTE: $*"; NOTES+=("$*"); }
SERVER_PID=""
stop_server() {  # SIGKILL to the namespace's PID 1 ends everything inside; unshare then exits by itself
    [ -n "$SERVER_PID" ] || return 0
    kill -9 $(cat "/proc/$SERVER_PID/task/$SERVER_PID/children" 2>/dev/null) 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
}
cleanup() {
    stop_server
    [ -n "${MOUNTED:-}" ] && buildah umount "$CONTAINER" >/dev/null 2>&1
    if [ -n "${CONTAINER:-}" ]; then  # the namespaces' last processes may still hold its root for a moment
        for _ in 1 2 3 4 5; do buildah rm "$CONTAINER" >/dev/null 2>&1 && break; sleep 2; done
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# -- 1. an engine ----------------------------------------------------------------------------------------
ENGINE=""
if docker info >/dev/null 2>&1; then ENGINE=docker
elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then ENGINE=podman
elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
fi
if [ -z "$ENGINE" ]; then
    echo "SKIP: no docker daemon, podman or buildah here (Debian: apt-get install buildah)"; exit 0
fi
echo "engine: $ENGINE"
if [ "$ENGINE" = docker ]; then
    # a machine with a working Docker: the real thing, nothing emulated
    docker build -t "$IMAGE" . || { bad "docker build"; exit 1; }
    docker volume rm -f dl-labs-check >/dev/null
    run() { docker run --rm -d --shm-size=1g -p 127.0.0.1:18888:8888 -v dl-labs-check:/home/learner/workshop/labs "$IMAGE"; }
    CID=$(run); sleep 15
    docker logs "$CID" 2>&1 | grep -q 'lab?token=[0-9a-f]\{32,\}' && ok "the log shows the URL with its token" || bad "no token in the log"
    docker exec "$CID" sh -c 'test ! -e solutions && ! find / -xdev -name "*.ipynb" -path "*solutions*" 2>/dev/null | grep -q .' \
        && ok "no solutions in the image" || bad "solutions found in the image"
    docker exec "$CID" sh -c 'echo kept > labs/learner-note.txt' && ok "labs/ is writable" || bad "labs/ is not writable"
    docker exec "$CID" workshop check && ok "workshop check passes inside" || bad "workshop check fails inside"
    docker stop "$CID" >/dev/null; CID=$(run); sleep 5
    docker exec "$CID" cat labs/learner-note.txt 2>/dev/null | grep -q kept && ok "the learner's file survived a restart on the volume" \
        || bad "the learner's file was lost"
    docker stop "$CID" >/dev/null; docker volume rm -f dl-labs-check >/dev/null
    echo "$PASS passed, $FAIL failed"; [ "$FAIL" = 0 ]; exit
fi
[ "$(id -u)" = 0 ] || { echo "SKIP: buildah without a daemon needs root here"; exit 0; }
export STORAGE_DRIVER=vfs  # overlay needs kernel support this kind of host may lack; vfs always works

# -- 2. the base image -------------------------------------------------------------------------------------
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1 && ! buildah pull --quiet "docker.io/library/$BASE" >/dev/null 2>&1; then
    note "the base image $BASE cannot be pulled here: building a stand-in of the same name from Debian's packages"
    note "(debootstrap minbase bookworm, Debian's Python 3.11 as a venv at /usr/local, this host's CA bundle as PIP_CERT)"
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    ROOTFS=$WORK/base
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" \
        http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 || { bad "debootstrap (see $WORK/debootstrap.log)"; tail "$WORK/debootstrap.log"; exit 1; }
    chroot "$ROOTFS" python3 -m venv /usr/local
    CA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    cp "$CA" "$ROOTFS/usr/local/share/host-ca.crt"
    CTR=$(buildah from scratch)
    MNT=$(buildah mount "$CTR"); cp -a "$ROOTFS/." "$MNT/"; buildah umount "$CTR" >/dev/null
    buildah config --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env PIP_CERT=/usr/local/share/host-ca.crt \
        --env SSL_CERT_FILE=/usr/local/share/host-ca.crt --cmd python3 "$CTR"
    buildah commit --quiet "$CTR" "$BASE" >/dev/null && buildah rm "$CTR" >/dev/null
fi

# -- 3. build -------------------------------------------------------------------------------------------------
START=$(date +%s)
if buildah bud --pull=never --isolation chroot --layers -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    ok "the Dockerfile builds with buildah in $(( $(date +%s) - START )) s"
else
    bad "buildah bud failed:"; tail -20 "$WORK/build.log"; exit 1
fi
# buildah 1.28 leaves a working container behind for a last stage without instructions (FROM runtime AS learner)
for leftover in $(buildah containers --quiet --filter "ancestor=$IMAGE" 2>/dev/null); do buildah rm "$leftover" >/dev/null; done

# -- 4. start it -----------------------------------------------------------------------------------------------
# Try a real run first; hosts without CAP_SYS_RESOURCE (crun/runc: setrlimit RLIMIT_NOFILE) cannot, and then
# `docker run --shm-size=1g -v VOLUME:labs` is reproduced on the image's root file system: its own mount, PID
# and IPC namespaces, a private 1 GB /dev/shm, the image's user, ENV, WORKDIR, ENTRYPOINT (tini) and CMD.
if command -v podman >/dev/null && timeout 60 podman run --rm "$IMAGE" true >/dev/null 2>&1; then
    note "podman can start containers here, but this script emulates the run in both cases (one code path)"
else
    note "no OCI runtime can start a container on this host: the run is reproduced with unshare + chroot"
fi
CONTAINER=$(buildah from --pull=never "$IMAGE")
ROOT=$(buildah mount "$CONTAINER"); MOUNTED=1
CONFIG=$(buildah inspect --type image "$IMAGE")
USER_NAME=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["OCIv1"]["config"].get("User","root"))' <<<"$CONFIG")
WORKDIR=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["OCIv1"]["config"].get("WorkingDir","/"))' <<<"$CONFIG")
ENVS=$(python3 -c 'import json,sys,shlex; print(" ".join(shlex.quote(e) for e in json.load(sys.stdin)["OCIv1"]["config"].get("Env",[])))' <<<"$CONFIG")
ARGV=$(python3 -c 'import json,sys,shlex; c=json.load(sys.stdin)["OCIv1"]["config"]; print(" ".join(shlex.quote(a) for a in (c.get("Entrypoint") or [])+(c.get("Cmd") or [])))' <<<"$CONFIG")
UID_GID=$(chroot "$ROOT" id -u "$USER_NAME"):$(chroot "$ROOT" id -g "$USER_NAME")
# the named volume: Docker fills an empty one from the image's folder on first use, then keeps it
VOLUME=$WORK/volume; mkdir -p "$VOLUME"; cp -a "$ROOT$WORKDIR/labs/." "$VOLUME/"
cat >"$WORK/enter.sh" <<EOF
#!/bin/bash
# runs inside new mount, PID, IPC, UTS and network namespaces, as root, then becomes the container's user
set -e
mount --make-rprivate /
ip link set lo up
mkdir -p "$ROOT/proc" "$ROOT/dev/shm"
mount -t proc proc "$ROOT/proc"
mount -t tmpfs -o size=1g shm "$ROOT/dev/shm"
mount --bind "$VOLUME" "$ROOT$WORKDIR/labs"
exec chroot --userspec=$UID_GID "$ROOT" env -i HOME=/home/$USER_NAME $ENVS sh -c 'cd $WORKDIR && exec "\$@"' sh "\$@"
EOF
in_container() { unshare --mount --pid --ipc --uts --net --fork bash "$WORK/enter.sh" "$@"; }
serve() {
    # unshare itself in the background (not a function's subshell), so that $! is the process to kill
    unshare --mount --pid --ipc --uts --net --fork bash "$WORK/enter.sh" sh -c "exec $ARGV" \
        >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 120); do grep -q 'lab?token=' "$WORK/server.log" && break; sleep 1; done
}
serve
if grep -q 'lab?token=[0-9a-f]\{32,\}' "$WORK/server.log"; then
    ok "JupyterLab prints its URL with the token: $(grep -o 'http://127.0.0.1:8888/lab?token=[0-9a-f]*' "$WORK/server.log" | head -1 | sed 's/token=\(....\).*/token=\1.../')"
else
    bad "no URL with a token in the log:"; tail -5 "$WORK/server.log"
fi
grep -q 'tini' <<<"$ARGV" && ok "tini is the entrypoint (PID 1)" || bad "tini is not the entrypoint"
if [ -z "$(find "$ROOT" -xdev -path "$ROOT/proc" -prune -o -type d -name solutions -print 2>/dev/null)" ] \
   && ! grep -rl --include='*.ipynb' 'BEGIN SOLUTION' "$ROOT$WORKDIR" >/dev/null 2>&1; then
    ok "no solutions/ folder and no solution block in any notebook of the image"
else
    bad "solutions found in the learners' image"
fi
in_container sh -c 'echo kept > labs/learner-note.txt && mkdir -p labs/runs' && ok "labs/ is writable by the learner" \
    || bad "labs/ is not writable by the learner"
in_container sh -c 'cd labs && python scripts/mpi_hello.py' >"$WORK/hello.log" 2>&1 && ok "a lab script runs in labs/" \
    || { bad "a lab script fails in labs/"; tail -3 "$WORK/hello.log"; }
if in_container workshop check >"$WORK/check.log" 2>&1; then
    ok "workshop check passes inside (MPI included): $(grep -E '^/dev/shm' "$WORK/check.log" | tr -s ' ')"
else
    bad "workshop check fails inside:"; tail -8 "$WORK/check.log"
fi
stop_server
serve  # a new container on the same volume
in_container cat labs/learner-note.txt 2>/dev/null | grep -q kept && ok "the learner's work survives a new container on the volume" \
    || bad "the learner's work was lost"
stop_server
buildah umount "$CONTAINER" >/dev/null && MOUNTED=""
buildah rm "$CONTAINER" >/dev/null && CONTAINER="" || note "buildah rm $CONTAINER failed: remove it by hand"
echo
echo "$PASS passed, $FAIL failed; engine $ENGINE, base $BASE"
for n in "${NOTES[@]}"; do echo "  not as on a learner's machine: $n"; done
[ "$FAIL" = 0 ]
