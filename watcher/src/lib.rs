//! kubefim watch mode. The ring buffer is drained by its own thread (`reader`), which names
//! each event's process (`actor`, `pods`) and looks at its paths as the process saw them
//! (`resolve`); the loop (`watch`) maps each event to what it may have changed (`targets`),
//! debounces (`pending`), rehashes and reports (`report`, typed lines in `model`, printed by
//! `output`), keeps the kernel's filter in step (`filter`, over the programs of `programs`
//! loaded with `btf`'s offsets, and the rule roots' `ancestors` in it) and runs rescans off the
//! loop (`rescan`). What is known of each path is `state`: a compact `index` in memory,
//! records in the signed baseline and the journal. `lifecycle` gets to a trusted baseline
//! without the private key on the node; `metrics` and `http` serve Prometheus metrics and the
//! probes, within the descriptor budget `limits` sets; `selfcheck` makes sure the kernel side
//! still sees what it should. With `--containers`, `containers` finds containers as they
//! start and checks each against its image.

mod actor;
mod ancestors;
mod btf;
mod cluster;
mod containers;
pub mod error;
mod event;
mod filter;
#[cfg(test)]
mod fixture;
pub mod http;
mod index;
pub mod kube_events;
mod lifecycle;
mod limits;
pub mod metrics;
pub mod model;
pub mod node_status;
mod output;
mod pending;
pub mod pods;
pub mod policy_objects;
mod programs;
mod reader;
mod report;
mod rescan;
mod resolve;
mod selfcheck;
mod state;
mod targets;
mod watch;

pub use error::{Error, Result};
pub use output::Format;
pub use watch::{WatchOptions, run};

/// The kernel side as user space drives it, for tests that load the real programs and
/// assert on the events they send (watcher/tests/kernel.rs): nothing else outside this
/// crate needs it.
pub mod kernel {
    pub use crate::event::KernelEvent;
    pub use crate::programs::Programs;
}
