#!/usr/bin/env bash
# Side-by-side benchmark of watch mode: what `kubefim watch` costs the machine next to no
# monitor and next to auditd, how fast it reports, and how much memory it holds. One run:
#
#   overhead:  two workloads on an ext4 tree under TMPDIR, each under four monitors:
#                none | kubefim watch, tree monitored | kubefim watch, tree NOT monitored
#                (its baseline is another, small dir) | auditd with `auditctl -w TREE -p wa`
#     loop:    a C loop (compiled here with gcc): LOOP_ITERS x open(O_WRONLY|O_APPEND) +
#              write(64 B) + close, round-robin over LOOP_FILES files of the tree
#     tar:     tar -x of a generated tarball (TAR_FILES files, about TAR_MB MB, in
#              subdirectories of 100) into a directory of the tree
#   latency:   kubefim watch: close() of a monitored file -> its line in the output file
#              (arrival time, not the line's "time"); LAT_SAMPLES probes ~20 ms apart
#   memory:    kubefim watch's VmHWM and VmRSS once ready, with a RSS_FILES-file baseline
#
# Each overhead cell is the median of RUNS runs (default 3), round-robin over the monitors
# within a run, warm page cache. CPU is measured for the whole machine: /proc/stat system
# ticks of all CPUs from the workload's start until the monitor is idle again, plus the
# monitor's own user time; and, attributed, the workload's own rusage plus the monitor's
# utime+stime (for auditd: auditd and the kauditd kernel thread). Markdown tables go to
# stdout, progress and diagnostics to stderr. Run as root.
#
# Usage: benches/watch_compare.sh
# Environment:
#   RUNS=N             timed runs per cell (default 3; 1 with QUICK=1)
#   QUICK=1            tiny sizes, for a smoke test in under a minute
#   KUBEFIM=PATH       the kubefim binary (default: target/release/kubefim of this
#                      repository, built with `cargo build --release` if missing)
#   TMPDIR=DIR         where the scratch tree goes (default /var/tmp); it should be ext4
#   LOOP_FILES=N       files of the loop workload (default 200; QUICK 20)
#   LOOP_ITERS=N       open+write+close iterations of the loop (default 200000; QUICK 5000)
#   TAR_FILES=N        files in the tarball (default 20000; QUICK 500)
#   TAR_MB=N           approximate size of the tarball's content in MB (default 200; QUICK 5)
#   LAT_SAMPLES=N      latency probes per run (default 200; QUICK 20)
#   RSS_FILES=N        files in the baseline of the memory measurement (default 100000;
#                      QUICK 2000)
#   AUDIT_BACKLOG=N    auditctl -b while auditd runs (default 8192, as auditd's shipped
#                      rules set it; the kernel's own default is 64); restored afterwards
#
# Targets shown next to the results: <= 3% added CPU with the tree not monitored; kubefim's
# added CPU below auditd's with the tree monitored; latency p99 < 100 ms; VmHWM <= 100 MB.
set -euo pipefail
export LC_ALL=C # decimal points and byte-order sorting, whatever the user's locale

usage() {
    local code="${1:-0}"
    if [ "$code" -eq 0 ]; then exec 3>&1; else exec 3>&2; fi
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&3
    exit "$code"
}
log() { printf '[watch_compare] %s\n' "$*" >&2; }
die() {
    printf 'watch_compare.sh: error: %s\n' "$*" >&2
    exit 1
}

case "${1:-}" in
    -h | --help) usage 0 ;;
    "") ;;
    *) printf 'watch_compare.sh: no arguments expected, got %s\n\n' "$1" >&2; usage 2 ;;
esac

# The exact command line, with the environment that changes what is measured.
CMDLINE="$(printf '%q' "$0")"
for var in AUDIT_BACKLOG RSS_FILES LAT_SAMPLES TAR_MB TAR_FILES LOOP_ITERS LOOP_FILES TMPDIR KUBEFIM QUICK RUNS; do
    if [ -n "${!var:-}" ]; then CMDLINE="$var=$(printf '%q' "${!var}") $CMDLINE"; fi
done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$SCRIPT_DIR")"
QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
    RUNS="${RUNS:-1}" LOOP_FILES="${LOOP_FILES:-20}" LOOP_ITERS="${LOOP_ITERS:-5000}"
    TAR_FILES="${TAR_FILES:-500}" TAR_MB="${TAR_MB:-5}" LAT_SAMPLES="${LAT_SAMPLES:-20}"
    RSS_FILES="${RSS_FILES:-2000}"
else
    RUNS="${RUNS:-3}" LOOP_FILES="${LOOP_FILES:-200}" LOOP_ITERS="${LOOP_ITERS:-200000}"
    TAR_FILES="${TAR_FILES:-20000}" TAR_MB="${TAR_MB:-200}" LAT_SAMPLES="${LAT_SAMPLES:-200}"
    RSS_FILES="${RSS_FILES:-100000}"
fi
AUDIT_BACKLOG="${AUDIT_BACKLOG:-8192}"
for var in RUNS LOOP_FILES LOOP_ITERS TAR_FILES TAR_MB LAT_SAMPLES RSS_FILES AUDIT_BACKLOG; do
    [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, not '${!var}'"
done
LAT_INTERVAL_MS=20

# ------------------------------------------------------------------------ preconditions --
[ -n "${EPOCHREALTIME:-}" ] || die "bash >= 5.0 is needed (for \$EPOCHREALTIME)"
[ "$(id -u)" -eq 0 ] || die "run as root: kubefim watch loads eBPF programs and auditctl changes kernel rules"

missing=()
for tool in gcc tar python3 find sync truncate awk sort findmnt; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    die "missing: ${missing[*]}. Run scripts/setup.sh (as root) first; it installs gcc, auditd and the rest."
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "python3 >= 3.9 is needed"
# auditd is a peer, not a prerequisite: without it (or without the kernel's audit), its
# rows say why instead of giving numbers.

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

# --------------------------------------------------------------- scratch and clean-up --
TMP="$(mktemp -d "${TMPDIR:-/var/tmp}/kubefim-bench-watch.XXXXXX")"
trap 'rm -rf -- "$TMP"' EXIT # until the full clean-up below is in place
TMP="$(realpath "$TMP")"
# Every run uses this one copy: a `cargo build` during the benchmark cannot swap it.
KUBEFIM_SRC="$KUBEFIM_BIN"
KUBEFIM_SRC_MTIME="$(date -u -r "$KUBEFIM_SRC" '+%Y-%m-%d %H:%M:%S UTC')"
KUBEFIM_BIN="$TMP/kubefim"
cp -- "$KUBEFIM_SRC" "$KUBEFIM_BIN" || die "cannot copy $KUBEFIM_SRC to $TMP"
case "$TMP" in
    *[[:space:]%\"\\]*) die "scratch path '$TMP' has whitespace, %, \" or \\: not supported (it goes into YAML and auditctl)" ;;
esac
TREE="$TMP/tree"       # what the workloads write to; the monitored tree
OTHER="$TMP/other"     # the baseline of the "tree not monitored" runs
RSS_TREE="$TMP/rss"    # the RSS_FILES-file tree of the memory measurement
KEEP_TMP=0             # 1: a step failed; leave the scratch dir for inspection
WATCH_PID=""           # the kubefim watch we started, while it runs
AUDITD_PID=""          # the auditd we started, while it runs
AUDIT_RULE=0           # 1 while our audit watch rule is in the kernel
AUDIT_ORIG_ENABLED=""  # the kernel's audit state before we touched it
AUDIT_ORIG_BACKLOG=""
AUDIT_KEY="kubefim-bench-$$"

# stop_pid PID NAME: SIGTERM, then up to 20 s for it to exit, then SIGKILL. Returns the exit
# status (143 = it died of the SIGTERM it did not handle).
stop_pid() {
    local pid="$1" name="$2" rc=0 i
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "warning: $name (pid $pid) did not exit 20 s after SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

audit_rule_remove() {
    if [ "$AUDIT_RULE" = 1 ]; then
        auditctl -W "$TREE" -p wa -k "$AUDIT_KEY" >/dev/null 2>&1 ||
            log "warning: could not remove the audit rule on $TREE; remove it with: auditctl -W $TREE -p wa -k $AUDIT_KEY"
        AUDIT_RULE=0
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$WATCH_PID" ]; then stop_pid "$WATCH_PID" "kubefim watch" || true; WATCH_PID=""; fi
    audit_rule_remove
    if [ -n "$AUDITD_PID" ]; then stop_pid "$AUDITD_PID" auditd || true; AUDITD_PID=""; fi
    # auditd enables auditing when it starts; put back what was there.
    if [ -n "$AUDIT_ORIG_BACKLOG" ]; then auditctl -b "$AUDIT_ORIG_BACKLOG" >/dev/null 2>&1 || true; fi
    if [ -n "$AUDIT_ORIG_ENABLED" ]; then auditctl -e "$AUDIT_ORIG_ENABLED" >/dev/null 2>&1 || true; fi
    if [ "$KEEP_TMP" = 1 ]; then
        log "scratch data kept in $TMP (remove it when done)"
    else
        rm -rf -- "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fail MESSAGE: abort, keeping the scratch dir (events, stderr of the tools) for inspection.
fail() {
    KEEP_TMP=1
    die "$*"
}

FSTYPE="$(findmnt -n -o FSTYPE -T "$TMP" 2>/dev/null || stat -f -c %T "$TMP")"
[ "$FSTYPE" = ext4 ] || log "warning: $TMP is on $FSTYPE, not ext4; the numbers are for $FSTYPE"

# ----------------------------------------------------------------------------- helpers --
# One Python helper does what needs clocks and /proc more precise than the shell's.
cat >"$TMP/wc.py" <<'PY'
import json, os, random, subprocess, sys, time

TCK = os.sysconf("SC_CLK_TCK")


def machine():
    """(user+nice, system) ticks of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[1]) + int(v[2]), int(v[3])


def proc_ticks(pid):
    """(utime, stime) of a process, all its threads, in ticks; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0, 0
    v = s[s.rindex(")") + 2:].split()
    return int(v[11]), int(v[12])


def monitors(pids):
    u = s = 0
    for p in pids:
        a, b = proc_ticks(p)
        u, s = u + a, s + b
    return u, s


def size(path):
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def snapshot(pids, events):
    return time.perf_counter(), machine(), monitors(pids), size(events) if events else 0


def wait_idle(pids, output, quiet, timeout):
    """Polls every 50 ms until the monitor has been idle for `quiet` s: its output file did
    not grow and its CPU grew by less than 2 ticks in any 200 ms (an idle daemon still gets
    a stray tick now and then: the kernel charges ticks by sampling). Returns the snapshot
    of the last busy poll (the end of the monitor's work, to 50 ms) and whether the timeout
    hit first."""
    polls = [snapshot(pids, output)]
    busy = polls[0]
    start = busy[0]
    while True:
        time.sleep(0.05)
        cur = snapshot(pids, output)
        polls = (polls + [cur])[-5:]
        ticks = sum(cur[2]) - sum(polls[0][2])
        if cur[3] != polls[-2][3] or ticks >= 2:
            busy = cur
        elif cur[0] - busy[0] >= quiet:
            return busy, False
        if cur[0] - start > timeout:
            return busy, True


def wait_marker(pids, output, marker, timeout):
    """Appends to the file `marker` (a path the monitor watches) and waits until its name
    shows in `output` (the monitor's log, which it writes in order): everything the workload
    caused has then been written. Follows the log across rotations. Returns the snapshot
    taken when the name showed, and whether the timeout hit first."""
    name = os.path.basename(marker).encode()
    try:
        st = os.stat(output)
        ino, pos = st.st_ino, st.st_size
    except OSError:
        ino, pos = None, 0
    tail = b""
    fd = os.open(marker, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"marker\n")
    os.close(fd)
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with open(output, "rb") as f:
                if os.fstat(f.fileno()).st_ino != ino:
                    ino, pos = os.fstat(f.fileno()).st_ino, 0
                f.seek(pos)
                data = f.read()
        except OSError:
            data = b""
        if data:
            pos += len(data)
            if name in tail + data:
                return snapshot(pids, output), False
            tail = data[-len(name):]
        time.sleep(0.01)
    return snapshot(pids, output), True


def measure(argv):
    # measure PIDS OUTPUT MARKER ERRFILE -- CMD...: runs CMD, then waits for the monitors
    # (PIDS, writing OUTPUT) to be done with it: until MARKER shows in OUTPUT when MARKER is
    # given, else until they are idle. Prints: rc wall user sys monitor_user monitor_sys
    # machine_user machine_sys drain others_user timed_out.
    pids = [int(p) for p in argv[0].split(",") if p]
    output, marker, err, cmd = argv[1], argv[2], argv[3], argv[5:]
    if pids:
        wait_idle(pids, "", 0.5, 30)  # settle: the monitor is idle before we start
    t0, m0, mon0, _ = snapshot(pids, output)
    with open(err, "wb") as errf:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errf)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.perf_counter()
    end, timed_out = (snapshot(pids, output), False)
    if marker:
        end, timed_out = wait_marker(pids, output, marker, 300)
    elif pids:
        end, timed_out = wait_idle(pids, output, 1.0, 300)
    t2, m2, mon2, _ = end
    mon_u, mon_s = (mon2[0] - mon0[0]) / TCK, (mon2[1] - mon0[1]) / TCK
    mach_u, mach_s = (m2[0] - m0[0]) / TCK, (m2[1] - m0[1]) / TCK
    # Others' user CPU in the window: how busy the rest of the machine was (noise).
    others_u = max(0.0, mach_u - ru.ru_utime - mon_u)
    print(f"{p.returncode} {t1 - t0:.3f} {ru.ru_utime:.3f} {ru.ru_stime:.3f} {mon_u:.2f} {mon_s:.2f} "
          f"{mach_u:.2f} {mach_s:.2f} {max(0.0, t2 - t1):.3f} {others_u:.2f} {int(timed_out)}")


def idle(argv):
    """Machine CPU over argv[0] s while this script does nothing, in CPUs busy."""
    secs = float(argv[0])
    m0 = machine()
    time.sleep(secs)
    m1 = machine()
    print(f"{(m1[0] - m0[0]) / TCK / secs:.2f} {(m1[1] - m0[1]) / TCK / secs:.2f}")


def gen(argv):
    """gen DIR NFILES TOTAL_BYTES: NFILES files (100 a directory) of pseudo-random sizes
    averaging TOTAL_BYTES / NFILES, incompressible content; the same tree on every run."""
    root, n, total = argv[0], int(argv[1]), int(argv[2])
    rng = random.Random(42)
    mean = total / n
    block = rng.randbytes(4 << 20) if hasattr(rng, "randbytes") else os.urandom(4 << 20)
    for i in range(n):
        d = os.path.join(root, f"d{i // 100:05d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        sz = min(int(rng.expovariate(1 / mean)) if mean > 0 else 0, len(block))
        off = rng.randrange(0, len(block) - sz + 1)
        with open(os.path.join(d, f"f{i:06d}"), "wb") as f:
            f.write(block[off:off + sz])


def check(argv):
    """check EVENTS EXPECTED: EXPECTED lists "PATH SIZE" (SIZE "-" for a directory), the
    state after the workload. A path is reported when kubefim's last change line for it
    gives that state. Prints: reported expected change_lines lost_events rescans."""
    events, expected = argv
    want = {}
    with open(expected, "rb") as f:
        for line in f:
            p, s = line.rstrip(b"\n").rsplit(b" ", 1)
            want[p.decode("utf-8", "surrogateescape")] = None if s == b"-" else int(s)
    last, lines, lost, rescans = {}, 0, 0, 0
    with open(events, "rb") as f:
        for raw in f:
            try:
                o = json.loads(raw)
            except ValueError:
                continue
            kind = o.get("kind")
            if kind == "lost":
                lost += int(o.get("events", 0))
            elif kind == "rescan":
                rescans += o.get("reason") != "startup"
            elif "path" in o and kind in ("added", "modified", "removed", "renamed"):
                lines += 1
                last[o["path"]] = o.get("new")
                if kind == "renamed" and "to" in o:
                    last[o["to"]] = o.get("new")
    ok = 0
    for p, s in want.items():
        new = last.get(p)
        if new is not None and (s is None or new.get("size") == s):
            ok += 1
    print(f"{ok} {len(want)} {lines} {lost} {rescans}")


def latency(argv):
    """latency FILE EVENTS N INTERVAL_MS: N times, append 64 B to FILE and close it, then
    wait for the change line that shows FILE at its new size to arrive in EVENTS; latency =
    arrival (seen by polling every 0.5 ms) - the time right after close(). Prints:
    p50_ms p99_ms max_ms ok missed."""
    path, events, n, interval = argv[0], argv[1], int(argv[2]), int(argv[3]) / 1000
    ev = open(events, "rb")
    ev.seek(0, 2)
    buf = b""
    lat, missed = [], 0
    for _ in range(n):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"x" * 63 + b"\n")
        os.close(fd)
        closed = time.time_ns()
        want = os.stat(path).st_size
        deadline = closed + 5_000_000_000
        found = False
        while not found and time.time_ns() < deadline:
            chunk = ev.read()
            if not chunk:
                time.sleep(0.0005)
                continue
            now = time.time_ns()
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                try:
                    o = json.loads(raw)
                except ValueError:
                    continue
                if o.get("path") == path and (o.get("new") or {}).get("size") == want:
                    lat.append((now - closed) / 1e6)
                    found = True
        if not found:
            missed += 1
        time.sleep(interval)
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    print(f"{pct(0.5):.2f} {pct(0.99):.2f} {max(lat) if lat else float('nan'):.2f} {len(lat)} {missed}")


def median(v):
    v = sorted(v)
    n = len(v)
    return (v[(n - 1) // 2] + v[n // 2]) / 2 if n else float("nan")


def report(argv):
    """report RESULTS CHECKS AUDIT_UNAVAILABLE: the overhead table."""
    results, checks, audit_unavailable = argv
    LABEL = {
        "none": "none",
        "kubefim": "kubefim watch, tree monitored",
        "kubefim-other": "kubefim watch, tree not monitored",
        "auditd": "auditd, `-w TREE -p wa`",
    }
    rows = {}
    for line in open(results):
        wl, cfg, run, rc, wall, u, s, mu, ms, machu, machs, drain, others, to = line.split()
        rows.setdefault((wl, cfg), {})[run] = dict(
            wall=float(wall), u=float(u), s=float(s), mu=float(mu), ms=float(ms),
            machs=float(machs), drain=float(drain), others=float(others), timeout=int(to))
    checks_of = {}
    for line in open(checks):
        wl, cfg, run, kind, *vals = line.split()
        checks_of.setdefault((wl, cfg), []).append((int(run), [int(v) for v in vals]))

    def note_of(wl, cfg):
        runs = [v for _, v in sorted(checks_of.get((wl, cfg), []))]
        if not runs:
            return ""
        if cfg == "kubefim":
            total = runs[0][1]
            if all(ok == tot for ok, tot, _, _ in runs):
                text = f"final state of all {total} paths reported in every run"
            else:
                text = ("final state reported, per run: "
                        + ", ".join(f"{ok}/{tot}" for ok, tot, _, _ in runs) + " paths")
            text += "; lost events: " + ", ".join(str(lost) for *_, lost in runs)
            return text + "; change lines: " + ", ".join(str(n) for _, _, n, _ in runs)
        if cfg == "kubefim-other":
            lines = [n for (n,) in runs]
            return "" if not any(lines) else "change lines (expected none): " + ", ".join(map(str, lines))
        if cfg == "auditd":
            return ("kernel audit `lost`, per run: " + ", ".join(f"+{n}" for (n,) in runs)
                    + " (counts every process's records)")
        return ""

    def added(wl, cfg, kind):
        """Median over runs of the added CPU % against the same run's no-monitor cell."""
        out = []
        for run, r in rows.get((wl, cfg), {}).items():
            b = rows[(wl, "none")].get(run)
            if not b:
                continue
            if kind == "machine":
                base, val = b["machs"], r["machs"] + r["mu"]
            else:
                base, val = b["s"], r["s"] + r["mu"] + r["ms"]
            if base > 0:
                out.append(100 * (val - base) / base)
        return median(out)

    def wall_ratio(wl, cfg):
        return median([r["wall"] / rows[(wl, "none")][run]["wall"]
                       for run, r in rows.get((wl, cfg), {}).items() if run in rows[(wl, "none")]])

    print("| workload | monitor | wall s | wall ratio | workload user s | workload sys s "
          "| monitor CPU s | machine sys s | added CPU % (machine) | added CPU % (attributed) "
          "| drain s | target | notes |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for wl in ("loop", "tar"):
        for cfg in ("none", "kubefim", "kubefim-other", "auditd"):
            if cfg == "auditd" and audit_unavailable:
                print(f"| {wl} | {LABEL[cfg]} | auditd: unavailable ({audit_unavailable}) "
                      "| | | | | | | | | | |")
                continue
            runs = rows.get((wl, cfg))
            if not runs:
                continue
            med = lambda k: median([r[k] for r in runs.values()])
            am, aa = added(wl, cfg, "machine"), added(wl, cfg, "attributed")
            target = ""
            if cfg == "kubefim-other":
                target = ("<= 3%: " + ("met" if am <= 3 else "NOT met") + " (machine), "
                          + ("met" if aa <= 3 else "NOT met") + " (attributed)")
            elif cfg == "kubefim" and (wl, "auditd") in rows:
                bm, ba = added(wl, "auditd", "machine"), added(wl, "auditd", "attributed")
                target = ("below auditd: " + ("met" if am < bm else "NOT met") + " (machine), "
                          + ("met" if aa < ba else "NOT met") + " (attributed)")
            elif cfg == "kubefim":
                target = "below auditd: n/a (auditd unavailable)"
            pct = lambda x: "" if cfg == "none" else f"{x:+.1f}"
            ratio = "1.00" if cfg == "none" else f"{wall_ratio(wl, cfg):.2f}"
            mon = "" if cfg == "none" else f"{med('mu') + med('ms'):.2f}"
            note = note_of(wl, cfg)
            if any(r["timeout"] for r in runs.values()):
                note = (note + "; " if note else "") + "monitor still busy 300 s after the workload"
            print(f"| {wl} | {LABEL[cfg]} | {med('wall'):.3f} | {ratio} | {med('u'):.2f} | {med('s'):.2f} "
                  f"| {mon} | {med('machs'):.2f} | {pct(am)} | {pct(aa)} "
                  f"| {'' if cfg == 'none' else format(med('drain'), '.2f')} | {target} | {note} |")


if __name__ == "__main__":
    {"measure": measure, "idle": idle, "gen": gen, "check": check, "latency": latency,
     "report": report}[sys.argv[1]](sys.argv[2:])
PY
py() { python3 "$TMP/wc.py" "$@"; }

# The loop workload: open(O_WRONLY|O_APPEND) + write(64 B) + close, round-robin over the files
# DIR/f00000..; compiled here so that its own cost is small and the same on every machine.
cat >"$TMP/loop.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: loop DIR NFILES ITERATIONS\n");
        return 2;
    }
    long n = atol(argv[2]), iters = atol(argv[3]);
    if (n <= 0 || iters < 0) return 2;
    char (*paths)[4096] = malloc((size_t)n * sizeof *paths);
    if (!paths) return 1;
    for (long i = 0; i < n; i++) snprintf(paths[i], sizeof paths[i], "%s/f%05ld", argv[1], i);
    char buf[64];
    memset(buf, 'x', sizeof buf - 1);
    buf[sizeof buf - 1] = '\n';
    for (long i = 0; i < iters; i++) {
        const char *p = paths[i % n];
        int fd = open(p, O_WRONLY | O_APPEND);
        if (fd < 0) { perror(p); return 1; }
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) { perror(p); return 1; }
        if (close(fd) != 0) { perror(p); return 1; }
    }
    return 0;
}
C
gcc -O2 -Wall -o "$TMP/loop" "$TMP/loop.c" 2>"$TMP/gcc.err" || die "gcc failed: $(cat "$TMP/gcc.err")"

# ---------------------------------------------------------------------------- set-up --
log "scratch dir $TMP ($FSTYPE)"
mkdir -p "$TREE/loop" "$TREE/x" "$TREE/probe" "$OTHER" "$TMP/events"
for i in $(seq 0 $((LOOP_FILES - 1))); do : >"$TREE/loop/$(printf 'f%05d' "$i")"; done
: >"$TREE/probe/latency"
for i in $(seq 100); do echo "other $i" >"$OTHER/o$i"; done

log "tar: generating $TAR_FILES files, about $TAR_MB MB, and their tarball"
py gen "$TMP/gen" "$TAR_FILES" "$((TAR_MB * 1024 * 1024))" || die "generating the tar tree failed"
tar -cf "$TMP/src.tar" -C "$TMP/gen" . || die "tar -c failed"
read -r TAR_ENTRIES TAR_BYTES < <(find "$TMP/gen" -mindepth 1 -printf '%s\n' |
    awk '{ n++; b += $1 } END { printf "%d %.0f\n", n, b }')
rm -rf -- "$TMP/gen"

"$KUBEFIM_BIN" keygen --out "$TMP/keys" >"$TMP/keygen.out" 2>&1 ||
    die "kubefim keygen failed: $(cat "$TMP/keygen.out")"
KEY="$TMP/keys/kubefim.key"
PUBKEY="$TMP/keys/kubefim.pub"

# write_policy FILE DIR: a one-rule policy over DIR with the default attributes.
write_policy() {
    cat >"$1" <<EOF
apiVersion: kubefim.io/v1alpha1
kind: FimPolicy
metadata: {name: bench}
spec:
  rules:
    - path: "$2"
EOF
}
write_policy "$TMP/tree.yaml" "$TREE"
write_policy "$TMP/other.yaml" "$OTHER"
write_policy "$TMP/rss.yaml" "$RSS_TREE"

# baseline NAME: (re)creates the signed baseline $TMP/NAME.db from $TMP/NAME.yaml.
baseline() {
    rm -rf -- "$TMP/$1.db"
    "$KUBEFIM_BIN" baseline create --policy "$TMP/$1.yaml" --db "$TMP/$1.db" --key "$KEY" \
        >"$TMP/baseline-$1.out" 2>&1 || fail "kubefim baseline create ($1) failed: $(tail -n 5 "$TMP/baseline-$1.out")"
}
baseline other

# ---------------------------------------------------------------------------- monitors --
# start_kubefim NAME EVENTS: kubefim watch on the baseline $TMP/NAME.db, a fresh journal,
# output to EVENTS; returns once it is ready. Sets WATCH_PID.
start_kubefim() {
    local db="$TMP/$1.db" events="$2" i
    rm -rf -- "$TMP/ready" "$TMP/journal"
    "$KUBEFIM_BIN" watch --db "$db" --pubkey "$PUBKEY" --format jsonl --ready-file "$TMP/ready" \
        --journal "$TMP/journal" >"$events" 2>"$TMP/watch.err" &
    WATCH_PID=$!
    for i in $(seq 3000); do
        [ -e "$TMP/ready" ] && return 0
        if ! kill -0 "$WATCH_PID" 2>/dev/null; then
            wait "$WATCH_PID" || true
            WATCH_PID=""
            fail "kubefim watch exited before it was ready: $(tail -n 20 "$TMP/watch.err")"
        fi
        sleep 0.1
    done
    fail "kubefim watch not ready after 300 s: $(tail -n 20 "$TMP/watch.err")"
}

stop_kubefim() {
    local rc=0
    stop_pid "$WATCH_PID" "kubefim watch" || rc=$?
    WATCH_PID=""
    [ "$rc" -eq 0 ] || fail "kubefim watch exited $rc on SIGTERM: $(tail -n 20 "$TMP/watch.err")"
}

# audit_field NAME: a field of `auditctl -s`.
audit_field() { auditctl -s 2>/dev/null | awk -v k="$1" '$1 == k { print $2; exit }'; }

# Is auditd usable here? AUDIT_UNAVAILABLE says why not ("" when it is).
AUDIT_UNAVAILABLE=""
AUDIT_OWN=1 # 1: we start auditd ourselves; 0: one was already running, we only add the rule
if ! command -v auditctl >/dev/null || ! command -v auditd >/dev/null; then
    AUDIT_UNAVAILABLE="auditctl/auditd not installed; scripts/setup.sh installs auditd"
elif ! out="$(auditctl -s 2>&1)"; then
    AUDIT_UNAVAILABLE="\`auditctl -s\` failed: $(tr '\n|' ' /' <<<"$out" | sed 's/ *$//')"
else
    AUDIT_ORIG_ENABLED="$(audit_field enabled)"
    AUDIT_ORIG_BACKLOG="$(audit_field backlog_limit)"
    pid="$(audit_field pid)"
    if [ "$AUDIT_ORIG_ENABLED" = 2 ]; then
        AUDIT_UNAVAILABLE="audit rules are locked (\`auditctl -s\`: enabled 2) until reboot"
        AUDIT_ORIG_ENABLED="" AUDIT_ORIG_BACKLOG=""
    elif [ -n "$pid" ] && [ "$pid" != 0 ] && kill -0 "$pid" 2>/dev/null; then
        AUDIT_OWN=0
        AUDITD_EXISTING="$pid"
        log "auditd is already running (pid $pid): using it; only the watch rule is added and removed"
    fi
    KAUDITD_PID="$(pgrep -x kauditd | head -n 1 || true)"
fi

# auditd's own configuration: the system's, with the log in the scratch dir (it can grow by
# hundreds of MB during the loop; auditd rotates it at max_log_file).
mkdir -p "$TMP/audit"
if [ -r /etc/audit/auditd.conf ]; then
    sed -e 's|^ *log_file *=.*|log_file = '"$TMP"'/audit/audit.log|' /etc/audit/auditd.conf >"$TMP/audit/auditd.conf"
else
    printf 'log_file = %s/audit/audit.log\nlog_format = ENRICHED\nflush = INCREMENTAL_ASYNC\nfreq = 50\nmax_log_file = 8\nnum_logs = 5\nmax_log_file_action = ROTATE\n' "$TMP" >"$TMP/audit/auditd.conf"
fi
chmod 0640 "$TMP/audit/auditd.conf"
# The log the drain waits on (a marker written after the workload must show in it); for an
# auditd that was already running, the system's log, if it can be found.
AUDIT_LOG="$TMP/audit/audit.log"
if [ "$AUDIT_OWN" = 0 ]; then
    AUDIT_LOG="$(awk -F' *= *' '$1 ~ /^ *log_file$/ { print $2 }' /etc/audit/auditd.conf 2>/dev/null || true)"
    [ -f "$AUDIT_LOG" ] || AUDIT_LOG=""
fi

# start_auditd: auditd running and registered with the kernel, our backlog limit and the
# watch rule on the tree. Sets AUDITD_PID (when we started it) and MON_PIDS.
start_auditd() {
    local i pid=""
    if [ "$AUDIT_OWN" = 1 ]; then
        auditd -n -c "$TMP/audit" >"$TMP/auditd.out" 2>&1 &
        AUDITD_PID=$!
        for i in $(seq 100); do
            pid="$(audit_field pid)"
            [ "$pid" = "$AUDITD_PID" ] && break
            kill -0 "$AUDITD_PID" 2>/dev/null || break
            sleep 0.1
        done
        if [ "$pid" != "$AUDITD_PID" ]; then
            stop_pid "$AUDITD_PID" auditd || true
            AUDITD_PID=""
            return 1
        fi
        MON_PIDS="$pid"
    else
        MON_PIDS="$AUDITD_EXISTING"
    fi
    [ -z "${KAUDITD_PID:-}" ] || MON_PIDS="$MON_PIDS,$KAUDITD_PID"
    auditctl -b "$AUDIT_BACKLOG" >/dev/null || return 1
    auditctl -w "$TREE" -p wa -k "$AUDIT_KEY" >"$TMP/auditctl.out" 2>&1 || return 1
    AUDIT_RULE=1
}

stop_auditd() {
    audit_rule_remove
    if [ -n "$AUDITD_PID" ]; then
        stop_pid "$AUDITD_PID" auditd || true
        AUDITD_PID=""
    fi
}

if [ -z "$AUDIT_UNAVAILABLE" ]; then
    log "auditd: checking that it starts and takes a watch rule"
    if start_auditd; then
        stop_auditd
    else
        AUDIT_UNAVAILABLE="auditd did not start or register: $(cat "$TMP/auditd.out" "$TMP/auditctl.out" 2>/dev/null | tr '\n|' ' /' | sed 's/ *$//')"
        audit_rule_remove
    fi
fi
[ -z "$AUDIT_UNAVAILABLE" ] || log "auditd: unavailable ($AUDIT_UNAVAILABLE)"

# ------------------------------------------------------------------------- measuring --
# reset: the tree as before any workload (empty loop files, empty extraction dir), and
# nothing dirty in the page cache. Monitors are stopped while this runs.
reset_tree() {
    rm -rf -- "$TREE/x"
    mkdir "$TREE/x"
    find "$TREE/loop" -type f -exec truncate -s 0 {} +
    : >"$TREE/probe/latency"
    rm -f -- "$TREE/probe/marker-"*
    sync
}

workload_cmd() {
    case "$1" in
        loop) WORKLOAD=("$TMP/loop" "$TREE/loop" "$LOOP_FILES" "$LOOP_ITERS") ;;
        tar) WORKLOAD=(tar -xf "$TMP/src.tar" -C "$TREE/x") ;;
    esac
}

# expected WORKLOAD FILE: the tree's state after the workload, as `check` reads it.
expected() {
    local dir="$TREE/loop"
    [ "$1" = tar ] && dir="$TREE/x"
    find "$dir" -mindepth 1 \( -type d -printf '%p -\n' \) -o -printf '%p %s\n' >"$2"
}

# run_one WORKLOAD CONFIG RUN TIMED: one cell of the matrix (events: the monitor's output
# file, whose growth says it is still working); when TIMED=1, appends
# "WORKLOAD CONFIG RUN <measure's fields>" to $TMP/results and notes to $TMP/checks.
run_one() {
    local wl="$1" cfg="$2" run="$3" timed="$4" events="" marker="" out rc lost0="" lost1
    MON_PIDS=""
    reset_tree
    case "$cfg" in
        kubefim)
            baseline tree
            events="$TMP/events/$wl-$run.jsonl"
            start_kubefim tree "$events"
            MON_PIDS="$WATCH_PID"
            ;;
        kubefim-other)
            events="$TMP/events/$wl-other-$run.jsonl"
            start_kubefim other "$events"
            MON_PIDS="$WATCH_PID"
            ;;
        auditd)
            [ "$AUDIT_OWN" = 0 ] || rm -f -- "$TMP/audit/audit.log"*
            start_auditd || fail "auditd did not start: $(cat "$TMP/auditd.out" "$TMP/auditctl.out" 2>/dev/null)"
            events="$AUDIT_LOG"
            [ -z "$events" ] || marker="$TREE/probe/marker-$wl-$run-$timed"
            lost0="$(audit_field lost)"
            ;;
    esac
    workload_cmd "$wl"
    out="$(py measure "$MON_PIDS" "$events" "$marker" "$TMP/workload.err" -- "${WORKLOAD[@]}")" ||
        fail "measuring $wl under $cfg failed"
    rc="${out%% *}"
    [ "$rc" = 0 ] || fail "$wl workload exited $rc under $cfg: $(tail -n 5 "$TMP/workload.err")"
    case "$cfg" in
        kubefim | kubefim-other) stop_kubefim ;;
        auditd)
            lost1="$(audit_field lost)"
            stop_auditd
            ;;
    esac
    [ "$timed" = 1 ] || return 0
    echo "$wl $cfg $run $out" >>"$TMP/results"
    read -r _ wall _ _ mu ms _ machs drain others _ <<<"$out"
    log "  $wl $cfg: wall ${wall}s, machine sys ${machs}s, monitor ${mu}+${ms}s, drain ${drain}s, others' user ${others}s"
    case "$cfg" in
        kubefim)
            expected "$wl" "$TMP/expected"
            local ok total lines lost rescans
            read -r ok total lines lost rescans < <(py check "$events" "$TMP/expected")
            log "  kubefim reported the final state of $ok/$total paths ($lines change lines, $lost lost events, $rescans rescans)"
            echo "$wl $cfg $run reported $ok $total $lines $lost" >>"$TMP/checks"
            ;;
        kubefim-other)
            local n
            n="$(grep -c '"path"' "$events" || true)"
            echo "$wl $cfg $run lines $n" >>"$TMP/checks"
            ;;
        auditd)
            echo "$wl $cfg $run lost $((lost1 - lost0))" >>"$TMP/checks"
            ;;
    esac
    # The scratch dir would otherwise hold every run's events and audit logs.
    [ -z "$events" ] || [ "$cfg" = auditd ] || : >"$events"
    [ "$AUDIT_OWN" = 0 ] || rm -f -- "$TMP/audit/audit.log"*
}

CONFIGS=(none kubefim kubefim-other)
[ -n "$AUDIT_UNAVAILABLE" ] || CONFIGS+=(auditd)

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
read -r IDLE_USER IDLE_SYS < <(py idle 2)
log "machine before the runs: load average $LOAD_BEFORE; ${IDLE_USER} CPUs busy in user, ${IDLE_SYS} in system mode"

: >"$TMP/results"
: >"$TMP/checks"
log "warming the page cache and the binaries (one untimed pass of each workload, no monitor)"
for wl in loop tar; do run_one "$wl" none 0 0; done
for run in $(seq "$RUNS"); do
    for wl in loop tar; do
        log "overhead: $wl, run $run/$RUNS"
        for cfg in "${CONFIGS[@]}"; do run_one "$wl" "$cfg" "$run" 1; done
    done
done

# Latency: a monitored file, appended to and closed LAT_SAMPLES times, ~20 ms apart.
: >"$TMP/latency"
for run in $(seq "$RUNS"); do
    log "latency: run $run/$RUNS ($LAT_SAMPLES probes)"
    reset_tree
    baseline tree
    start_kubefim tree "$TMP/events/latency.jsonl"
    read -r p50 p99 max ok missed < <(py latency "$TREE/probe/latency" "$TMP/events/latency.jsonl" "$LAT_SAMPLES" "$LAT_INTERVAL_MS")
    stop_kubefim
    log "  p50 ${p50} ms, p99 ${p99} ms, max ${max} ms, $ok reported, $missed missed"
    echo "$run $p50 $p99 $max $ok $missed" >>"$TMP/latency"
done

# Memory: kubefim watch with a RSS_FILES-file baseline, once ready.
log "memory: generating $RSS_FILES files and their baseline"
py gen "$RSS_TREE" "$RSS_FILES" "$((RSS_FILES * 100))"
start="$EPOCHREALTIME"
baseline rss
RSS_BASELINE_S="$(awk -v s="$start" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.2f", e - s }')"
RSS_ENTRIES="$(grep -o '[0-9]* entries' "$TMP/baseline-rss.out" | grep -o '^[0-9]*' || echo '?')"
: >"$TMP/memory"
for run in $(seq "$RUNS"); do
    start="$EPOCHREALTIME"
    start_kubefim rss "$TMP/events/rss.jsonl"
    ready_s="$(awk -v s="$start" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.2f", e - s }')"
    sleep 1
    hwm="$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$WATCH_PID/status")"
    rss="$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$WATCH_PID/status")"
    stop_kubefim
    log "  memory run $run/$RUNS: VmHWM $((hwm / 1024)) MiB, VmRSS $((rss / 1024)) MiB, ready in ${ready_s}s"
    echo "$run $hwm $rss $ready_s" >>"$TMP/memory"
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# -------------------------------------------------------------------------- report --
med_col() { awk -v f="$2" '{ print $f }' "$1" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN { ok = (op == "<" ? v < t : v <= t); print (ok ? "met" : "NOT met") }'; }
version_of() { "$@" 2>&1 | head -n 1 || true; }

LAT_P50="$(med_col "$TMP/latency" 2)"
LAT_P99="$(med_col "$TMP/latency" 3)"
LAT_MAX="$(awk '$4 > m { m = $4 } END { print m + 0 }' "$TMP/latency")"
LAT_MISSED="$(awk '{ m += $6; n += $5 + $6 } END { printf "%d of %d", m, n }' "$TMP/latency")"
HWM_MB="$(awk -v k="$(med_col "$TMP/memory" 2)" 'BEGIN { printf "%.1f", k / 1024 }')"
RSS_MB="$(awk -v k="$(med_col "$TMP/memory" 3)" 'BEGIN { printf "%.1f", k / 1024 }')"
READY_S="$(med_col "$TMP/memory" 4)"

echo "# kubefim watch vs no monitor vs auditd"
echo
echo "- command: \`$CMDLINE\`"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) CPUs, $(uname -sr), $FSTYPE on $(findmnt -n -o SOURCE -T "$TMP" 2>/dev/null || echo '?')"
echo "- $(version_of "$KUBEFIM_BIN" --version) ($KUBEFIM_SRC, built $KUBEFIM_SRC_MTIME); $([ -n "$AUDIT_UNAVAILABLE" ] || echo "$(version_of auditctl -v); ")$(version_of tar --version); $(version_of gcc --version)"
echo "- background load: average $LOAD_BEFORE before, $LOAD_AFTER after; ${IDLE_USER} CPUs busy in user and ${IDLE_SYS} in system mode over 2 s before the runs (other users' work is in the machine columns, not in the attributed ones)"
echo "- loop: $LOOP_ITERS x open(O_WRONLY|O_APPEND) + write(64 B) + close over $LOOP_FILES files (C, gcc -O2)"
echo "- tar: \`tar -xf src.tar -C TREE/x\`, $TAR_ENTRIES entries, $(awk -v b="$TAR_BYTES" 'BEGIN { printf "%.0f MB", b / 1048576 }') in $TAR_FILES files"
echo "- TREE (the monitored tree) holds the loop files, the extraction dir and the latency probe file; the \"tree not monitored\" watcher's baseline is 100 files elsewhere"
if [ -z "$AUDIT_UNAVAILABLE" ]; then
    echo "- auditd: \`auditctl -w TREE -p wa\`, \`auditctl -b $AUDIT_BACKLOG\`, log in the scratch dir ($(awk -F' *= *' '$1 == "flush" || $1 == "log_format" { printf "%s%s = %s", s, $1, $2; s = ", " }' "$TMP/audit/auditd.conf"))$([ "$AUDIT_OWN" = 1 ] || echo ', auditd already running: its own configuration')"
else
    echo "- auditd: unavailable ($AUDIT_UNAVAILABLE)"
fi
echo "- method: median of $RUNS runs, round-robin over the monitors, warm page cache, \`sync\` before each run"
echo
echo "## Overhead"
echo
py report "$TMP/results" "$TMP/checks" "$AUDIT_UNAVAILABLE"
echo
echo "- wall s: the workload's. CPU s are CPU-seconds. machine sys s: /proc/stat system time of all CPUs from the workload's start until the monitor was done with it; drain s: that end, after the workload's (kubefim: the last moment it wrote output or used CPU, followed by 1 s of neither; auditd: a marker file appended to after the workload showed in its log)."
echo "- monitor CPU s: utime+stime of the monitor (kubefim watch; auditd + kauditd)."
echo "- added CPU % (machine): (machine sys s + monitor user s) against no monitor's machine sys s, in the same run; median of the runs."
echo "- added CPU % (attributed): (workload sys s + monitor CPU s) against no monitor's workload sys s: the eBPF programs and audit hooks run in the workload's system time; blind to other users of the machine."
echo
echo "## Latency and memory (kubefim watch)"
echo
echo "| measure | value | target |"
echo "| --- | ---: | --- |"
echo "| detection latency p50, close() -> line in the output | $LAT_P50 ms | |"
echo "| detection latency p99 | $LAT_P99 ms | < 100 ms: $(verdict "$LAT_P99" 100 '<') |"
echo "| detection latency max (all runs) | $LAT_MAX ms | |"
echo "| probes never reported (5 s timeout) | $LAT_MISSED | 0 |"
echo "| VmHWM once ready, $RSS_ENTRIES-entry baseline | $HWM_MB MB | <= 100 MB: $(verdict "$HWM_MB" 100 '<=') |"
echo "| VmRSS once ready | $RSS_MB MB | |"
echo "| start to ready (incl. its startup rescan) | $READY_S s | |"
echo "| baseline create of that tree (once) | $RSS_BASELINE_S s | |"
echo
echo "Latency: $LAT_SAMPLES probes a run, ${LAT_INTERVAL_MS} ms apart; each appends 64 B to a monitored file, closes it, and waits for the change line showing the new size; arrival is seen by polling the output file every 0.5 ms (latency p50/p99: median over the runs). Memory: /proc/PID/status 1 s after the ready file appeared; eBPF maps are kernel memory and not in it."
echo
echo "Raw per run (workload monitor run: rc wall user sys monitor_user monitor_sys machine_user machine_sys drain others_user timeout):"
echo
echo '```'
cat "$TMP/results"
echo "latency (run p50 p99 max ok missed):"
cat "$TMP/latency"
echo "memory (run VmHWM_kB VmRSS_kB ready_s):"
cat "$TMP/memory"
echo '```'
