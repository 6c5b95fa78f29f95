//! `fimbench compare`: kubefim's `baseline create` and `verify` against the floor of
//! hashing the same tree (`find | xargs -P b3sum`) and a classic FIM (`aide --init`,
//! `aide --check`), on existing trees (/usr) and on generated trees of small files, in one
//! run: wall time and peak RSS of every command (the sampler's wait4), medians of
//! round-robin runs, ratios side by side, and kubefim's peak RSS against the tree's size.
//! The peers run as they are, through `Command`. See benches/README.md.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use kubefim_benches::fixture::{Binary, remove, run};
use kubefim_benches::host;
use kubefim_benches::markdown::{Align, Table, command_line, num};
use kubefim_benches::sampler::{self, Drain, Sample};
use kubefim_benches::stats::{median, ratio};
use kubefim_benches::tree::{Tree, label, parse_size};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// An existing tree to compare on (repeatable); it must not change while the benchmark
    /// runs. Default: /usr, unless --sizes is given.
    #[arg(long = "tree")]
    pub trees: Vec<PathBuf>,
    /// Generated trees of N files of 256 B (1000 a directory; `k` and `m` suffixes,
    /// comma-separated), made once under --root and reused: `1m` is the issue's 1,001,000
    /// files and directories; `100k,1m,3m` gives peak RSS against the baseline's size.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Where generated trees are kept between invocations (`tSIZE/`, shared with
    /// watch_scale). Must be disk-backed, not tmpfs.
    #[arg(long, default_value = "/var/tmp/kubefim-scale")]
    pub root: PathBuf,
    /// Timed runs of every command; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// The tools to run (b3sum is the reference of the ratios).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kubefim,b3sum,aide")]
    pub tools: Vec<Tool>,
    /// Parallel b3sum processes (`xargs -P`) [default: the CPUs].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// aide's num_workers (aide >= 0.18) [default: --jobs].
    #[arg(long)]
    pub aide_workers: Option<usize>,
    /// The kubefim binary (default: the workspace's target/release/kubefim).
    #[arg(long, env = "KUBEFIM")]
    pub kubefim: Option<PathBuf>,
    /// Where the databases go; must be outside the trees.
    #[arg(long, env = "TMPDIR", default_value = "/var/tmp")]
    pub tmpdir: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Kubefim,
    B3sum,
    Aide,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Kubefim => "kubefim",
            Tool::B3sum => "b3sum",
            Tool::Aide => "aide",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Create,
    Verify,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Create => "create",
            Phase::Verify => "verify",
        }
    }
}

/// One tree and what was measured on it.
struct TreeRun {
    path: PathBuf,
    /// `112609 files, ...` or `generated: ...`.
    description: String,
    /// Entries kubefim's verify scanned and aide recorded.
    kubefim_entries: Option<u64>,
    aide_entries: Option<u64>,
    samples: Vec<(Phase, Tool, Sample)>,
}

impl TreeRun {
    fn of(&self, phase: Phase, tool: Tool) -> Vec<&Sample> {
        self.samples.iter().filter(|(p, t, _)| *p == phase && *t == tool).map(|(_, _, s)| s).collect()
    }

    fn median_of(&self, phase: Phase, tool: Tool, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        median(&self.of(phase, tool).into_iter().map(f).collect::<Vec<_>>())
    }
}

/// Files, directories, symlinks, other entries and bytes of regular files of a tree, on
/// its file system only.
fn count(tree: &Path) -> Result<String> {
    let dev = fs::symlink_metadata(tree).with_context(|| format!("reading {}", tree.display()))?.dev();
    let (mut files, mut dirs, mut links, mut other, mut bytes) = (0u64, 1u64, 0u64, 0u64, 0u64);
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            let t = m.file_type();
            if t.is_dir() {
                dirs += 1;
                if m.dev() == dev {
                    stack.push(e.path());
                }
            } else if t.is_file() {
                files += 1;
                bytes += m.len();
            } else if t.is_symlink() {
                links += 1;
            } else {
                other += 1;
            }
        }
    }
    Ok(format!(
        "{files} files, {dirs} directories, {links} symlinks, {other} other; {:.2} GiB in regular files",
        bytes as f64 / (1u64 << 30) as f64
    ))
}

/// The value of the first `"key": N` anywhere in a JSON document.
fn find_u64(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => {
            m.get(key).and_then(serde_json::Value::as_u64).or_else(|| m.values().find_map(|v| find_u64(v, key)))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|v| find_u64(v, key)),
        _ => None,
    }
}

/// The commands of one tree.
struct Commands {
    dir: PathBuf,
    tree: PathBuf,
    kubefim: PathBuf,
    key: PathBuf,
    pubkey: PathBuf,
    jobs: usize,
}

impl Commands {
    fn db(&self) -> PathBuf {
        self.dir.join("kubefim.db")
    }

    fn aide_conf(&self) -> PathBuf {
        self.dir.join("aide.conf")
    }

    fn command(&self, phase: Phase, tool: Tool) -> Result<Command> {
        Ok(match (phase, tool) {
            (Phase::Create, Tool::Kubefim) => {
                remove(&self.db())?;
                let mut c = Command::new(&self.kubefim);
                c.args(["baseline", "create", "--policy"])
                    .arg(self.dir.join("policy.yaml"))
                    .arg("--db")
                    .arg(self.db())
                    .arg("--key")
                    .arg(&self.key);
                c
            }
            (Phase::Verify, Tool::Kubefim) => {
                let mut c = Command::new(&self.kubefim);
                c.arg("verify").arg("--db").arg(self.db()).arg("--pubkey").arg(&self.pubkey).args(["--format", "json"]);
                c
            }
            (_, Tool::B3sum) => {
                let mut c = Command::new("bash");
                c.args([
                    "-o",
                    "pipefail",
                    "-c",
                    r#"find "$1" -xdev -type f -print0 | xargs -0 -P"$2" -n 512 b3sum >/dev/null"#,
                    "b3sum-pipeline",
                ])
                .arg(&self.tree)
                .arg(self.jobs.to_string());
                c
            }
            (Phase::Create, Tool::Aide) => {
                remove(&self.dir.join("aide.db.new"))?;
                let mut c = Command::new("aide");
                c.arg(format!("--config={}", self.aide_conf().display())).arg("--init");
                c
            }
            (Phase::Verify, Tool::Aide) => {
                let mut c = Command::new("aide");
                c.arg(format!("--config={}", self.aide_conf().display())).arg("--check");
                c
            }
        })
    }

    /// Runs one command, its stdout and stderr to files; checks its exit as each tool means
    /// it: verify finding differences aborts, b3sum's and aide's "some changed" warn.
    fn sample(&self, phase: Phase, tool: Tool) -> Result<Sample> {
        crate::interrupt::check()?;
        let out = self.dir.join(format!("{}-{}.out", phase.name(), tool.name()));
        let err = self.dir.join(format!("{}-{}.err", phase.name(), tool.name()));
        let mut cmd = self.command(phase, tool)?;
        cmd.stdout(fs::File::create(&out)?).stderr(fs::File::create(&err)?);
        let s = sampler::sample(&mut cmd, &[], &Drain::Exit)?;
        match (phase, tool, s.code) {
            (_, _, 0) => {}
            (Phase::Verify, Tool::Kubefim, 1) => bail!(
                "kubefim verify exited 1 (differences) on {}, which should not have changed; its report is {}. Rerun on a quiet tree (one no package manager, service or cron job writes to).",
                self.tree.display(),
                out.display()
            ),
            (_, Tool::B3sum, 123) => {
                eprintln!("warning: b3sum could not hash some files (vanished or unreadable)");
            }
            (Phase::Verify, Tool::Aide, 1..=7) => eprintln!(
                "warning: aide --check exited {} (bits: 1 added, 2 removed, 4 changed): the tree changed during the benchmark",
                s.code
            ),
            (_, _, code) => {
                sampler::check_exit(&s, &format!("{} ({})", tool.name(), phase.name()), &err)
                    .with_context(|| format!("command: {cmd:?}; files kept in {} (exit {code})", self.dir.display()))?;
            }
        }
        eprintln!("  {} {}: {:.3} s, {:.1} MiB", phase.name(), tool.name(), s.wall_s, s.max_rss_kib as f64 / 1024.0);
        Ok(s)
    }
}

/// aide.conf: a regex rule for the tree alone ("/tree" alone would also match a sibling
/// "/tree-foo") with kubefim's attribute set and one hash (aide has no BLAKE3).
fn aide_conf(dir: &Path, tree: &Path, workers: usize) -> String {
    let special = "\\.^$*+?(){}|[]";
    let regex: String = tree
        .to_string_lossy()
        .chars()
        .flat_map(|c| if special.contains(c) { vec!['\\', c] } else { vec![c] })
        .collect();
    format!(
        "database_in=file:{d}/aide.db\ndatabase_out=file:{d}/aide.db.new\ngzip_dbout=no\nnum_workers={workers}\nreport_url=stdout\nKubefim = p+ftype+i+l+n+u+g+s+m+c+xattrs+sha256\n{regex}($|/) Kubefim\n",
        d = dir.display()
    )
}

pub fn main(args: &CompareArgs, kubefim: &Path) -> Result<()> {
    let tools = &args.tools;
    for (tool, program) in [(Tool::B3sum, "b3sum"), (Tool::Aide, "aide")] {
        if tools.contains(&tool) && !host::has(program) {
            bail!("{program} is missing: run scripts/setup.sh (as root) first, or leave it out with --tools");
        }
    }
    let kubefim = Binary::new(kubefim)?;
    let jobs = args.jobs.unwrap_or_else(host::cpus);
    let aide_workers = args.aide_workers.unwrap_or(jobs);
    let mut trees: Vec<(PathBuf, Option<u64>)> = args.trees.iter().map(|t| (t.clone(), None)).collect();
    if trees.is_empty() && args.sizes.is_empty() {
        trees.push((PathBuf::from("/usr"), None));
    }
    for &files in &args.sizes {
        trees.push((args.root.join(format!("t{}", label(files))), Some(files)));
    }
    let scratch_dir = tempfile::Builder::new()
        .prefix("kubefim-compare.")
        .tempdir_in(&args.tmpdir)
        .with_context(|| format!("creating a scratch dir in {}", args.tmpdir.display()))?;
    let scratch = fs::canonicalize(scratch_dir.path()).context("resolving the scratch dir")?;
    let result = measure(args, &kubefim, &trees, &scratch, jobs, aide_workers);
    if result.is_err() {
        let kept = scratch_dir.keep();
        eprintln!("fimbench: files kept in {} (remove them when done)", kept.display());
    }
    let runs = result?;
    print!("{}", render(args, &kubefim, &runs, jobs, aide_workers));
    Ok(())
}

fn measure(
    args: &CompareArgs,
    kubefim: &Binary,
    trees: &[(PathBuf, Option<u64>)],
    scratch: &Path,
    jobs: usize,
    aide_workers: usize,
) -> Result<Vec<TreeRun>> {
    let keys = scratch.join("keys");
    run(kubefim.command().arg("keygen").arg("--out").arg(&keys)).context("kubefim keygen")?;
    let mut out = Vec::new();
    for (i, (path, generated)) in trees.iter().enumerate() {
        let description = match generated {
            Some(files) => {
                let tree = Tree { path: path.clone(), files: *files };
                let incomplete = tree.incomplete_dirs()?;
                if !incomplete.is_empty() {
                    eprintln!("tree {}: writing {} directories of 1000 files", path.display(), incomplete.len());
                    tree.fill(&incomplete, host::cpus())?;
                }
                format!("generated: {files} files of 256 B, {} directories", files.div_ceil(1000) + 1)
            }
            None => {
                eprintln!("tree {}: counting", path.display());
                count(path)?
            }
        };
        let path = fs::canonicalize(path).with_context(|| format!("tree {} does not exist", path.display()))?;
        if path == Path::new("/") || scratch.starts_with(&path) {
            bail!(
                "the scratch dir {} is inside the tree {}: set --tmpdir elsewhere",
                scratch.display(),
                path.display()
            );
        }
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let below: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&path) && Path::new(m) != path)
            .collect();
        if !below.is_empty() {
            eprintln!(
                "warning: file systems are mounted below {} ({}); find -xdev and kubefim stay on the tree's, aide does not",
                path.display(),
                below.join(" ")
            );
        }
        let dir = scratch.join(format!("tree{i}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let policy = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: compare}}\nspec:\n  rules:\n    - path: \"{}\"\n",
            path.display()
        );
        fs::write(dir.join("policy.yaml"), policy).context("writing the policy")?;
        fs::write(dir.join("aide.conf"), aide_conf(&dir, &path, aide_workers)).context("writing aide.conf")?;
        let cmds = Commands {
            dir: dir.clone(),
            tree: path.clone(),
            kubefim: kubefim.path.clone(),
            key: keys.join("kubefim.key"),
            pubkey: keys.join("kubefim.pub"),
            jobs,
        };
        if tools_has(args, Tool::Aide) {
            run(Command::new("aide").arg(format!("--config={}", cmds.aide_conf().display())).arg("--config-check"))
                .context("aide rejects the generated config")?;
        }
        let mut tr =
            TreeRun { path: path.clone(), description, kubefim_entries: None, aide_entries: None, samples: Vec::new() };
        eprintln!("{}: create, warming the page cache (one untimed pass of each tool)", path.display());
        for &tool in &args.tools {
            cmds.sample(Phase::Create, tool)?;
        }
        for r in 1..=args.runs {
            eprintln!("{}: create, run {r}/{}", path.display(), args.runs);
            for &tool in &args.tools {
                tr.samples.push((Phase::Create, tool, cmds.sample(Phase::Create, tool)?));
            }
        }
        if tools_has(args, Tool::Aide) {
            fs::rename(dir.join("aide.db.new"), dir.join("aide.db")).context("installing aide's database")?;
            let init = fs::read_to_string(dir.join("create-aide.out")).unwrap_or_default();
            tr.aide_entries =
                init.lines().find_map(|l| l.strip_prefix("Number of entries:")).and_then(|n| n.trim().parse().ok());
        }
        for r in 1..=args.runs {
            eprintln!("{}: verify, run {r}/{}", path.display(), args.runs);
            for &tool in &args.tools {
                tr.samples.push((Phase::Verify, tool, cmds.sample(Phase::Verify, tool)?));
            }
        }
        if tools_has(args, Tool::Kubefim) {
            let report = fs::read(dir.join("verify-kubefim.out")).unwrap_or_default();
            tr.kubefim_entries =
                serde_json::from_slice::<serde_json::Value>(&report).ok().and_then(|v| find_u64(&v, "scanned"));
        }
        // The databases of a 3M-file tree are large: one tree's at a time.
        remove(&dir.join("kubefim.db"))?;
        remove(&dir.join("aide.db"))?;
        out.push(tr);
    }
    Ok(out)
}

fn tools_has(args: &CompareArgs, tool: Tool) -> bool {
    args.tools.contains(&tool)
}

fn render(args: &CompareArgs, kubefim: &Binary, runs: &[TreeRun], jobs: usize, aide_workers: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mib = |kib: f64| kib / 1024.0;
    let names: Vec<&str> = args.tools.iter().map(|t| t.name()).collect();
    let _ = writeln!(
        out,
        "# kubefim vs {}\n",
        names.iter().filter(|n| **n != "kubefim").copied().collect::<Vec<_>>().join(" vs ")
    );
    let _ = writeln!(out, "- command: `{}`", command_line());
    let _ = writeln!(
        out,
        "- date: {}; machine: {}, load average at the end {}",
        host::now(),
        host::machine(),
        host::load()
    );
    let mut versions = vec![kubefim.describe()];
    if tools_has(args, Tool::B3sum) {
        versions.push(format!("{}, xargs -P{jobs}", host::version_of("b3sum", &["--version"])));
    }
    if tools_has(args, Tool::Aide) {
        versions.push(format!("{}, num_workers={aide_workers}", host::version_of("aide", &["--version"])));
    }
    let _ = writeln!(out, "- {}", versions.join("; "));
    for t in runs {
        let _ = writeln!(
            out,
            "- tree `{}` ({}): {}; entries recorded: kubefim {}, aide {}",
            t.path.display(),
            host::file_system(&t.path),
            t.description,
            t.kubefim_entries.map_or_else(|| "?".into(), |n| n.to_string()),
            t.aide_entries.map_or_else(|| "?".into(), |n| n.to_string())
        );
    }
    let _ = writeln!(
        out,
        "- method: median of {} runs, round-robin over the tools, warm page cache (one untimed pass of each first); wall time and peak RSS from wait4 (for the b3sum pipeline: its largest single process)\n",
        args.runs
    );
    let r = Align::Right;
    let mut table = Table::new(&[
        ("tree", Align::Left),
        ("phase", Align::Left),
        ("tool", Align::Left),
        ("wall s", r),
        ("peak RSS MB", r),
        ("× b3sum (wall)", r),
        ("kubefim speed-up over aide", r),
    ]);
    for t in runs {
        for phase in [Phase::Create, Phase::Verify] {
            let b3 = t.median_of(phase, Tool::B3sum, |s| s.wall_s);
            let aide = t.median_of(phase, Tool::Aide, |s| s.wall_s);
            for &tool in &args.tools {
                let wall = t.median_of(phase, tool, |s| s.wall_s);
                let rss = t.median_of(phase, tool, |s| mib(s.max_rss_kib as f64));
                let x_b3 = wall.zip(b3).and_then(|(w, b)| ratio(w, b));
                let speedup = if tool == Tool::Kubefim {
                    aide.zip(wall).and_then(|(a, w)| ratio(a, w)).map_or(String::new(), |v| format!("{v:.2}×"))
                } else {
                    String::new()
                };
                table.row([
                    format!("`{}`", t.path.display()),
                    phase.name().to_owned(),
                    tool.name().to_owned(),
                    num(wall, 3),
                    num(rss, 1),
                    num(x_b3, 2),
                    speedup,
                ]);
            }
        }
    }
    let _ = writeln!(out, "{table}");
    if tools_has(args, Tool::Kubefim) {
        let mut rss = Table::new(&[
            ("tree", Align::Left),
            ("entries", r),
            ("create peak RSS MB", r),
            ("verify peak RSS MB", r),
            ("target", Align::Left),
        ]);
        for t in runs {
            let verify = t.median_of(Phase::Verify, Tool::Kubefim, |s| mib(s.max_rss_kib as f64));
            rss.row([
                format!("`{}`", t.path.display()),
                t.kubefim_entries.map_or_else(|| "?".into(), |n| n.to_string()),
                num(t.median_of(Phase::Create, Tool::Kubefim, |s| mib(s.max_rss_kib as f64)), 1),
                num(verify, 1),
                format!("verify <= 128 MB: {}", if verify.is_some_and(|v| v <= 128.0) { "met" } else { "NOT met" }),
            ]);
        }
        let _ = writeln!(out, "kubefim's peak RSS against the baseline's size (median of the runs):\n\n{rss}");
    }
    let _ = writeln!(out, "Commands (`$DIR` is the tree's scratch dir, removed at exit):\n");
    let _ = writeln!(
        out,
        "- create, kubefim: `kubefim baseline create --policy $DIR/policy.yaml --db $DIR/kubefim.db --key KEY` (one rule over the tree, default attributes, signed)"
    );
    let _ = writeln!(out, "- verify, kubefim: `kubefim verify --db $DIR/kubefim.db --pubkey PUB --format json`");
    let _ = writeln!(
        out,
        "- create and verify, b3sum: `find TREE -xdev -type f -print0 | xargs -0 -P{jobs} -n 512 b3sum >/dev/null`"
    );
    if tools_has(args, Tool::Aide) {
        let _ = writeln!(
            out,
            "- aide: `aide --config=$DIR/aide.conf --init`, then `--check`; aide.conf (for the first tree):\n"
        );
        if let Some(t) = runs.first() {
            let _ = writeln!(out, "```\n{}```", aide_conf(Path::new("$DIR"), &t.path, aide_workers));
        }
    }
    let _ = writeln!(out, "\nRaw wall seconds / peak RSS KiB per run:\n");
    for t in runs {
        for phase in [Phase::Create, Phase::Verify] {
            for &tool in &args.tools {
                let raw: Vec<String> =
                    t.of(phase, tool).iter().map(|s| format!("{:.3}/{}", s.wall_s, s.max_rss_kib)).collect();
                let _ = writeln!(out, "- `{}` {} {}: {}", t.path.display(), phase.name(), tool.name(), raw.join(" "));
            }
        }
    }
    out
}
