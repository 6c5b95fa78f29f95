//! watch_scale: how `kubefim watch`'s start-up time and memory grow with the baseline.
//! For each size N: a tree of N files (made once, reused), keys, a one-rule policy and a
//! signed baseline (reused while the same binary made them), then RUNS runs of the watcher,
//! each timed to its ready file, to the end of its startup rescan and to its first event,
//! with its memory sampled at each. A benchmark run by hand as root, not a test: see
//! benches/README.md. Progress goes to stderr, the Markdown report to stdout.

mod report;
mod run;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;

use kubefim_benches::fixture::{Binary, Fixture};
use kubefim_benches::markdown::command_line;
use kubefim_benches::tree::{Tree, label, parse_size};

use crate::report::SizeResult;
use crate::run::RunOptions;

/// Measure `kubefim watch`'s start-up time and memory against the baseline size (root only).
#[derive(Parser)]
#[command(name = "watch_scale")]
struct Args {
    /// Baseline sizes, in files: comma-separated, with an optional k or m suffix.
    #[arg(long, value_delimiter = ',', default_value = "100k,1m", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Runs per size; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Where trees, keys, policies and baselines are kept between invocations
    /// (tSIZE/, keys/, pSIZE.yaml, dbSIZE; e.g. t1m for 1m). Must be on a disk-backed file
    /// system, not tmpfs.
    #[arg(long, default_value = "/var/tmp/kubefim-scale")]
    root: PathBuf,
    /// The kubefim binary to measure (default: the workspace's target/release/kubefim).
    #[arg(long, env = "KUBEFIM")]
    kubefim: Option<PathBuf>,
    /// Make the baselines anew even when this binary made them.
    #[arg(long, conflicts_with = "reuse_baseline")]
    rebaseline: bool,
    /// Reuse any sealed baseline, even one made by another binary or by hand.
    #[arg(long)]
    reuse_baseline: bool,
    /// How long one watcher may take to write its ready file and finish its startup rescan.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    start_timeout: Duration,
    /// Do not measure the kernel memory of the eBPF maps (needs bpftool).
    #[arg(long)]
    no_kernel_maps: bool,
    /// Copy the watcher's stderr to ours.
    #[arg(long)]
    verbose: bool,
}

fn main() {
    if let Err(e) = try_main() {
        eprintln!("watch_scale: error: {e:#}");
        std::process::exit(1);
    }
}

fn try_main() -> Result<()> {
    let args = Args::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("watch_scale needs root: kubefim watch loads eBPF programs (run it with sudo)");
    }
    let default_binary = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/kubefim"));
    let kubefim = Binary::new(args.kubefim.as_ref().unwrap_or(&default_binary))?;
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating {}", args.root.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let header = report::header(&command_line(), &kubefim);
    eprint!("{header}");
    let mut results = Vec::new();
    for &files in &args.sizes {
        let label = label(files);
        let fixture = Fixture::new(&args.root, &label);
        let tree = Tree { path: fixture.tree.clone(), files };
        let mut setup = Vec::new();
        eprintln!("{label}: checking the tree {}", tree.path.display());
        let incomplete = tree.incomplete_dirs()?;
        let tree_made = !incomplete.is_empty();
        if tree_made {
            fixture.invalidate_baseline()?;
            eprintln!("  tree: writing {} directories", incomplete.len());
            let started = Instant::now();
            tree.fill(&incomplete, threads)?;
            setup.push(format!(
                "tree {} ({files} files; {} of its directories written in {:.0} s)",
                tree.path.display(),
                incomplete.len(),
                started.elapsed().as_secs_f64()
            ));
        } else {
            setup.push(format!("tree {} ({files} files; reused)", tree.path.display()));
        }
        fixture.ensure_keys(&kubefim)?;
        fixture.ensure_policy()?;
        let baseline = fixture.ensure_baseline(&kubefim, args.rebaseline || tree_made, args.reuse_baseline)?;
        setup.push(format!("baseline {} ({baseline})", fixture.db.display()));
        let probe = tree.probe();
        setup.push(format!("probe file {}", probe.display()));
        let opts = RunOptions {
            kubefim: &kubefim,
            fixture: &fixture,
            probe,
            start_timeout: args.start_timeout,
            kernel_maps: !args.no_kernel_maps,
            echo_stderr: args.verbose,
        };
        let mut samples = Vec::new();
        for run in 1..=args.runs {
            eprintln!("{label}: run {run} of {}", args.runs);
            let sample = run::run_once(&opts).with_context(|| format!("{label}, run {run}"))?;
            eprintln!("  {}", report::raw_line(&label, usize::try_from(run)?, &sample));
            samples.push(sample);
        }
        results.push(SizeResult { label, files, setup, samples });
    }
    print!("{header}{}", report::body(&results));
    Ok(())
}
