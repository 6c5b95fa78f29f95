//! The watcher's error type: each variant says what failed and what to do about it.

/// An error that stops the watcher from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This kubefim was built without its eBPF programs (AYA_BUILD_SKIP).
    #[error(
        "this kubefim was built without its eBPF programs (AYA_BUILD_SKIP was set), so it cannot watch; \
         rebuild it after `bash scripts/setup.sh` has installed rust-src and bpf-linker"
    )]
    NotBuilt,
    /// The kernel's BTF could not give the struct offsets the programs need.
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    /// tracefs is not mounted, so no tracepoint can be found or attached.
    #[error(
        "no syscall tracepoints under /sys/kernel/tracing/events/syscalls: mount tracefs \
         (`mount -t tracefs tracefs /sys/kernel/tracing`; in a pod, mount the host's) and run as root"
    )]
    Tracefs,
    /// The kernel refused the programs or their maps.
    #[error("loading the eBPF programs failed: {0}; kubefim watch needs root (CAP_BPF, CAP_PERFMON) and BTF")]
    Load(#[source] aya::EbpfError),
    /// A program could not be loaded into the kernel (the verifier's log says why).
    #[error("the kernel rejected eBPF program {name}: {source}")]
    Program {
        /// The program.
        name: String,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// A map could not be used.
    #[error("eBPF map {name}: {message}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The baseline or the journal failed.
    #[error(transparent)]
    Baseline(#[from] kubefim_baseline::Error),
    /// An I/O error on the watcher's own files or descriptors.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// True when the error means the baseline must not be trusted (exit code 3).
    pub fn is_untrusted(&self) -> bool {
        matches!(self, Error::Baseline(e) if e.is_untrusted())
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Result with the watcher's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
