//! The `kubefim` binary: parses flags, calls the library crates, prints. Glue only: every
//! decision about files, records and signatures lives in kubefim-baseline.

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes, the contract of `verify` (and of every command that opens a baseline).
pub mod exit {
    /// Clean.
    pub const CLEAN: u8 = 0;
    /// Differences found.
    pub const DIFFERENCES: u8 = 1;
    /// Usage or runtime error.
    pub const ERROR: u8 = 2;
    /// The baseline cannot be trusted.
    pub const UNTRUSTED: u8 = 3;
    /// Another kubefim holds the database or journal (a second watcher, a concurrent
    /// accept): nothing was done.
    pub const IN_USE: u8 = 4;
}

/// File integrity monitoring for Linux and Kubernetes nodes: signed BLAKE3 baselines.
#[derive(Parser)]
#[command(name = "kubefim", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an Ed25519 signing key pair: DIR/kubefim.key (PKCS#8, 0600) and DIR/kubefim.pub.
    Keygen {
        /// Directory to write the keys into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create, show or amend a signed baseline.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Rescan and report what was added, removed or modified since the baseline.
    Verify {
        /// The baseline database.
        #[arg(long, required_unless_present = "containers", conflicts_with = "containers")]
        db: Option<PathBuf>,
        /// The public key the baseline must be signed with.
        #[arg(long, required_unless_present = "containers", conflicts_with = "containers")]
        pubkey: Option<PathBuf>,
        /// Check every running container a workload policy selects against its image
        /// instead of the node against its baseline.
        #[arg(long, requires = "workload_policy")]
        containers: bool,
        /// A WorkloadFimPolicy file, or a directory of them (repeatable).
        #[arg(long, requires = "containers")]
        workload_policy: Vec<PathBuf>,
        /// Where the records of image layer files are cached (read once per layer, however
        /// many containers use it).
        #[arg(long, requires = "containers", value_name = "DIR", default_value = "/var/lib/kubefim/layer-cache")]
        layer_cache: PathBuf,
        #[command(flatten)]
        host: HostRootArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = VerifyFormat::Human)]
        format: VerifyFormat,
    },
    /// The main job on one machine: create keys and a signed baseline of the policy (the
    /// embedded node policy by default) if none exists yet, then verify.
    Run {
        /// Where keys and the baseline live.
        #[arg(long, default_value = "/var/lib/kubefim")]
        state_dir: PathBuf,
        /// Policy for a new baseline (default: the embedded Kubernetes node policy).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Output format of the verify.
        #[arg(long, value_enum, default_value_t = VerifyFormat::Human)]
        format: VerifyFormat,
    },
    /// Watch the baseline's files through eBPF and report each change as it happens, with a
    /// content diff and who made it (needs root: CAP_BPF, CAP_PERFMON, and tracefs).
    // --containers needs workload policies: files, or the Kubernetes API's objects.
    #[command(group(clap::ArgGroup::new("workload_policies").args(["workload_policy", "kubernetes"]).multiple(true)))]
    Watch {
        /// The baseline database.
        #[arg(long)]
        db: PathBuf,
        /// The public key the baseline must be signed with (the private key is never needed).
        #[arg(long)]
        pubkey: PathBuf,
        /// Output format (default: jsonl when stdout is not a terminal, human otherwise).
        #[arg(long, value_enum)]
        format: Option<WatchFormat>,
        /// Full rescan interval, the backstop for anything events could not show (e.g. 30s,
        /// 15m, 1h).
        #[arg(long, default_value = "1h", value_parser = parse_interval)]
        rescan_interval: std::time::Duration,
        /// File to write once the programs are attached and the first rescan is done.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// The journal of observed deviations (default: the database path + ".journal").
        #[arg(long)]
        journal: Option<PathBuf>,
        /// Ring buffer size in KiB (a power of two >= 4; default 8192). For tests of overflow.
        #[arg(long, hide = true, value_parser = parse_ring_kib)]
        ring_buffer_kib: Option<u32>,
        #[command(flatten)]
        host: HostRootArg,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this address (e.g. 0.0.0.0:9090).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Name the pod of each container through the Kubernetes API (in-cluster service
        /// account or KUBECONFIG), watching only the pods of --node-name.
        #[arg(long)]
        kubernetes: bool,
        /// This node's name (default: $NODE_NAME, else the host name).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// When --db does not exist: scan with this policy into an unsigned DB.pending, print
        /// its signing request and wait (not ready) for its signature in --signatures.
        #[arg(long, requires = "signatures")]
        init_policy: Option<PathBuf>,
        /// Directory where signatures arrive, one file per node name (the kubefim-signatures
        /// ConfigMap); a new one for DB.pending installs it.
        #[arg(long, value_name = "DIR")]
        signatures: Option<PathBuf>,
        /// Compare everything with the signed baseline this often: a `verify` line and the
        /// verify metrics (one is always made at start).
        #[arg(long, value_parser = parse_interval)]
        verify_interval: Option<std::time::Duration>,
        /// Also check every container a workload policy selects against its image: those
        /// running at start and each new one the moment its first process starts. The
        /// policies: --workload-policy files and, with --kubernetes, the WorkloadFimPolicy and
        /// ClusterWorkloadFimPolicy objects of the API (changes apply to running containers).
        #[arg(long, requires = "workload_policies")]
        containers: bool,
        /// A WorkloadFimPolicy or ClusterWorkloadFimPolicy file, or a directory of them
        /// (repeatable).
        #[arg(long, requires = "containers")]
        workload_policy: Vec<PathBuf>,
        /// Where the records of image layer files are cached (default: `layer-cache` beside
        /// the database).
        #[arg(long, requires = "containers", value_name = "DIR")]
        layer_cache: Option<PathBuf>,
    },
    /// Print the embedded default policy.
    DefaultPolicy,
    /// Print the JSON Schema (draft 2020-12) of a JSON output, generated from the types that
    /// print it.
    Schema {
        /// Which output.
        #[arg(value_enum)]
        output: commands::SchemaOutput,
    },
    /// Developer tools (tamper a database to test detection).
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[derive(Subcommand)]
enum BaselineCommand {
    /// Scan what the policy names and write a signed baseline.
    Create {
        /// The FimPolicy YAML.
        #[arg(long)]
        policy: PathBuf,
        /// The baseline database to write (a directory).
        #[arg(long)]
        db: PathBuf,
        /// The private signing key.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        host: HostRootArg,
    },
    /// Scan what the policy names into an unsigned baseline (DB.pending) and print a signing
    /// request for `baseline sign` on another machine: the private key never comes here.
    Scan {
        /// The FimPolicy YAML.
        #[arg(long)]
        policy: PathBuf,
        /// The baseline database the signed baseline will be installed at.
        #[arg(long)]
        db: PathBuf,
        /// The node the baseline describes: names the request and its signature file.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        #[command(flatten)]
        host: HostRootArg,
    },
    /// Sign signing requests (JSON lines, or whole agent logs: other lines are skipped) with
    /// the private key, after checking each; writes OUT/NODE per request, or prints them.
    Sign {
        /// The private signing key.
        #[arg(long)]
        key: PathBuf,
        /// Refuse requests scanned with any other policy than this file.
        #[arg(long)]
        expect_policy: Option<PathBuf>,
        /// Directory to write one signature file per node into (default: print JSON lines).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Files holding requests (default: standard input).
        requests: Vec<PathBuf>,
    },
    /// Check a signature of the pending baseline (DB.pending) and install it at DB.
    Attach {
        /// The baseline database.
        #[arg(long)]
        db: PathBuf,
        /// The public key the signature must verify with.
        #[arg(long)]
        pubkey: PathBuf,
        /// The signature file written by `baseline sign`.
        #[arg(long)]
        signature: PathBuf,
    },
    /// Print the records of a baseline after checking its signature.
    Show {
        /// The baseline database.
        #[arg(long)]
        db: PathBuf,
        /// The public key the baseline must be signed with.
        #[arg(long)]
        pubkey: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ShowFormat::Human)]
        format: ShowFormat,
    },
    /// Take the current state of PATHs (all, if none) into a new signed baseline.
    Accept {
        /// The baseline database.
        #[arg(long)]
        db: PathBuf,
        /// The private signing key for the new baseline.
        #[arg(long)]
        key: PathBuf,
        /// The public key the current baseline must be signed with.
        #[arg(long)]
        pubkey: PathBuf,
        #[command(flatten)]
        host: HostRootArg,
        /// Paths whose current state to accept.
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Edit a baseline database without re-signing it.
    Tamper {
        /// The baseline database.
        #[arg(long)]
        db: PathBuf,
        /// What to do.
        #[arg(long, value_enum)]
        op: commands::TamperOp,
        /// For swap-signature: the baseline to take the signature from.
        #[arg(long)]
        other_db: Option<PathBuf>,
        /// Re-sign the file-level seal afterwards with this private key, so that only the
        /// signature inside the database can catch the edit.
        #[arg(long)]
        reseal_with: Option<PathBuf>,
    },
}

/// `--host-root`, shared by every command that reads the monitored files.
#[derive(clap::Args)]
struct HostRootArg {
    /// Where the host's root file system is mounted (e.g. /host in a pod): policy paths are
    /// read under it and reported as host paths.
    #[arg(long, value_name = "DIR")]
    host_root: Option<PathBuf>,
}

impl HostRootArg {
    fn resolve(&self) -> anyhow::Result<kubefim_baseline::root::HostRoot> {
        // The library's error names the directory and the flag.
        match &self.host_root {
            None => Ok(kubefim_baseline::root::HostRoot::identity()),
            Some(dir) => Ok(kubefim_baseline::root::HostRoot::new(dir)?),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerifyFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WatchFormat {
    Jsonl,
    Human,
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{e} (write it like 30s, 15m or 1h)"))?;
    if d < std::time::Duration::from_secs(1) {
        return Err("the interval must be at least 1s".into());
    }
    Ok(d)
}

fn parse_ring_kib(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(k) if (4..=(1 << 20)).contains(&k) && k.is_power_of_two() => Ok(k),
        _ => Err("a power of two between 4 and 1048576 (KiB)".into()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ShowFormat {
    Human,
    Jsonl,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    output::init_logging();
    let result = match cli.command {
        Command::Keygen { out } => commands::keygen(&out),
        Command::Baseline(BaselineCommand::Create { policy, db, key, host }) => {
            host.resolve().and_then(|host| commands::create(&policy, &host, &db, &key))
        }
        Command::Baseline(BaselineCommand::Scan { policy, db, node_name, host }) => {
            host.resolve().and_then(|host| commands::scan(&policy, &host, &db, node_name))
        }
        Command::Baseline(BaselineCommand::Sign { key, expect_policy, out, requests }) => {
            commands::sign(&key, expect_policy.as_deref(), out.as_deref(), &requests)
        }
        Command::Baseline(BaselineCommand::Attach { db, pubkey, signature }) => {
            commands::attach(&db, &pubkey, &signature)
        }
        Command::Baseline(BaselineCommand::Show { db, pubkey, format }) => {
            commands::show(&db, &pubkey, format == ShowFormat::Jsonl)
        }
        Command::Baseline(BaselineCommand::Accept { db, key, pubkey, host, paths }) => {
            host.resolve().and_then(|host| commands::accept(&host, &db, &key, &pubkey, &paths))
        }
        Command::Verify { containers: true, workload_policy, layer_cache, host, format, .. } => {
            host.resolve().and_then(|host| {
                commands::verify_containers(&workload_policy, &layer_cache, &host, format == VerifyFormat::Json)
            })
        }
        Command::Verify { db: Some(db), pubkey: Some(pubkey), host, format, .. } => {
            host.resolve().and_then(|host| commands::verify(&db, &pubkey, &host, format == VerifyFormat::Json))
        }
        Command::Verify { .. } => unreachable!("clap requires --db and --pubkey without --containers"),
        Command::Run { state_dir, policy, format } => {
            commands::run(&state_dir, policy.as_deref(), format == VerifyFormat::Json)
        }
        Command::Watch {
            db,
            pubkey,
            format,
            rescan_interval,
            ready_file,
            journal,
            ring_buffer_kib,
            host,
            listen,
            kubernetes,
            node_name,
            init_policy,
            signatures,
            verify_interval,
            containers,
            workload_policy,
            layer_cache,
        } => {
            let format = match format {
                Some(WatchFormat::Jsonl) => kubefim_watcher::Format::Jsonl,
                Some(WatchFormat::Human) => kubefim_watcher::Format::Human,
                None if std::io::IsTerminal::is_terminal(&std::io::stdout()) => kubefim_watcher::Format::Human,
                None => kubefim_watcher::Format::Jsonl,
            };
            let ring_buffer_bytes = ring_buffer_kib.map(|k| k * 1024);
            let containers = containers
                .then(|| kubefim_baseline::workload::WorkloadPolicies::load(&workload_policy))
                .transpose()
                .map_err(anyhow::Error::from);
            host.resolve().and_then(|host| {
                let containers = containers?;
                commands::watch(kubefim_watcher::WatchOptions {
                    db,
                    pubkey,
                    format,
                    rescan_interval,
                    ready_file,
                    journal,
                    ring_buffer_bytes,
                    host,
                    listen,
                    kubernetes,
                    node_name: commands::node_name(node_name),
                    init_policy,
                    signatures,
                    verify_interval,
                    containers,
                    layer_cache,
                })
            })
        }
        Command::DefaultPolicy => {
            print!("{}", kubefim_baseline::policy::DEFAULT_POLICY);
            Ok(exit::CLEAN)
        }
        Command::Schema { output } => commands::schema(output),
        Command::Debug(DebugCommand::Tamper { db, op, other_db, reseal_with }) => {
            commands::tamper(&db, op, other_db.as_deref(), reseal_with.as_deref())
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        // A reader that stopped reading (`| head`) is not an error worth a message.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<serde_json::Error>()
                        .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
            }) =>
        {
            ExitCode::from(exit::ERROR)
        }
        Err(e) => {
            output::error(&e);
            let ours = |test: fn(&kubefim_baseline::Error) -> bool| {
                e.chain().any(|c| c.downcast_ref::<kubefim_baseline::Error>().is_some_and(test))
            };
            ExitCode::from(if ours(kubefim_baseline::Error::is_untrusted) {
                exit::UNTRUSTED
            } else if ours(kubefim_baseline::Error::is_locked) {
                exit::IN_USE
            } else {
                exit::ERROR
            })
        }
    }
}
