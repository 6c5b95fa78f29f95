//! fimbench: kubefim side by side with its peers, as Markdown tables with the command that
//! made them. `watch`: what `kubefim watch` costs a workload next to no monitor and auditd,
//! its detection latency and memory. `compare`: `baseline create` and `verify` against
//! `find | xargs b3sum` and aide, with peak RSS against the tree's size. The workloads are
//! this binary again (`workload`, hidden), so the process measured is a real child. Run as
//! root; see benches/README.md. Progress goes to stderr, the report to stdout.

mod compare;
mod interrupt;
mod watch;
mod workload;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

/// kubefim against no monitor, auditd, b3sum and aide (root only).
#[derive(Parser)]
#[command(name = "fimbench")]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// `kubefim watch` vs no monitor vs auditd: overhead, latency, memory.
    Watch(watch::WatchArgs),
    /// `baseline create` and `verify` vs `find | xargs b3sum` vs aide, on real and generated trees.
    Compare(compare::CompareArgs),
    /// A workload, run by `watch` as its measured child.
    #[command(hide = true, subcommand)]
    Workload(workload::Workload),
}

fn main() {
    if let Err(e) = try_main() {
        eprintln!("fimbench: error: {e:#}");
        std::process::exit(1);
    }
}

/// The kubefim binary: the flag's, or the workspace's release build.
fn kubefim(flag: Option<&PathBuf>) -> PathBuf {
    flag.cloned().unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/kubefim")))
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    if let Mode::Workload(w) = &cli.command {
        return workload::run(w);
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "fimbench needs root: kubefim watch loads eBPF programs, auditctl changes kernel rules, and every tool must read every file"
        );
    }
    interrupt::install()?;
    match &cli.command {
        Mode::Watch(args) => watch::main(args, &kubefim(args.kubefim.as_ref())),
        Mode::Compare(args) => compare::main(args, &kubefim(args.kubefim.as_ref())),
        Mode::Workload(_) => unreachable!("handled above"),
    }
}
