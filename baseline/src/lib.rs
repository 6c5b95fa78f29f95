//! kubefim-baseline: everything about a signed baseline and nothing about the kernel. It
//! owns the policy, the walk and the BLAKE3 records, the sled store (behind one module; the watcher's journal is a second, unsigned one), the
//! canonical digest and its Ed25519 signature, and verify's comparison and diffs. No tokio,
//! no eBPF: the watcher builds on these pieces.

pub mod baseline;
pub mod beneath;
pub mod container;
pub mod error;
pub mod hash;
pub mod journal;
pub mod lock;
mod mapped;
pub mod mounts;
pub mod policy;
pub mod record;
pub mod report;
pub mod request;
pub mod root;
pub mod scan;
pub mod seal;
pub mod sign;
pub mod store;
pub mod verify;
mod walk;
pub mod workload;

pub use error::{Error, Result};
