//! The watch benchmark's Markdown: the facts of the run, the overhead table (medians of the
//! runs, ratios and added CPU against no monitor in the same run), the latency and memory
//! table with the targets, and every raw sample.

use std::fmt::Write as _;

use kubefim_benches::host;
use kubefim_benches::markdown::{Align, Table, command_line, num};
use kubefim_benches::stats::{added_percent, median, percentile, ratio};

use super::{Cell, Monitor, Sizes, WatcherRun, WorkloadKind};

/// What the header says besides the tables.
pub struct Facts<'a> {
    pub kubefim: String,
    pub fs: String,
    pub load_before: String,
    pub load_after: String,
    /// CPUs busy in user and system mode over 2 s before the runs.
    pub idle: (f64, f64),
    pub sizes: &'a Sizes,
    pub runs: u32,
    /// Entries and bytes of the tarball.
    pub tar_entries: (usize, u64),
    pub audit_unavailable: Option<String>,
    /// auditd's configuration summary, and whether it was already running.
    pub audit_conf: Option<(String, bool)>,
    pub audit_backlog: u32,
    pub rss_entries: u64,
    pub rss_baseline_s: f64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The added CPU % of a cell against the same run's no-monitor cell: `machine` counts every
/// CPU's system time plus the monitor's user time; `attributed`, the workload's own system
/// time plus the monitor's CPU.
fn added(cells: &[Cell], c: &Cell, machine: bool) -> Option<f64> {
    let base = cells.iter().find(|b| b.workload == c.workload && b.run == c.run && b.monitor == Monitor::None)?;
    let (b, s) = (&base.sample, &c.sample);
    if machine {
        added_percent(s.machine_sys_s + s.monitor_user_s, b.machine_sys_s)
    } else {
        added_percent(s.sys_s + s.monitor_s(), b.sys_s)
    }
}

fn wall_ratio(cells: &[Cell], c: &Cell) -> Option<f64> {
    let base = cells.iter().find(|b| b.workload == c.workload && b.run == c.run && b.monitor == Monitor::None)?;
    ratio(c.sample.wall_s, base.sample.wall_s)
}

fn note(runs: &[&Cell]) -> String {
    let Some(first) = runs.first() else { return String::new() };
    let list = |f: &dyn Fn(&Cell) -> Option<String>| runs.iter().filter_map(|c| f(c)).collect::<Vec<_>>().join(", ");
    let mut note = match first.monitor {
        Monitor::Kubefim => {
            let all = runs.iter().all(|c| c.reported.is_some_and(|r| r.final_states == r.expected));
            let total = first.reported.map_or(0, |r| r.expected);
            let mut text = if all {
                format!("final state of all {total} paths reported in every run")
            } else {
                format!(
                    "final state reported, per run: {} paths",
                    list(&|c| c.reported.map(|r| format!("{}/{}", r.final_states, r.expected)))
                )
            };
            let _ = write!(
                text,
                "; lost events: {}; change lines: {}",
                list(&|c| c.reported.map(|r| r.lost.to_string())),
                list(&|c| c.reported.map(|r| r.lines.to_string()))
            );
            let rescans = list(&|c| c.reported.filter(|r| r.rescans > 0).map(|r| r.rescans.to_string()));
            if !rescans.is_empty() {
                let _ = write!(text, "; rescans: {rescans}");
            }
            text
        }
        Monitor::KubefimOther if runs.iter().any(|c| c.other_lines.is_some_and(|n| n > 0)) => {
            format!("change lines (expected none): {}", list(&|c| c.other_lines.map(|n| n.to_string())))
        }
        Monitor::Auditd => format!(
            "kernel audit `lost`, per run: {} (counts every process's records)",
            list(&|c| c.audit_lost.map(|n| format!("+{n}")))
        ),
        _ => String::new(),
    };
    if runs.iter().any(|c| c.sample.timed_out) {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str("monitor still busy 300 s after the workload");
    }
    note
}

fn overhead(facts: &Facts, cells: &[Cell]) -> Table {
    let r = Align::Right;
    let l = Align::Left;
    let mut t = Table::new(&[
        ("workload", l),
        ("monitor", l),
        ("wall s", r),
        ("wall ratio", r),
        ("workload user s", r),
        ("workload sys s", r),
        ("monitor CPU s", r),
        ("machine sys s", r),
        ("added CPU % (machine)", r),
        ("added CPU % (attributed)", r),
        ("drain s", r),
        ("target", l),
        ("notes", l),
    ]);
    let mut workloads: Vec<WorkloadKind> = Vec::new();
    for c in cells {
        if !workloads.contains(&c.workload) {
            workloads.push(c.workload);
        }
    }
    let med_of = |v: Vec<f64>| median(&v);
    for w in workloads {
        for m in [Monitor::None, Monitor::Kubefim, Monitor::KubefimOther, Monitor::Auditd] {
            if m == Monitor::Auditd
                && let Some(why) = &facts.audit_unavailable
            {
                t.row([w.name().to_owned(), m.label().to_owned(), format!("auditd: unavailable ({why})")]);
                continue;
            }
            let runs: Vec<&Cell> = cells.iter().filter(|c| c.workload == w && c.monitor == m).collect();
            if runs.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&Cell) -> f64| med_of(runs.iter().map(|c| f(c)).collect());
            let am = med_of(runs.iter().filter_map(|c| added(cells, c, true)).collect());
            let aa = med_of(runs.iter().filter_map(|c| added(cells, c, false)).collect());
            let none = m == Monitor::None;
            let target = match m {
                Monitor::KubefimOther => {
                    let ok = |v: Option<f64>| verdict(v.is_some_and(|v| v <= 3.0));
                    format!("<= 3%: {} (machine), {} (attributed)", ok(am), ok(aa))
                }
                Monitor::Kubefim => {
                    let audit: Vec<&Cell> =
                        cells.iter().filter(|c| c.workload == w && c.monitor == Monitor::Auditd).collect();
                    if audit.is_empty() {
                        "below auditd: n/a (no auditd rows)".into()
                    } else {
                        let bm = med_of(audit.iter().filter_map(|c| added(cells, c, true)).collect());
                        let ba = med_of(audit.iter().filter_map(|c| added(cells, c, false)).collect());
                        let below =
                            |a: Option<f64>, b: Option<f64>| verdict(matches!((a, b), (Some(a), Some(b)) if a < b));
                        format!("below auditd: {} (machine), {} (attributed)", below(am, bm), below(aa, ba))
                    }
                }
                _ => String::new(),
            };
            let pct = |v: Option<f64>| {
                if none { String::new() } else { v.map_or_else(|| "n/a".into(), |v| format!("{v:+.1}")) }
            };
            t.row([
                w.name().to_owned(),
                m.label().to_owned(),
                num(med(&|c| c.sample.wall_s), 3),
                if none {
                    "1.00".into()
                } else {
                    num(med_of(runs.iter().filter_map(|c| wall_ratio(cells, c)).collect()), 2)
                },
                num(med(&|c| c.sample.user_s), 2),
                num(med(&|c| c.sample.sys_s), 2),
                if none { String::new() } else { num(med(&|c| c.sample.monitor_s()), 2) },
                num(med(&|c| c.sample.machine_sys_s), 2),
                pct(am),
                pct(aa),
                if none { String::new() } else { num(med(&|c| c.sample.drain_s), 2) },
                target,
                note(&runs),
            ]);
        }
    }
    t
}

fn latency_memory(facts: &Facts, runs: &[WatcherRun]) -> Table {
    let all: Vec<f64> = runs.iter().flat_map(|r| r.latencies_ms.iter().copied()).collect();
    let (p50, p99, max) = (percentile(&all, 0.5), percentile(&all, 0.99), percentile(&all, 1.0));
    let missed: usize = runs.iter().map(|r| r.missed).sum();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let hwm = median(&runs.iter().map(|r| mib(r.hwm_kib)).collect::<Vec<_>>());
    let rss = median(&runs.iter().map(|r| mib(r.rss_kib)).collect::<Vec<_>>());
    let ready = median(&runs.iter().map(|r| r.ready_s).collect::<Vec<_>>());
    let mut t = Table::new(&[("measure", Align::Left), ("value", Align::Right), ("target", Align::Left)]);
    t.row([
        "detection latency p50, close() -> line in the output".into(),
        format!("{} ms", num(p50, 2)),
        String::new(),
    ]);
    t.row([
        "detection latency p99".into(),
        format!("{} ms", num(p99, 2)),
        format!("< 100 ms: {}", verdict(p99.is_some_and(|p| p < 100.0))),
    ]);
    t.row(["detection latency max".into(), format!("{} ms", num(max, 2)), String::new()]);
    t.row(["probes never reported (5 s timeout)".into(), format!("{missed} of {}", missed + all.len()), "0".into()]);
    t.row([
        format!("VmHWM 1 s after ready, {}-entry baseline", facts.rss_entries),
        format!("{} MB", num(hwm, 1)),
        format!("<= 100 MB: {}", verdict(hwm.is_some_and(|h| h <= 100.0))),
    ]);
    t.row(["VmRSS 1 s after ready".into(), format!("{} MB", num(rss, 1)), String::new()]);
    t.row(["start to ready (incl. its startup rescan)".into(), format!("{} s", num(ready, 2)), String::new()]);
    t.row(["baseline create of that tree (once)".into(), format!("{:.2} s", facts.rss_baseline_s), String::new()]);
    t
}

pub fn render(facts: &Facts, cells: &[Cell], runs: &[WatcherRun]) -> String {
    let s = facts.sizes;
    let mut out = String::new();
    let _ = writeln!(out, "# kubefim watch vs no monitor vs auditd\n");
    let _ = writeln!(out, "- command: `{}`", command_line());
    let _ = writeln!(out, "- date: {}; machine: {}; scratch on {}", host::now(), host::machine(), facts.fs);
    let _ = writeln!(
        out,
        "- {}; {}; {}",
        facts.kubefim,
        if facts.audit_unavailable.is_some() {
            "auditd unavailable".into()
        } else {
            host::version_of("auditctl", &["-v"])
        },
        host::version_of("tar", &["--version"])
    );
    let _ = writeln!(
        out,
        "- background load: average {} before, {} after; {:.2} CPUs busy in user and {:.2} in system mode over 2 s before the runs (other users' work is in the machine columns, not in the attributed ones)",
        facts.load_before, facts.load_after, facts.idle.0, facts.idle.1
    );
    let _ = writeln!(
        out,
        "- loop: {} x open(O_WRONLY|O_APPEND) + write(64 B) + close over {} files; append: {} x write(64 B) to one file opened once (both `fimbench workload`, a child process)",
        s.loop_iters, s.loop_files, s.append_writes
    );
    let _ = writeln!(
        out,
        "- tar: `tar -xf src.tar -C TREE/x`, {} entries, {:.0} MB in {} files",
        facts.tar_entries.0,
        facts.tar_entries.1 as f64 / (1 << 20) as f64,
        s.tar_files
    );
    let _ = writeln!(
        out,
        "- TREE (the monitored tree) holds the loop files, the extraction dir, the appended file and the latency probe file; the \"tree not monitored\" watcher's baseline is 100 files elsewhere"
    );
    match (&facts.audit_unavailable, &facts.audit_conf) {
        (Some(why), _) => {
            let _ = writeln!(out, "- auditd: unavailable ({why})");
        }
        (None, Some((conf, preexisting))) => {
            let _ = writeln!(
                out,
                "- auditd: `auditctl -w TREE -p wa`, `auditctl -b {}`, {}{}",
                facts.audit_backlog,
                if *preexisting { "already running: its own configuration" } else { "log in the scratch dir" },
                if conf.is_empty() { String::new() } else { format!(" ({conf})") }
            );
        }
        (None, None) => {}
    }
    let _ = writeln!(
        out,
        "- method: median of {} runs, round-robin over the monitors, warm page cache, `sync` before each cell; CPU and peak RSS from wait4's rusage, monitors from /proc",
        facts.runs
    );
    let _ = writeln!(out, "\n## Overhead\n\n{}", overhead(facts, cells));
    let _ = writeln!(
        out,
        "- wall s: the workload's. CPU s are CPU-seconds. machine sys s: /proc/stat system time of all CPUs from the workload's start until the monitor was done with it; drain s: that end, after the workload's (kubefim: the last moment it wrote output or used CPU, followed by 1 s of neither; auditd: a marker file appended to after the workload showed in its log).\n\
         - monitor CPU s: utime+stime of the monitor (kubefim watch; auditd + kauditd).\n\
         - added CPU % (machine): (machine sys s + monitor user s) against no monitor's machine sys s, in the same run; median of the runs.\n\
         - added CPU % (attributed): (workload sys s + monitor CPU s) against no monitor's workload sys s: the eBPF programs and audit hooks run in the workload's system time; blind to other users of the machine."
    );
    let _ = writeln!(out, "\n## Latency and memory (kubefim watch)\n\n{}", latency_memory(facts, runs));
    let _ = writeln!(
        out,
        "Latency: {} probes a run, {} ms apart, percentiles over all runs' probes; each appends 64 B to a monitored file, closes it, and waits for the change line showing the new size, seen by polling the output file every 0.5 ms. Memory: /proc/PID/status 1 s after the ready file appeared; eBPF maps are kernel memory and not in it.",
        s.lat_samples,
        super::LAT_INTERVAL.as_millis()
    );
    let _ = writeln!(
        out,
        "\nRaw per run (workload monitor run: rc wall user sys monitor_user monitor_sys machine_user machine_sys drain others_user timeout):\n\n```"
    );
    for c in cells {
        let s = &c.sample;
        let _ = writeln!(
            out,
            "{} {:?} {} {} {:.3} {:.3} {:.3} {:.2} {:.2} {:.2} {:.2} {:.3} {:.2} {}",
            c.workload.name(),
            c.monitor,
            c.run,
            s.code,
            s.wall_s,
            s.user_s,
            s.sys_s,
            s.monitor_user_s,
            s.monitor_sys_s,
            s.machine_user_s,
            s.machine_sys_s,
            s.drain_s,
            s.others_user_s(),
            u8::from(s.timed_out)
        );
    }
    let _ = writeln!(out, "latency and memory (run p50_ms p99_ms max_ms reported missed VmHWM_kB VmRSS_kB ready_s):");
    for r in runs {
        let l = &r.latencies_ms;
        let _ = writeln!(
            out,
            "{} {} {} {} {} {} {} {} {:.2}",
            r.run,
            num(percentile(l, 0.5), 2),
            num(percentile(l, 0.99), 2),
            num(percentile(l, 1.0), 2),
            l.len(),
            r.missed,
            r.hwm_kib,
            r.rss_kib,
            r.ready_s
        );
    }
    let _ = writeln!(out, "```");
    out
}
