//! The watcher's error type: each variant says what failed and what to do about it. A variant
//! with a source does not print it: `main` prints the chain, once (or
//! [`kubefim_baseline::error::chain`] where an error becomes a string).

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
    #[error("loading the eBPF programs failed; kubefim watch needs root (CAP_BPF, CAP_PERFMON) and BTF")]
    Load(#[source] aya::EbpfError),
    /// A program could not be loaded into the kernel (the verifier's log says why).
    #[error("the kernel rejected eBPF program {name}")]
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
    /// The HTTP endpoint (`--listen`) could not start.
    #[error(transparent)]
    Http(#[from] crate::http::Error),
    /// An I/O error on the watcher's own files or descriptors.
    #[error("{context}")]
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

#[cfg(test)]
mod tests {
    use std::io;

    use kubefim_baseline::error::chain;

    use super::*;

    /// Every error of this crate that has a source, with one whose text is easy to find.
    fn with_sources() -> Vec<Box<dyn std::error::Error>> {
        let denied = || io::Error::from_raw_os_error(libc::EACCES);
        let syscall = || aya::sys::SyscallError { call: "bpf_prog_load", io_error: denied() };
        let addr = "127.0.0.1:9090".parse().expect("an address");
        vec![
            Box::new(Error::io("writing to stdout", denied())),
            Box::new(Error::Btf(crate::btf::BtfError::Read(denied()))),
            Box::new(Error::Load(aya::EbpfError::FileError { path: "/kubefim.o".into(), error: denied() })),
            Box::new(Error::Program { name: "sys_enter_openat".into(), source: syscall().into() }),
            Box::new(Error::Baseline(kubefim_baseline::Error::PolicyRead { path: "/p.yaml".into(), source: denied() })),
            Box::new(crate::http::Error::AddrInUse { addr, source: denied() }),
            Box::new(crate::http::Error::Bind { addr, hint: "run as root", source: denied() }),
        ]
    }

    #[test]
    fn the_chain_says_each_cause_once() {
        let cause = io::Error::from_raw_os_error(libc::EACCES).to_string();
        for e in with_sources() {
            let line = chain(e.as_ref());
            assert_eq!(line.matches(&cause).count(), 1, "{line}");
            assert!(!e.to_string().contains(&cause), "{e} prints its source, which the chain prints again");
        }
    }

    #[test]
    fn pod_errors_keep_their_cause_for_the_chain() {
        let e = crate::pods::Error::Client(kube::Error::TlsRequired);
        assert!(!e.to_string().contains("TLS required"), "{e}");
        assert!(chain(&e).ends_with("service account mount: TLS required but no TLS stack selected"), "{}", chain(&e));
    }
}
