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
        #[arg(long)]
        db: PathBuf,
        /// The public key the baseline must be signed with.
        #[arg(long)]
        pubkey: PathBuf,
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
    },
    /// Print the embedded default policy.
    DefaultPolicy,
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
        return Err("the rescan interval must be at least 1s".into());
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
        Command::Baseline(BaselineCommand::Create { policy, db, key }) => commands::create(&policy, &db, &key),
        Command::Baseline(BaselineCommand::Show { db, pubkey, format }) => {
            commands::show(&db, &pubkey, format == ShowFormat::Jsonl)
        }
        Command::Baseline(BaselineCommand::Accept { db, key, pubkey, paths }) => {
            commands::accept(&db, &key, &pubkey, &paths)
        }
        Command::Verify { db, pubkey, format } => commands::verify(&db, &pubkey, format == VerifyFormat::Json),
        Command::Run { state_dir, policy, format } => {
            commands::run(&state_dir, policy.as_deref(), format == VerifyFormat::Json)
        }
        Command::Watch { db, pubkey, format, rescan_interval, ready_file, journal, ring_buffer_kib } => {
            let format = match format {
                Some(WatchFormat::Jsonl) => kubefim_watcher::Format::Jsonl,
                Some(WatchFormat::Human) => kubefim_watcher::Format::Human,
                None if std::io::IsTerminal::is_terminal(&std::io::stdout()) => kubefim_watcher::Format::Human,
                None => kubefim_watcher::Format::Jsonl,
            };
            let ring_buffer_bytes = ring_buffer_kib.map(|k| k * 1024);
            commands::watch(kubefim_watcher::WatchOptions {
                db,
                pubkey,
                format,
                rescan_interval,
                ready_file,
                journal,
                ring_buffer_bytes,
            })
        }
        Command::DefaultPolicy => {
            print!("{}", kubefim_baseline::policy::DEFAULT_POLICY);
            Ok(exit::CLEAN)
        }
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
            }) =>
        {
            ExitCode::from(exit::ERROR)
        }
        Err(e) => {
            output::error(&e);
            let untrusted =
                e.chain().any(|c| c.downcast_ref::<kubefim_baseline::Error>().is_some_and(|e| e.is_untrusted()));
            ExitCode::from(if untrusted { exit::UNTRUSTED } else { exit::ERROR })
        }
    }
}
