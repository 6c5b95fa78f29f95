#!/usr/bin/env bash
# What kubefim watch's eBPF programs cost work they do not monitor (issue 13). A release
# `kubefim watch` on a 100-file tree; workloads on files outside it. Prints, as Markdown:
# - per program the watcher loaded: runs and ns per run (run_time_ns / run_cnt of `bpftool
#   prog show`, kernel.bpf_stats_enabled=1) over 400k 64-byte write()s and 100k
#   open/write/close cycles, median of RUNS runs; and the floor: an empty program
#   (bpftrace) on sys_enter_write under the same writes (bpftrace 0.17 has no raw
#   tracepoints);
# - each workload's wall and CPU (user + sys) seconds with and without the watcher, runs
#   interleaved, medians. CPU is the steadier of the two on a shared machine.
# Usage: sudo [RUNS=5] [KUBEFIM=target/release/kubefim] scripts/hook_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
BIN="${KUBEFIM:-target/release/kubefim}"
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release -p kubefim" >&2; exit 2; }
TMP="$(mktemp -d "${TMPDIR:-/var/tmp}/kubefim-hook-cost.XXXXXX")"
STATS_WAS="$(sysctl -n kernel.bpf_stats_enabled)"
WATCH_PID=""
cleanup() {
    [ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null && wait "$WATCH_PID" 2>/dev/null
    sysctl -qw kernel.bpf_stats_enabled="$STATS_WAS"
    rm -rf -- "$TMP"
}
trap cleanup EXIT
sysctl -qw kernel.bpf_stats_enabled=1

# The workloads. perl's syswrite is one write(2); its open(">>") is openat + lseek.
writes() { perl -e 'open(my $f, ">>", $ARGV[0]) or die; my $b = "x" x 63 . "\n"; syswrite($f, $b) for 1..400000' "$TMP/w/file"; }
cycles() { perl -e 'my $b = "x" x 63 . "\n"; for my $i (1..100000) { open(my $f, ">>", "$ARGV[0]/f" . $i % 200) or die; syswrite($f, $b); close($f) }' "$TMP/w"; }
untar() { rm -rf "$TMP/x" && mkdir "$TMP/x" && tar -xf "$TMP/t.tar" -C "$TMP/x"; }
mkdir -p "$TMP/tree" "$TMP/w" "$TMP/src"
for i in $(seq 100); do echo "$i" >"$TMP/tree/f$i"; done
# 4,000 files of 4 KiB in 40 directories (16 MB): tar -x does open/write/close, mkdir, utimensat.
for d in $(seq 40); do mkdir "$TMP/src/d$d"; for i in $(seq 100); do head -c 4096 /dev/urandom >"$TMP/src/d$d/f$i"; done; done
tar -cf "$TMP/t.tar" -C "$TMP/src" .
printf 'apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: cost}\nspec:\n  rules:\n    - path: "%s"\n' "$TMP/tree" >"$TMP/p.yaml"
"$BIN" keygen --out "$TMP/k" >/dev/null
"$BIN" baseline create --policy "$TMP/p.yaml" --db "$TMP/db" --key "$TMP/k/kubefim.key" >/dev/null

start_watch() {
    rm -rf "$TMP/ready" "$TMP/journal"
    "$BIN" watch --db "$TMP/db" --pubkey "$TMP/k/kubefim.pub" --format jsonl --ready-file "$TMP/ready" \
        --journal "$TMP/journal" >"$TMP/events" 2>"$TMP/watch.err" &
    WATCH_PID=$!
    until [ -e "$TMP/ready" ]; do kill -0 "$WATCH_PID" || { cat "$TMP/watch.err" >&2; exit 1; }; sleep 0.1; done
}
stop_watch() { kill "$WATCH_PID"; wait "$WATCH_PID" || true; WATCH_PID=""; }
# progs PID: the ids of the programs PID holds a descriptor of, as a JSON array (bpftool's
# own pid column needs a bpftool built with skeletons).
progs() { cat /proc/"$1"/fdinfo/* 2>/dev/null | awk '$1 == "prog_id:" { print $2 }' | sort -un | jq -sc .; }
# stats PID: "name run_time_ns run_cnt" of every program PID holds.
stats() { bpftool -j prog show | jq -r --argjson ids "$(progs "$1")" '.[] | select(.id as $i | $ids | index($i)) | "\(.name) \(.run_time_ns // 0) \(.run_cnt // 0)"' | sort; }
# delta BEFORE AFTER: "name runs ns_per_run" for programs that ran.
delta() { join <(echo "$1") <(echo "$2") | awk '$5 > $3 { printf "%s %d %.0f\n", $1, $5 - $3, ($4 - $2) / ($5 - $3) }'; }
# timed NAME MODE CMD: appends "NAME MODE wall cpu" to $TMP/times.
timed() { local n="$1" m="$2"; shift 2; /usr/bin/time -f "$n $m %e %U %S" -a -o "$TMP/times.raw" "$@"; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
export -f writes cycles untar; export TMP

: >"$TMP/hooks"
for r in $(seq "$RUNS"); do
    echo "run $r of $RUNS" >&2
    # Half the runs measure with the watcher first, half without: drift hits both alike.
    order="watch none"; [ $((r % 2)) -eq 0 ] && order="none watch"
    for mode in $order; do
        [ "$mode" = watch ] && start_watch
        for w in writes cycles untar; do timed "$w" "$mode" bash -c "$w"; done
        if [ "$mode" = watch ]; then
            before="$(stats "$WATCH_PID")"; writes; cycles; delta "$before" "$(stats "$WATCH_PID")" >>"$TMP/hooks"
            stop_watch
        fi
    done
    for probe in 'tracepoint:syscalls:sys_enter_write'; do
        bpftrace -e "$probe {}" >/dev/null 2>&1 & bt=$!
        until [ "$(progs "$bt")" != "[]" ]; do kill -0 "$bt"; sleep 0.2; done
        before="$(stats "$bt")"; writes; delta "$before" "$(stats "$bt")" | sed "s|^[^ ]*|empty:${probe#*:}|" >>"$TMP/hooks"
        kill "$bt"; wait "$bt" || true
    done
done

echo "| program | runs (median) | ns per run (median of $RUNS) |"
echo "| --- | ---: | ---: |"
for p in $(awk '{ print $1 }' "$TMP/hooks" | sort -u); do
    runs="$(awk -v p="$p" '$1 == p { print $2 }' "$TMP/hooks" | median)"
    ns="$(awk -v p="$p" '$1 == p { print $3 }' "$TMP/hooks" | median)"
    echo "$ns $p $runs"
done | sort -rn | awk '{ printf "| %s | %s | %s |\n", $2, $3, $1 }'
echo
echo "| workload | wall s, none | wall s, watcher | wall | CPU s, none | CPU s, watcher | CPU |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for w in writes cycles untar; do
    col() { awk -v w="$w" -v m="$1" -v f="$2" '$1 == w && $2 == m { print (f == "wall" ? $3 : $4 + $5) }' "$TMP/times.raw" | median; }
    wn="$(col none wall)" ww="$(col watch wall)" cn="$(col none cpu)" cw="$(col watch cpu)"
    awk -v w="$w" -v wn="$wn" -v ww="$ww" -v cn="$cn" -v cw="$cw" \
        'BEGIN { printf "| %s | %.2f | %.2f | %+.1f%% | %.2f | %.2f | %+.1f%% |\n", w, wn, ww, 100 * (ww / wn - 1), cn, cw, 100 * (cw / cn - 1) }'
done
