//! kubefim watch mode: loads and attaches the eBPF programs of ebpf/ (`programs`), keeps
//! their filter maps filled from the baseline (`state`), reads the ring buffer (`event`),
//! maps each event to the monitored paths it touches (`resolve`), debounces (`pending`),
//! rehashes and compares with the last known state, attributes the change to a process,
//! container (`actor`) and pod (`pods`, through the Kubernetes API), and prints it
//! (`output`). `lifecycle` gets to a trusted baseline without the private key on the node;
//! `metrics` and `http` serve Prometheus metrics and the probes. `watch` is the loop that
//! ties them.

pub mod actor;
pub mod btf;
pub mod error;
pub mod event;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod output;
pub mod pending;
pub mod pods;
pub mod programs;
pub mod resolve;
pub mod state;
pub mod watch;

pub use error::{Error, Result};

/// The kernel side as user space drives it, for tests that load the real programs and
/// assert on the events they send (watcher/tests/kernel.rs): nothing else outside this
/// crate needs it.
pub mod kernel {
    pub use crate::event::KernelEvent;
    pub use crate::programs::Programs;
}
pub use output::Format;
pub use watch::{WatchOptions, run};
