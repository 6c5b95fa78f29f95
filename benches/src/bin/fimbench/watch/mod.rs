//! `fimbench watch`: what `kubefim watch` costs next to no monitor and next to auditd, how
//! fast it reports, and how much memory it holds, in one run. Workloads (the loop, the
//! appends, `tar -x`) run on a scratch tree under each monitor, round-robin within a run;
//! the sampler measures each cell; the report takes medians. See benches/README.md.

mod events;
mod monitors;
mod report;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use kubefim_benches::fixture::{Binary, remove, run};
use kubefim_benches::procfs;
use kubefim_benches::sampler::{self, Drain, Sample};
use kubefim_benches::tree::Tree;

use self::events::Reported;
use self::monitors::{Audit, KubefimSetup};
use crate::workload::Workload;

/// Interval between latency probes.
const LAT_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Timed runs of every cell; the tables show medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Tiny sizes (a smoke test of a minute or two): the size flags not given default to
    /// 20 loop files, 5,000 loop iterations, 20,000 appends, 500 tar files of 5 MB in all,
    /// 20 latency probes and a 2,000-file memory tree.
    #[arg(long)]
    pub quick: bool,
    /// Which workloads to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "loop,append,tar")]
    pub workloads: Vec<WorkloadKind>,
    /// Files of the loop workload [default: 200].
    #[arg(long)]
    pub loop_files: Option<usize>,
    /// open+write+close iterations of the loop [default: 200000].
    #[arg(long)]
    pub loop_iters: Option<u64>,
    /// 64-byte writes of the append workload, to one file [default: 400000].
    #[arg(long)]
    pub append_writes: Option<u64>,
    /// Files in the tarball [default: 20000].
    #[arg(long)]
    pub tar_files: Option<usize>,
    /// Approximate size of the tarball's content, MB [default: 200].
    #[arg(long)]
    pub tar_mb: Option<u64>,
    /// Latency probes a run [default: 200].
    #[arg(long)]
    pub lat_samples: Option<usize>,
    /// Files of the memory measurement's baseline [default: 100000].
    #[arg(long)]
    pub rss_files: Option<u64>,
    /// `auditctl -b` while auditd runs (as auditd's shipped rules set it; the kernel's
    /// default, 64, makes the workload wait on auditd); put back afterwards.
    #[arg(long, default_value_t = 8192)]
    pub audit_backlog: u32,
    /// Leave auditd out.
    #[arg(long)]
    pub no_auditd: bool,
    /// The kubefim binary (default: the workspace's target/release/kubefim). It is copied
    /// to the scratch dir: a build during the benchmark cannot swap it.
    #[arg(long, env = "KUBEFIM")]
    pub kubefim: Option<PathBuf>,
    /// Where the scratch dir goes; it should be ext4 (or what the numbers are for).
    #[arg(long, env = "TMPDIR", default_value = "/var/tmp")]
    pub tmpdir: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Loop,
    Append,
    Tar,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Loop => "loop",
            WorkloadKind::Append => "append",
            WorkloadKind::Tar => "tar",
        }
    }
}

/// The sizes, with `--quick`'s or the full defaults for those not given.
pub struct Sizes {
    pub loop_files: usize,
    pub loop_iters: u64,
    pub append_writes: u64,
    pub tar_files: usize,
    pub tar_mb: u64,
    pub lat_samples: usize,
    pub rss_files: u64,
}

impl WatchArgs {
    fn sizes(&self) -> Sizes {
        let q = self.quick;
        Sizes {
            loop_files: self.loop_files.unwrap_or(if q { 20 } else { 200 }),
            loop_iters: self.loop_iters.unwrap_or(if q { 5_000 } else { 200_000 }),
            append_writes: self.append_writes.unwrap_or(if q { 20_000 } else { 400_000 }),
            tar_files: self.tar_files.unwrap_or(if q { 500 } else { 20_000 }),
            tar_mb: self.tar_mb.unwrap_or(if q { 5 } else { 200 }),
            lat_samples: self.lat_samples.unwrap_or(if q { 20 } else { 200 }),
            rss_files: self.rss_files.unwrap_or(if q { 2_000 } else { 100_000 }),
        }
    }
}

/// A monitor configuration of the overhead matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Monitor {
    None,
    /// `kubefim watch` with the workload's tree in its baseline.
    Kubefim,
    /// `kubefim watch` with a baseline of 100 files elsewhere.
    KubefimOther,
    /// auditd with `auditctl -w TREE -p wa`.
    Auditd,
}

impl Monitor {
    pub fn label(self) -> &'static str {
        match self {
            Monitor::None => "none",
            Monitor::Kubefim => "kubefim watch, tree monitored",
            Monitor::KubefimOther => "kubefim watch, tree not monitored",
            Monitor::Auditd => "auditd, `-w TREE -p wa`",
        }
    }
}

/// One timed cell.
pub struct Cell {
    pub workload: WorkloadKind,
    pub monitor: Monitor,
    pub run: u32,
    pub sample: Sample,
    /// kubefim, tree monitored: what it reported.
    pub reported: Option<Reported>,
    /// kubefim, tree not monitored: its change lines (none expected).
    pub other_lines: Option<usize>,
    /// auditd: the kernel's `lost` during the cell.
    pub audit_lost: Option<u64>,
}

/// Latency and memory of one run.
pub struct WatcherRun {
    pub run: u32,
    pub latencies_ms: Vec<f64>,
    pub missed: usize,
    pub hwm_kib: u64,
    pub rss_kib: u64,
    pub ready_s: f64,
}

/// The scratch layout and what every cell needs.
struct Bench<'a> {
    sizes: Sizes,
    scratch: PathBuf,
    /// The monitored tree: `loop/`, `x/` (tar's target), `probe/` (appends, latency, markers).
    tree: PathBuf,
    kubefim: KubefimSetup<'a>,
    /// This binary, for the workloads.
    exe: PathBuf,
    audit: Option<Audit>,
}

impl Bench<'_> {
    fn db(&self, name: &str) -> PathBuf {
        self.scratch.join(format!("{name}.db"))
    }

    fn policy(&self, name: &str) -> PathBuf {
        self.scratch.join(format!("{name}.yaml"))
    }

    /// The tree as before any workload, nothing dirty in the page cache.
    fn reset(&self) -> Result<()> {
        let x = self.tree.join("x");
        remove(&x)?;
        fs::create_dir(&x).with_context(|| format!("creating {}", x.display()))?;
        for i in 0..self.sizes.loop_files {
            let f = self.tree.join(format!("loop/f{i:05}"));
            fs::write(&f, b"").with_context(|| format!("truncating {}", f.display()))?;
        }
        let probe = self.tree.join("probe");
        remove(&probe)?;
        fs::create_dir(&probe).with_context(|| format!("creating {}", probe.display()))?;
        for f in ["append", "latency"] {
            fs::write(probe.join(f), b"").with_context(|| format!("creating {}", probe.join(f).display()))?;
        }
        run(&mut Command::new("sync")).map(drop)
    }

    /// The command of a workload: this binary's `workload` subcommand, or tar.
    fn workload(&self, kind: WorkloadKind) -> Command {
        let workload = match kind {
            WorkloadKind::Loop => Workload::Loop {
                dir: self.tree.join("loop"),
                files: self.sizes.loop_files,
                iters: self.sizes.loop_iters,
            },
            WorkloadKind::Append => {
                Workload::Append { file: self.tree.join("probe/append"), writes: self.sizes.append_writes }
            }
            WorkloadKind::Tar => {
                let mut tar = Command::new("tar");
                tar.arg("-xf").arg(self.scratch.join("src.tar")).arg("-C").arg(self.tree.join("x"));
                return tar;
            }
        };
        let mut cmd = Command::new(&self.exe);
        cmd.arg("workload");
        match &workload {
            Workload::Loop { dir, files, iters } => {
                cmd.arg("loop").arg(dir).arg(files.to_string()).arg(iters.to_string());
            }
            Workload::Append { file, writes } => {
                cmd.arg("append").arg(file).arg(writes.to_string());
            }
        }
        cmd
    }

    /// What a workload leaves behind, for the check of kubefim's report.
    fn left_by(&self, kind: WorkloadKind) -> Result<Vec<(PathBuf, Option<u64>)>> {
        match kind {
            WorkloadKind::Loop => events::expected(&self.tree.join("loop")),
            WorkloadKind::Append => events::expected(&self.tree.join("probe/append")),
            WorkloadKind::Tar => events::expected(&self.tree.join("x")),
        }
    }

    /// One cell: reset, start the monitor, sample the workload, stop the monitor.
    fn cell(&self, kind: WorkloadKind, monitor: Monitor, run_: u32) -> Result<Cell> {
        self.reset()?;
        let events = self.scratch.join(format!("events/{}-{run_}.jsonl", kind.name()));
        let mut cmd = self.workload(kind);
        let err = self.scratch.join("workload.err");
        cmd.stdout(Stdio::null()).stderr(fs::File::create(&err).context("creating workload.err")?);
        let what = format!("the {} workload under {}", kind.name(), monitor.label());
        let mut cell = Cell {
            workload: kind,
            monitor,
            run: run_,
            sample: Sample::default(),
            reported: None,
            other_lines: None,
            audit_lost: None,
        };
        match monitor {
            Monitor::None => {
                cell.sample = sampler::sample(&mut cmd, &[], &Drain::Exit)?;
                sampler::check_exit(&cell.sample, &what, &err)?;
            }
            Monitor::Kubefim | Monitor::KubefimOther => {
                let db = if monitor == Monitor::Kubefim {
                    self.kubefim.baseline(&self.policy("tree"), &self.db("tree"))?;
                    self.db("tree")
                } else {
                    self.db("other")
                };
                let w = self.kubefim.watch(&db, &events)?;
                let drain = Drain::Idle { output: Some(events.clone()) };
                cell.sample = sampler::sample(&mut cmd, &[w.pid()], &drain)?;
                w.stop()?;
                sampler::check_exit(&cell.sample, &what, &err)?;
                if monitor == Monitor::Kubefim {
                    cell.reported = Some(events::check(&events, &self.left_by(kind)?)?);
                } else {
                    cell.other_lines = Some(events::check(&events, &[])?.lines);
                }
                fs::remove_file(&events).ok();
            }
            Monitor::Auditd => {
                let audit = self.audit.as_ref().context("auditd is available")?;
                let a = audit.start()?;
                let lost = monitors::audit_lost();
                let drain = match &audit.log {
                    Some(log) => Drain::Marker {
                        log: log.clone(),
                        marker: self.tree.join(format!("probe/marker-{}-{run_}", kind.name())),
                    },
                    None => Drain::Idle { output: None },
                };
                cell.sample = sampler::sample(&mut cmd, &a.pids, &drain)?;
                cell.audit_lost = Some(monitors::audit_lost().saturating_sub(lost));
                a.stop();
                sampler::check_exit(&cell.sample, &what, &err)?;
            }
        }
        let s = &cell.sample;
        eprintln!(
            "  {} {}: wall {:.3} s, sys {:.2} s, monitor {:.2} s, machine sys {:.2} s, drain {:.2} s",
            kind.name(),
            monitor.label(),
            s.wall_s,
            s.sys_s,
            s.monitor_s(),
            s.machine_sys_s,
            s.drain_s
        );
        Ok(cell)
    }
}

/// Generates `files` files (100 a directory) of pseudo-random sizes averaging `total /
/// files` bytes, incompressible content (BLAKE3's output stream, the same on every run).
fn generate_tar_tree(root: &Path, files: usize, total: u64) -> Result<()> {
    let mut xof = blake3::Hasher::new().update(b"kubefim fimbench tar tree").finalize_xof();
    let mut block = vec![0u8; 4 << 20];
    xof.fill(&mut block);
    let mean = total / files.max(1) as u64;
    let mut word = [0u8; 8];
    for i in 0..files {
        let dir = root.join(format!("d{:05}", i / 100));
        if i.is_multiple_of(100) {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        xof.fill(&mut word);
        let r = u64::from_le_bytes(word);
        // Uniform over [0, 2 * mean], the offset anywhere in the block.
        let size = usize::try_from((r % (2 * mean + 1)).min(block.len() as u64)).context("a size below 4 MiB")?;
        let off = usize::try_from((r >> 32) % (block.len() - size + 1) as u64).context("an offset below 4 MiB")?;
        let path = dir.join(format!("f{i:06}"));
        fs::write(&path, &block[off..off + size]).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Machine CPU over `secs` while the harness does nothing, in CPUs busy (user, system).
fn idle_load(secs: f64) -> Result<(f64, f64)> {
    let before = procfs::machine_ticks()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (u, s) = procfs::machine_ticks()?.seconds_since(before);
    Ok((u / secs, s / secs))
}

pub fn main(args: &WatchArgs, kubefim: &Path) -> Result<()> {
    let sizes = args.sizes();
    for tool in ["tar", "sync", "findmnt"] {
        if !kubefim_benches::host::has(tool) {
            bail!("{tool} is missing: run scripts/setup.sh (as root) first");
        }
    }
    let scratch_dir = tempfile::Builder::new()
        .prefix("kubefim-bench-watch.")
        .tempdir_in(&args.tmpdir)
        .with_context(|| format!("creating a scratch dir in {}", args.tmpdir.display()))?;
    let scratch = fs::canonicalize(scratch_dir.path()).context("resolving the scratch dir")?;
    let result = measure(args, sizes, kubefim, &scratch);
    if result.is_err() {
        // Keep what explains the failure (events, stderr of the tools).
        let kept = scratch_dir.keep();
        eprintln!("fimbench: scratch data kept in {} (remove it when done)", kept.display());
    }
    result
}

fn measure(args: &WatchArgs, sizes: Sizes, kubefim_src: &Path, scratch: &Path) -> Result<()> {
    let fs_desc = kubefim_benches::host::file_system(scratch);
    if !fs_desc.starts_with("ext4") {
        eprintln!("warning: {} is on {fs_desc}, not ext4; the numbers are for that", scratch.display());
    }
    let src = Binary::new(kubefim_src)?;
    let copy = scratch.join("kubefim");
    fs::copy(&src.path, &copy).with_context(|| format!("copying {} to {}", src.path.display(), copy.display()))?;
    let kubefim = Binary::new(&copy)?;
    let tree = scratch.join("tree");
    let other = scratch.join("other");
    for d in [tree.join("loop"), tree.join("x"), tree.join("probe"), other.clone(), scratch.join("events")] {
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    for i in 1..=100 {
        fs::write(other.join(format!("o{i}")), format!("other {i}\n")).context("writing the other tree")?;
    }
    let workloads = &args.workloads;
    let mut tar_entries = (0, 0);
    if workloads.contains(&WorkloadKind::Tar) {
        eprintln!("tar: generating {} files, about {} MB, and their tarball", sizes.tar_files, sizes.tar_mb);
        let gen_dir = scratch.join("gen");
        generate_tar_tree(&gen_dir, sizes.tar_files, sizes.tar_mb << 20)?;
        let listed = events::expected(&gen_dir)?;
        tar_entries = (listed.len(), listed.iter().filter_map(|(_, s)| *s).sum::<u64>());
        run(Command::new("tar").arg("-cf").arg(scratch.join("src.tar")).arg("-C").arg(&gen_dir).arg("."))?;
        remove(&gen_dir)?;
    }
    let keys = scratch.join("keys");
    run(kubefim.command().arg("keygen").arg("--out").arg(&keys)).context("kubefim keygen")?;
    let (key, pubkey) = (keys.join("kubefim.key"), keys.join("kubefim.pub"));
    let setup = KubefimSetup { kubefim: &kubefim, key: &key, pubkey: &pubkey, scratch };
    let rss_tree = scratch.join("rss");
    setup.policy(&scratch.join("tree.yaml"), &tree)?;
    setup.policy(&scratch.join("other.yaml"), &other)?;
    setup.policy(&scratch.join("rss.yaml"), &rss_tree)?;
    setup.baseline(&scratch.join("other.yaml"), &scratch.join("other.db"))?;

    let audit = if args.no_auditd {
        Err("left out (--no-auditd)".to_owned())
    } else {
        eprintln!("auditd: checking that it starts and takes a watch rule");
        Audit::detect(scratch, &tree, args.audit_backlog).map_err(|e| format!("{e:#}").replace('\n', " "))
    };
    if let Err(why) = &audit {
        eprintln!("auditd: unavailable ({why})");
    }
    let audit_unavailable = audit.as_ref().err().cloned();
    let audit_conf = audit.as_ref().ok().map(|a| (a.conf_summary.clone(), a.preexisting()));
    let exe = std::env::current_exe().context("finding this binary")?;
    let bench =
        Bench { sizes, scratch: scratch.to_owned(), tree: tree.clone(), kubefim: setup, exe, audit: audit.ok() };

    let load_before = kubefim_benches::host::load();
    let idle = idle_load(2.0)?;
    eprintln!(
        "machine before the runs: load average {load_before}; {:.2} CPUs busy in user, {:.2} in system mode",
        idle.0, idle.1
    );
    let mut monitors = vec![Monitor::None, Monitor::Kubefim, Monitor::KubefimOther];
    if bench.audit.is_some() {
        monitors.push(Monitor::Auditd);
    }
    eprintln!("warming the page cache and the binaries (one untimed pass of each workload, no monitor)");
    for &w in workloads {
        crate::interrupt::check()?;
        bench.cell(w, Monitor::None, 0)?;
    }
    let mut cells = Vec::new();
    for r in 1..=args.runs {
        for &w in workloads {
            eprintln!("overhead: {}, run {r}/{}", w.name(), args.runs);
            for &m in &monitors {
                crate::interrupt::check()?;
                cells.push(bench.cell(w, m, r).with_context(|| format!("{} under {}, run {r}", w.name(), m.label()))?);
            }
        }
    }

    let mut watcher_runs = Vec::new();
    let rss = Tree { path: rss_tree.clone(), files: bench.sizes.rss_files };
    eprintln!("memory: generating {} files of 256 B and their baseline", rss.files);
    rss.fill(&rss.incomplete_dirs()?, kubefim_benches::host::cpus())?;
    let started = Instant::now();
    bench.kubefim.baseline(&bench.policy("rss"), &bench.db("rss"))?;
    let rss_baseline_s = started.elapsed().as_secs_f64();
    for r in 1..=args.runs {
        crate::interrupt::check()?;
        eprintln!("latency: run {r}/{} ({} probes)", args.runs, bench.sizes.lat_samples);
        bench.reset()?;
        bench.kubefim.baseline(&bench.policy("tree"), &bench.db("tree"))?;
        let events = scratch.join("events/latency.jsonl");
        let w = bench.kubefim.watch(&bench.db("tree"), &events)?;
        let (latencies_ms, missed) =
            events::latency(&tree.join("probe/latency"), &events, bench.sizes.lat_samples, LAT_INTERVAL)?;
        w.stop()?;
        let w = bench.kubefim.watch(&bench.db("rss"), &scratch.join("events/rss.jsonl"))?;
        std::thread::sleep(Duration::from_secs(1));
        let mem = procfs::memory(w.pid())?;
        let ready_s = w.ready_s;
        w.stop()?;
        eprintln!(
            "  {} reported, {missed} missed; VmHWM {:.1} MiB, VmRSS {:.1} MiB, ready in {ready_s:.2} s",
            latencies_ms.len(),
            mem.hwm_kib as f64 / 1024.0,
            mem.rss_kib as f64 / 1024.0
        );
        watcher_runs.push(WatcherRun {
            run: r,
            latencies_ms,
            missed,
            hwm_kib: mem.hwm_kib,
            rss_kib: mem.rss_kib,
            ready_s,
        });
    }
    let rss_entries = fs::read_dir(&rss_tree).map_or(0, |d| d.count() as u64) + rss.files + 1;

    let facts = report::Facts {
        kubefim: src.describe(),
        fs: fs_desc,
        load_before,
        load_after: kubefim_benches::host::load(),
        idle,
        sizes: &bench.sizes,
        runs: args.runs,
        tar_entries,
        audit_unavailable,
        audit_conf,
        audit_backlog: args.audit_backlog,
        rss_entries,
        rss_baseline_s,
    };
    print!("{}", report::render(&facts, &cells, &watcher_runs));
    Ok(())
}
