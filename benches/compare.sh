#!/usr/bin/env bash
# Side-by-side benchmark of kubefim against its peers on one directory tree, in one run:
#
#   create:  kubefim baseline create  vs  find | xargs -P b3sum  vs  aide --init
#   verify:  kubefim verify           vs  find | xargs -P b3sum  vs  aide --check
#
# Every command runs RUNS times (default 3), round-robin so that drift hits all tools alike,
# on a warm page cache (one untimed pass of each tool first); wall seconds and peak RSS
# (GNU time) are reported, median of the runs, as a Markdown table on stdout. Progress and
# diagnostics go to stderr. Run as root (scripts/setup.sh installs b3sum, aide and time).
#
# Usage: benches/compare.sh [TREE]        TREE defaults to /usr
# Environment:
#   RUNS=N            timed runs per command (default 3)
#   KUBEFIM=PATH      the kubefim binary (default: target/release/kubefim of this
#                     repository, built with `cargo build --release` if missing)
#   AIDE_WORKERS=N    aide's num_workers (default: nproc, the same parallelism as the others)
#   TMPDIR=DIR        where the databases are written (default /var/tmp); must be outside TREE
#
# What is compared (see benches/README.md for why):
# - kubefim: one rule over TREE with the default attributes (type, content = BLAKE3, size,
#   mode, uid, gid, mtime, ctime, inode, nlink, link_target, xattrs), signed baseline.
# - b3sum: BLAKE3 of every regular file, nothing recorded: the floor for hashing the tree.
# - aide: the same metadata as kubefim with one hash, sha256 (aide has no BLAKE3).
set -euo pipefail
export LC_ALL=C # decimal points and byte-order sorting, whatever the user's locale

usage() {
    local code="${1:-0}"
    if [ "$code" -eq 0 ]; then exec 3>&1; else exec 3>&2; fi
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&3
    exit "$code"
}
log() { printf '[compare] %s\n' "$*" >&2; }
die() {
    printf 'compare.sh: error: %s\n' "$*" >&2
    exit 1
}
# keep_tmp: leave the temp dir for inspection (after a tool failed) instead of removing it.
keep_tmp() { trap - EXIT; }

case "${1:-}" in
    -h | --help) usage 0 ;;
    -*) printf 'compare.sh: unknown option %s\n\n' "$1" >&2; usage 2 ;;
esac
[ "$#" -le 1 ] || { printf 'compare.sh: at most one argument (the tree)\n\n' >&2; usage 2; }

# The exact command line, with the environment that changes what is measured.
CMDLINE="$(printf '%q ' "$0" "$@")"
CMDLINE="${CMDLINE% }"
for var in RUNS KUBEFIM AIDE_WORKERS TMPDIR; do
    if [ -n "${!var:-}" ]; then CMDLINE="$var=$(printf '%q' "${!var}") $CMDLINE"; fi
done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"
RUNS="${RUNS:-3}"
JOBS="$(nproc)"
AIDE_WORKERS="${AIDE_WORKERS:-$JOBS}"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"
[[ "$AIDE_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "AIDE_WORKERS must be a positive integer, not '$AIDE_WORKERS'"

# ------------------------------------------------------------------------ preconditions --
[ -n "${EPOCHREALTIME:-}" ] || die "bash >= 5.0 is needed (for \$EPOCHREALTIME)"
[ "$(id -u)" -eq 0 ] || die "run as root: every tool must be able to read every file of the tree"

missing=()
for tool in b3sum aide find xargs realpath awk sort; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
# The shell keyword `time` cannot report peak RSS: GNU time is needed.
/usr/bin/time --version 2>&1 | grep -q GNU || missing+=("/usr/bin/time (GNU time)")
if [ "${#missing[@]}" -gt 0 ]; then
    die "missing: ${missing[*]}. Run scripts/setup.sh (as root) first; it installs b3sum, aide and time."
fi

TREE="$(realpath -e -- "${1:-/usr}" 2>/dev/null)" || die "tree '${1:-/usr}' does not exist"
[ -d "$TREE" ] || die "tree '$TREE' is not a directory"
[ "$TREE" != / ] || die "the tree cannot be / (the tools would scan their own databases); pick a directory"
# The tree goes into aide.conf as a regular expression and into the policy as a YAML string.
case "$TREE" in
    *[[:space:]%\"\\]*) die "tree path '$TREE' has whitespace, %, \" or \\: not supported by this script" ;;
esac

if [ -n "${KUBEFIM:-}" ]; then
    KUBEFIM_BIN="$(realpath -e -- "$KUBEFIM" 2>/dev/null)" || die "KUBEFIM=$KUBEFIM does not exist"
    [ -x "$KUBEFIM_BIN" ] || die "KUBEFIM=$KUBEFIM is not executable"
else
    KUBEFIM_BIN="$REPO/target/release/kubefim"
    if [ ! -x "$KUBEFIM_BIN" ]; then
        log "no $KUBEFIM_BIN: building it (cargo build --release)"
        export PATH="$HOME/.cargo/bin:$PATH"
        command -v cargo >/dev/null || die "cargo not found: install Rust, or set KUBEFIM to a kubefim binary"
        (cd "$REPO" && cargo build --release --bin kubefim) >&2 || die "cargo build --release failed"
        [ -x "$KUBEFIM_BIN" ] || die "cargo build succeeded but $KUBEFIM_BIN is missing"
    fi
fi

TMP="$(mktemp -d "${TMPDIR:-/var/tmp}/kubefim-compare.XXXXXX")"
trap 'rm -rf -- "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
case "$(realpath "$TMP")/" in
    "$TREE"/*) die "the temp dir $TMP is inside the tree: the tools would scan their own databases; set TMPDIR elsewhere" ;;
esac

# Mount points below the tree: find -xdev and kubefim stay on the tree's file system, aide
# does not, so the tools would not cover the same files.
submounts="$(awk -v t="$TREE/" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo)"
[ -z "$submounts" ] || log "warning: file systems are mounted below $TREE ($(tr '\n' ' ' <<<"$submounts")); the tools may not cover the same files"

# ---------------------------------------------------------------------------- set-up --
log "tree $TREE: counting"
read -r N_FILES N_DIRS N_LINKS N_OTHER BYTES < <(
    find "$TREE" -xdev \( -type f -printf 'f %s\n' \) -o \( -type d -printf 'd\n' \) \
        -o \( -type l -printf 'l\n' \) -o -printf 'o\n' |
        awk '{ n[$1]++ } $1 == "f" { b += $2 } END { printf "%d %d %d %d %.0f\n", n["f"], n["d"], n["l"], n["o"], b }'
)
FSTYPE="$(findmnt -n -o FSTYPE -T "$TREE" 2>/dev/null || stat -f -c %T "$TREE")"

"$KUBEFIM_BIN" keygen --out "$TMP/keys" >"$TMP/keygen.out" 2>&1 ||
    die "kubefim keygen failed: $(cat "$TMP/keygen.out")"
KEY="$TMP/keys/kubefim.key"
PUBKEY="$TMP/keys/kubefim.pub"
{ [ -f "$KEY" ] && [ -f "$PUBKEY" ]; } || die "kubefim keygen did not write $KEY and $PUBKEY"

cat >"$TMP/policy.yaml" <<EOF
apiVersion: kubefim.io/v1alpha1
kind: FimPolicy
metadata: {name: compare}
spec:
  rules:
    - path: "$TREE"
EOF

# aide: a regex rule for the tree (and nothing else: "/tree" alone would also match
# "/tree-foo", a sibling), with kubefim's attribute set and one hash.
aide_regex="$(printf '%s' "$TREE" | sed 's/[]\\.^$*+?(){}|[]/\\&/g')"
cat >"$TMP/aide.conf" <<EOF
database_in=file:$TMP/aide.db
database_out=file:$TMP/aide.db.new
gzip_dbout=no
num_workers=$AIDE_WORKERS
report_url=stdout
Kubefim = p+ftype+i+l+n+u+g+s+m+c+xattrs+sha256
$aide_regex(\$|/) Kubefim
EOF
aide --config="$TMP/aide.conf" --config-check >"$TMP/aide-config-check.out" 2>&1 ||
    die "aide rejects the generated config: $(cat "$TMP/aide-config-check.out")"

# The peer pipeline: hashing only, in parallel, every regular file of the tree.
# shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
B3SUM_PIPELINE='find "$1" -xdev -type f -print0 | xargs -0 -P"$2" -n 512 b3sum >/dev/null'
B3SUM_SHOWN="find $TREE -xdev -type f -print0 | xargs -0 -P$JOBS -n 512 b3sum >/dev/null"

KUBEFIM_CREATE=("$KUBEFIM_BIN" baseline create --policy "$TMP/policy.yaml" --db "$TMP/kubefim.db" --key "$KEY")
KUBEFIM_VERIFY=("$KUBEFIM_BIN" verify --db "$TMP/kubefim.db" --pubkey "$PUBKEY" --format json)
B3SUM=(bash -o pipefail -c "$B3SUM_PIPELINE" b3sum-pipeline "$TREE" "$JOBS")
AIDE_INIT=(aide --config="$TMP/aide.conf" --init)
AIDE_CHECK=(aide --config="$TMP/aide.conf" --check)

# ------------------------------------------------------------------------- measuring --
# run_one PHASE TOOL TIMED: runs one command of the matrix, checks its exit code (aborting
# with the tool's own words when it failed) and, when TIMED=1, appends
# "PHASE TOOL WALL_S RSS_KIB" to $TMP/results.
run_one() {
    local phase="$1" tool="$2" timed="$3" out="$TMP/$1-$2.out" err="$TMP/$1-$2.err" rc=0
    local -a cmd
    case "$phase-$tool" in
        create-kubefim) rm -rf -- "$TMP/kubefim.db"; cmd=("${KUBEFIM_CREATE[@]}") ;;
        create-aide) rm -f -- "$TMP/aide.db.new"; cmd=("${AIDE_INIT[@]}") ;;
        verify-kubefim) cmd=("${KUBEFIM_VERIFY[@]}") ;;
        verify-aide) cmd=("${AIDE_CHECK[@]}") ;;
        *-b3sum) cmd=("${B3SUM[@]}") ;;
    esac
    # Wall time from bash's microsecond clock (GNU time's %e has 10 ms resolution, too
    # coarse for small trees); peak RSS from GNU time.
    local start="$EPOCHREALTIME"
    /usr/bin/time -f '%M' -o "$TMP/time" "${cmd[@]}" >"$out" 2>"$err" || rc=$?
    local end="$EPOCHREALTIME"

    case "$phase-$tool:$rc" in
        *:0) ;;
        verify-kubefim:1)
            log "kubefim verify found differences in $TREE, which nothing should have changed:"
            grep -o '"summary": *{[^}]*}' "$out" >&2 || true
            grep -o '"path": *"[^"]*"' "$out" | head -n 20 >&2 || true
            keep_tmp
            die "kubefim verify exited 1 (differences) on a tree that should not have changed; its full report is $out. Rerun on a quiet tree (one that no package manager, service or cron job writes to while the benchmark runs)."
            ;;
        *-b3sum:123)
            log "warning: b3sum could not hash some files (vanished or unreadable): $(head -n 3 "$err" | tr '\n' ' ')"
            ;;
        verify-aide:[1-7])
            log "warning: aide --check exited $rc (bits: 1 added, 2 removed, 4 changed): the tree changed during the benchmark"
            ;;
        *)
            keep_tmp
            die "$tool ($phase) exited $rc; command: ${cmd[*]}; stderr: $(tail -n 20 "$err"); files kept in $TMP"
            ;;
    esac
    if [ "$timed" = 1 ]; then
        local wall rss
        wall="$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }')"
        # On failure GNU time writes a "Command exited with non-zero status" line first.
        rss="$(tail -n 1 "$TMP/time")"
        echo "$phase $tool $wall $rss" >>"$TMP/results"
        log "  $phase $tool: ${wall}s, $((rss / 1024)) MiB"
    fi
}

TOOLS=(kubefim b3sum aide)
: >"$TMP/results"
log "create: warming the page cache (one untimed pass of each tool)"
for tool in "${TOOLS[@]}"; do run_one create "$tool" 0; done
for run in $(seq "$RUNS"); do
    log "create: run $run/$RUNS"
    for tool in "${TOOLS[@]}"; do run_one create "$tool" 1; done
done
mv -- "$TMP/aide.db.new" "$TMP/aide.db"
AIDE_ENTRIES="$(awk -F: '/^Number of entries/ { gsub(/[ \t]/, "", $2); print $2 }' "$TMP/create-aide.out")"

# The cache is warm from the create phase; kubefim verify's exit code is checked on its
# first run, so a tree that changed aborts before the rest is measured.
for run in $(seq "$RUNS"); do
    log "verify: run $run/$RUNS"
    for tool in "${TOOLS[@]}"; do run_one verify "$tool" 1; done
done
KUBEFIM_SCANNED="$(grep -o '"scanned": *[0-9]*' "$TMP/verify-kubefim.out" | grep -o '[0-9]*$' || echo '?')"

# -------------------------------------------------------------------------- report --
# median PHASE TOOL FIELD (3 = wall, 4 = rss): the median over the timed runs.
median() {
    awk -v p="$1" -v t="$2" -v f="$3" '$1 == p && $2 == t { print $f }' "$TMP/results" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
raw() { awk -v p="$1" -v t="$2" '$1 == p && $2 == t { printf "%s%s", sep, $3; sep = " " }' "$TMP/results"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

version_of() { "$@" 2>/dev/null | head -n 1 || true; }
echo "# kubefim vs b3sum vs aide"
echo
echo "- command: \`$CMDLINE\`"
echo "- tree: \`$TREE\` ($FSTYPE): $N_FILES files, $N_DIRS directories, $N_LINKS symlinks, $N_OTHER other;" \
    "$(awk -v b="$BYTES" 'BEGIN { printf "%.2f GiB (%.0f bytes)", b / 1073741824, b }') in regular files"
echo "- entries recorded: kubefim $KUBEFIM_SCANNED, aide ${AIDE_ENTRIES:-?}, b3sum $N_FILES (regular files only)"
echo "- machine: $JOBS CPUs, $(uname -sr); $(version_of "$KUBEFIM_BIN" --version), $(version_of b3sum --version)," \
    "$(version_of aide --version); aide num_workers=$AIDE_WORKERS, xargs -P$JOBS"
echo "- method: median of $RUNS runs, round-robin, warm page cache; peak RSS from GNU time" \
    "(for the b3sum pipeline: its largest single process)"
echo
echo "| phase | tool | wall s | peak RSS MB | × b3sum (wall) | kubefim speed-up over aide |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for phase in create verify; do
    b3_wall="$(median "$phase" b3sum 3)"
    aide_wall="$(median "$phase" aide 3)"
    for tool in "${TOOLS[@]}"; do
        wall="$(median "$phase" "$tool" 3)"
        rss="$(median "$phase" "$tool" 4)"
        speedup=""
        [ "$tool" = kubefim ] && speedup="$(ratio "$aide_wall" "$wall")×"
        printf '| %s | %s | %.3f | %.1f | %s | %s |\n' "$phase" "$tool" "$wall" \
            "$(awk -v k="$rss" 'BEGIN { print k / 1024 }')" "$(ratio "$wall" "$b3_wall")" "$speedup"
    done
done
echo
echo "Commands (\$TMP is a temp dir, removed at exit; each command's stdout, a few hundred bytes, goes to a file in it):"
echo
echo "- create, kubefim: \`${KUBEFIM_CREATE[*]//$TMP/\$TMP}\`"
echo "- create and verify, b3sum: \`$B3SUM_SHOWN\`"
echo "- create, aide: \`${AIDE_INIT[*]//$TMP/\$TMP}\`"
echo "- verify, kubefim: \`${KUBEFIM_VERIFY[*]//$TMP/\$TMP}\`"
echo "- verify, aide: \`${AIDE_CHECK[*]//$TMP/\$TMP}\`"
echo
echo "aide.conf:"
echo
echo '```'
sed -e "s|$TMP|\$TMP|g" "$TMP/aide.conf"
echo '```'
echo
echo "Raw wall seconds per run:"
echo
for phase in create verify; do
    for tool in "${TOOLS[@]}"; do echo "- $phase $tool: $(raw "$phase" "$tool")"; done
done
