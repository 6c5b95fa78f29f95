//! The Markdown report on stdout: the command line, the machine and the binary, what each
//! size reused or made, a table of medians, and every raw sample after it.

use std::fmt::Write as _;

use kubefim_benches::fixture::Binary;
use kubefim_benches::host;
use kubefim_benches::stats::median;

use crate::run::{Sample, mib};

/// Everything measured for one size.
pub struct SizeResult {
    pub label: String,
    pub files: u64,
    /// What was reused or made, one line each.
    pub setup: Vec<String>,
    pub samples: Vec<Sample>,
}

/// The facts printed before the table.
pub fn header(command: &str, kubefim: &Binary) -> String {
    format!(
        "# kubefim watch: start-up and memory against the baseline size\n\n- command: `{command}`\n- date: {}\n         - machine: {}, load average at start {}\n- binary: {}\n",
        host::now(),
        host::machine(),
        host::load(),
        kubefim.describe()
    )
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

/// Bytes of the kernel maps of one sample, in MiB.
fn maps_mib(s: &Sample) -> Option<f64> {
    s.kernel_maps.as_ref().map(|m| m.values().sum::<u64>() as f64 / (1 << 20) as f64)
}

/// The setup lines, the table and the raw samples.
pub fn body(results: &[SizeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out);
    for r in results {
        for line in &r.setup {
            let _ = writeln!(out, "- {}: {line}", r.label);
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| size (files) | runs | ready s | RSS at ready MB | HWM at ready MB | rescan done s | RSS after rescan MB | HWM after rescan MB | first event ms | kernel maps MB |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        let col = |f: &dyn Fn(&Sample) -> Option<f64>| median(&r.samples.iter().filter_map(f).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.files,
            r.samples.len(),
            cell(col(&|s| Some(s.ready_s)), 2),
            cell(col(&|s| Some(mib(s.at_ready.rss_kib))), 1),
            cell(col(&|s| Some(mib(s.at_ready.hwm_kib))), 1),
            cell(col(&|s| Some(s.startup.stamp_s)), 2),
            cell(col(&|s| Some(mib(s.startup.memory.rss_kib))), 1),
            cell(col(&|s| Some(mib(s.startup.memory.hwm_kib))), 1),
            cell(col(&|s| Some(s.first_event_ms)), 1),
            cell(col(&maps_mib), 1),
        );
    }
    let mut by: Vec<&str> = results.iter().flat_map(|r| &r.samples).map(|s| s.startup.by.as_str()).collect();
    by.sort_unstable();
    by.dedup();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Medians. MB are MiB. \"ready\": spawn to the ready file. \"rescan done\": spawn to the `time` of the first \
         line with reason `startup` (here: `{}`), memory sampled when the harness read that line. \"first event\": \
         an append to a monitored file, right after ready, to its `modified` line. \"kernel maps\": memlock of the \
         watcher's {} maps (bpftool).",
        by.join("`, `"),
        kubefim_benches::procfs::KERNEL_MAPS.join(", ")
    );
    let _ = writeln!(out, "\n## Raw samples\n");
    for r in results {
        for (i, s) in r.samples.iter().enumerate() {
            let _ = writeln!(out, "- {}", raw_line(&r.label, i + 1, s));
        }
    }
    out
}

/// One sample, every number the run has.
pub fn raw_line(label: &str, run: usize, s: &Sample) -> String {
    let st = &s.startup;
    let mut line = format!(
        "{label} run {run}: ready {:.2} s (cpu {:.1} s), RSS {:.1} MB, HWM {:.1} MB; startup `{}` line at {:.2} s \
         (read at {:.2} s{}), then RSS {:.1} MB, HWM {:.1} MB; first event {:.1} ms",
        s.ready_s,
        s.cpu_at_ready_s,
        mib(s.at_ready.rss_kib),
        mib(s.at_ready.hwm_kib),
        st.by,
        st.stamp_s,
        st.read_s,
        st.own_s.map_or_else(String::new, |o| format!(", its own {o:.2} s")),
        mib(st.memory.rss_kib),
        mib(st.memory.hwm_kib),
        s.first_event_ms,
    );
    if let Some(maps) = &s.kernel_maps {
        let each: Vec<String> =
            maps.iter().map(|(n, b)| format!("{n} {:.1} MB", *b as f64 / (1 << 20) as f64)).collect();
        let _ = write!(line, "; kernel maps {}", each.join(", "));
    }
    let count = |v: Option<u64>| v.map_or_else(|| "?".into(), |n| n.to_string());
    let _ = write!(
        line,
        "; scanned {}, baseline entries {}; before SIGTERM RSS {:.1} MB, HWM {:.1} MB",
        count(s.scanned),
        count(s.baseline_entries),
        mib(s.memory_at_exit.rss_kib),
        mib(s.memory_at_exit.hwm_kib)
    );
    let _ = write!(line, "; timeline {}", s.timeline.join(" "));
    if !s.degraded.is_empty() {
        let _ = write!(line, "; DEGRADED: {}", s.degraded.join("; "));
    }
    line
}
