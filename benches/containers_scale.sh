#!/usr/bin/env bash
# Containers at scale under `kubefim watch --containers`: how long a new container takes to
# be watched, what each one costs the watcher in memory, whether start/stop churn leaks, how
# often image layers are read, and what watching a container costs its writes. One run:
#
#   images:    IMAGES images built here (no registry): a busybox base layer shared by all,
#              and a top layer of their own with CONF_FILES config files under /etc/app
#   start:     CONTAINERS containers of them (round-robin over the images), started one
#              after another while the watcher runs, each changing one of its image's files;
#              per container, the time from its first exec to its `container-watched` line
#              (`seconds_since_exec`), and the image records read vs taken from the cache
#   memory:    the watcher's VmRSS before the containers, with them all running (per
#              container), and every 50 of CYCLES start/stop cycles of one more container
#              (growth from the first cycle to the last)
#   overhead:  WRITES appends of a line to a monitored file inside one container, by its own
#              shell, timed with no watcher and with the watcher watching that container
#   latency:   LAT_SAMPLES appends to the container's monitored files (through its root, ~20 ms
#              apart): the write's close -> its `modified` line in the output (arrival time)
#
# Markdown tables go to stdout, progress to stderr. Run as root; it leaves no container or
# image behind.
#
# Usage: benches/containers_scale.sh
# Environment:
#   QUICK=1            10 containers of 4 images, 20 cycles, 2000 writes: a smoke test
#   IMAGES=N           images (default 20)
#   CONTAINERS=N       containers running at once (default 100)
#   CYCLES=N           start/stop cycles (default 200)
#   WRITES=N           appends of the overhead measurement (default 20000)
#   CONF_FILES=N       files in each image's /etc/app (default 50)
#   LAT_SAMPLES=N      latency probes (default 200)
#   KUBEFIM=PATH       the kubefim binary (default: target/release/kubefim, built if missing)
#
# Targets shown next to the results: container start to watched <= 1 s; each layer read once
# (records read = the distinct image files compared); 200 cycles leave RSS within 10 MB.
set -euo pipefail
export LC_ALL=C

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}
log() { printf '[containers_scale] %s\n' "$*" >&2; }
die() {
    printf 'containers_scale.sh: error: %s\n' "$*" >&2
    exit 1
}
case "${1:-}" in
    -h | --help) usage 0 ;;
    "") ;;
    *) usage 2 >&2 ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (podman containers and eBPF programs)"

if [ "${QUICK:-0}" = 1 ]; then
    IMAGES=${IMAGES:-4} CONTAINERS=${CONTAINERS:-10} CYCLES=${CYCLES:-20} WRITES=${WRITES:-2000}
    LAT_SAMPLES=${LAT_SAMPLES:-30}
fi
IMAGES=${IMAGES:-20}
CONTAINERS=${CONTAINERS:-100}
CYCLES=${CYCLES:-200}
WRITES=${WRITES:-20000}
CONF_FILES=${CONF_FILES:-50}
LAT_SAMPLES=${LAT_SAMPLES:-200}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUBEFIM=${KUBEFIM:-$REPO/target/release/kubefim}
if [ ! -x "$KUBEFIM" ]; then
    log "building $KUBEFIM"
    (cd "$REPO" && cargo build --release --locked -p kubefim >&2)
fi

TAG="kubefim-scale-$$"
WORK=$(mktemp -d /var/tmp/kubefim-containers-scale.XXXXXX)
WATCHER=
PODMAN=(podman --runtime /usr/sbin/runc --cgroup-manager cgroupfs)
podman_() { "${PODMAN[@]}" "$@"; }
run_args=(--ulimit nofile=1024:1024 --ulimit nproc=1000:1000)
cleanup() {
    [ -n "$WATCHER" ] && kill "$WATCHER" 2>/dev/null && wait "$WATCHER" 2>/dev/null
    podman_ ps -aq --filter "label=$TAG" | xargs -r "${PODMAN[@]}" rm -f -t 0 >/dev/null 2>&1 || true
    podman_ images -q --filter "reference=localhost/$TAG-*" | xargs -r "${PODMAN[@]}" rmi -f >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---- images -----------------------------------------------------------------------------
base="localhost/$TAG-base:latest"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || die "no busybox (scripts/setup.sh installs busybox-static)"
mkdir -p "$WORK/rootfs/bin" "$WORK/rootfs/etc" "$WORK/rootfs/tmp" "$WORK/rootfs/proc" "$WORK/rootfs/sys" "$WORK/rootfs/dev"
cp "$busybox" "$WORK/rootfs/bin/busybox"
for tool in sh echo cat mkdir seq sleep true; do ln -s busybox "$WORK/rootfs/bin/$tool"; done
tar -C "$WORK/rootfs" -c . | podman_ import - "$base" >/dev/null
log "building $IMAGES images of $CONF_FILES config files each"
for i in $(seq 1 "$IMAGES"); do
    podman_ run --name "$TAG-build-$i" --label "$TAG" "${run_args[@]}" "$base" /bin/sh -c \
        "mkdir -p /etc/app && for f in \$(seq 1 $CONF_FILES); do echo \"image $i file \$f\" > /etc/app/\$f.conf; done" >/dev/null
    podman_ commit -q "$TAG-build-$i" "localhost/$TAG-img$i:latest" >/dev/null
    podman_ rm -f "$TAG-build-$i" >/dev/null
done

# ---- the watcher ----------------------------------------------------------------------------
mkdir -p "$WORK/host" "$WORK/state"
echo host > "$WORK/host/host.conf"
cat > "$WORK/node.yaml" <<EOF
apiVersion: kubefim.io/v1alpha1
kind: FimPolicy
metadata: {name: scale}
spec:
  rules:
    - path: $WORK/host
EOF
cat > "$WORK/workload.yaml" <<EOF
apiVersion: kubefim.io/v1alpha1
kind: WorkloadFimPolicy
metadata: {name: scale}
spec:
  selector: {matchLabels: {bench: "$TAG"}}
  rules:
    - {path: /etc, diff: true}
EOF
"$KUBEFIM" keygen --out "$WORK/state" >/dev/null
"$KUBEFIM" baseline create --policy "$WORK/node.yaml" --db "$WORK/state/db" --key "$WORK/state/kubefim.key" >/dev/null 2>&1
OUT="$WORK/watch.jsonl"

start_watcher() {
    "$KUBEFIM" watch --db "$WORK/state/db" --pubkey "$WORK/state/kubefim.pub" --format jsonl \
        --ready-file "$WORK/ready" --containers --workload-policy "$WORK/workload.yaml" >"$OUT" 2>"$WORK/watch.err" &
    WATCHER=$!
    for _ in $(seq 1 600); do
        [ -e "$WORK/ready" ] && return 0
        kill -0 "$WATCHER" 2>/dev/null || die "the watcher exited: $(cat "$WORK/watch.err")"
        sleep 0.1
    done
    die "the watcher was not ready within 60 s"
}
stop_watcher() {
    kill "$WATCHER" && wait "$WATCHER" || true
    WATCHER=
    rm -f "$WORK/ready"
}
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$WATCHER/status"; }
# Waits until the output has N container-watched lines.
wait_watched() {
    local n=$1
    for _ in $(seq 1 1200); do
        [ "$(grep -c '"kind":"container-watched"' "$OUT" || true)" -ge "$n" ] && return 0
        sleep 0.1
    done
    die "only $(grep -c '"kind":"container-watched"' "$OUT") of $n containers watched after 120 s"
}
run_container() { # name image script
    podman_ run -d --name "$1" --label "$TAG" --annotation "bench=$TAG" "${run_args[@]}" "$2" /bin/sh -c "$3" >/dev/null
}

# ---- overhead: writes in a container, without and with the watcher -------------------------
writes_in() { # container: seconds for WRITES appends by its own shell
    local t0 t1
    t0=$(date +%s.%N)
    podman_ exec "$1" /bin/sh -c "i=0; while [ \$i -lt $WRITES ]; do echo \$i >> /etc/app/1.conf; i=\$((i+1)); done"
    t1=$(date +%s.%N)
    calc "$t1 - $t0"
}
log "overhead: $WRITES appends inside a container"
run_container "$TAG-ovh-a" "localhost/$TAG-img1:latest" "exec sleep 3600"
bare=$(writes_in "$TAG-ovh-a")
podman_ rm -f -t 0 "$TAG-ovh-a" >/dev/null
start_watcher
run_container "$TAG-ovh-b" "localhost/$TAG-img1:latest" "exec sleep 3600"
wait_watched 1
log "latency: $LAT_SAMPLES probes"
pid=$(podman_ inspect -f '{{.State.Pid}}' "$TAG-ovh-b")
latency=$(python3 - "$OUT" "/proc/$pid/root" "$LAT_SAMPLES" <<'PY'
import json, sys, time
out, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = open(out)
f.seek(0, 2)
lat, missed, part = [], 0, ""
for i in range(n):
    path = f"/etc/app/{i % 10 + 2}.conf"
    t0 = time.monotonic()
    with open(root + path, "a") as fh:
        fh.write(f"probe {i}\n")
    while True:
        part += f.readline()
        if not part.endswith("\n"):
            # Nothing new, or a line the watcher is still writing.
            if time.monotonic() - t0 > 5:
                missed += 1
                break
            time.sleep(0.0005)
            continue
        line, part = part, ""
        if json.loads(line).get("path") == path:
            lat.append(time.monotonic() - t0)
            break
    time.sleep(0.02)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
print(f"{p(0.5):.1f} {p(0.99):.1f} {lat[-1] * 1000:.1f} {missed}")
PY
)
watched=$(writes_in "$TAG-ovh-b")
sleep 1
reports=$(grep -c '"path":"/etc/app/1.conf"' "$OUT" || true)
podman_ rm -f -t 0 "$TAG-ovh-b" >/dev/null
stop_watcher

# ---- start: CONTAINERS containers ------------------------------------------------------------
start_watcher
sleep 1
rss0=$(rss_kb)
log "starting $CONTAINERS containers of $IMAGES images"
for c in $(seq 1 "$CONTAINERS"); do
    img=$(((c - 1) % IMAGES + 1))
    run_container "$TAG-c$c" "localhost/$TAG-img$img:latest" "echo changed >> /etc/app/$(((c - 1) % CONF_FILES + 1)).conf && exec sleep 3600"
done
wait_watched "$CONTAINERS"
sleep 2
rss1=$(rss_kb)
lat=$(grep '"kind":"container-watched"' "$OUT" | python3 -c '
import json, sys
v = sorted(json.loads(l)["seconds_since_exec"] for l in sys.stdin if json.loads(l)["found_by"] == "exec")
p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
print(f"{len(v)} {p(0.5):.3f} {p(0.95):.3f} {v[-1]:.3f}")')
records=$(grep '"kind":"container-watched"' "$OUT" | python3 -c '
import json, sys
r = c = 0
for l in sys.stdin:
    d = json.loads(l); r += d["image_records_read"]; c += d["image_records_cached"]
print(r, c)')
changes=$(grep -c '"kind":"modified"' "$OUT" || true)
log "removing them"
podman_ ps -aq --filter "label=$TAG" | xargs -r "${PODMAN[@]}" rm -f -t 0 >/dev/null

# ---- churn: CYCLES start/stop cycles -----------------------------------------------------------
log "$CYCLES start/stop cycles"
sleep 2
churn=()
for c in $(seq 1 "$CYCLES"); do
    img=$(((c - 1) % IMAGES + 1))
    run_container "$TAG-cycle" "localhost/$TAG-img$img:latest" "echo x >> /etc/app/1.conf"
    podman_ wait "$TAG-cycle" >/dev/null
    podman_ rm -f "$TAG-cycle" >/dev/null
    if [ "$c" = 1 ] || [ $((c % 50)) = 0 ] || [ "$c" = "$CYCLES" ]; then
        sleep 1
        churn+=("$c:$(rss_kb)")
    fi
done
gone=$(grep -c '"kind":"container-gone"' "$OUT" || true)
stop_watcher

# ---- tables ---------------------------------------------------------------------------------------
read -r n p50 p95 max <<<"$lat"
read -r lat50 lat99 latmax missed <<<"$latency"
read -r read cached <<<"$records"
per_container=$(calc "($rss1 - $rss0) / $CONTAINERS / 1024")
first=${churn[0]#*:}
last=${churn[-1]#*:}
cat <<EOF
### Containers at scale ($CONTAINERS containers of $IMAGES images, $(nproc) cores, $(uname -r))

| measure | result | target |
| --- | ---: | --- |
| container start (first exec) to watched, median / p95 / max of $n | $p50 s / $p95 s / $max s | <= 1 s |
| image records read from layers / taken from the cache | $read / $cached | read once per layer file |
| modified lines (one changed file per container) | $changes | $CONTAINERS |
| watcher RSS before / with $CONTAINERS containers | $((rss0 / 1024)) MB / $((rss1 / 1024)) MB | |
| memory per watched container | $(printf '%.2f' "$per_container") MB | |
| $WRITES appends inside a container: no watcher / watched | $(printf '%.2f' "$bare") s / $(printf '%.2f' "$watched") s ($(calc "$watched / $bare" | xargs printf '%.2f')x) | |
| reports of the appended file while watched | $reports | |
| change (close) to its line, median / p99 / max of $LAT_SAMPLES ($missed missed) | $lat50 ms / $lat99 ms / $latmax ms | p99 < 100 ms |

| start/stop cycle | watcher RSS |
| ---: | ---: |
EOF
for e in "${churn[@]}"; do printf '| %s | %.1f MB |\n' "${e%%:*}" "$(calc "${e#*:} / 1024")"; done
printf '\n%d cycles: RSS %+.1f MB from the first cycle to the last (target: within 10 MB); %d container-gone lines\n' \
    "$CYCLES" "$(calc "($last - $first) / 1024")" "$gone"
