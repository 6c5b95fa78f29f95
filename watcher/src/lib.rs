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

/// The watcher's hot paths on their real types, for the criterion benches of
/// `kubefim-benches` (`benches/benches/watcher_paths.rs`), behind the `bench` feature: the
/// debounce queue (`pending`) and the baseline index (`index`), which are crate-private, get
/// a thin handle each; event decoding is [`kernel::KernelEvent::decode`]. Not an API.
#[cfg(feature = "bench")]
#[doc(hidden)]
pub mod bench {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::{Instant, SystemTime};

    use kubefim_baseline::record::FileKind;
    use kubefim_common::InodeKey;

    pub use crate::model::FileOp;

    /// `pending::Queue`, fed by one process.
    pub struct DebounceQueue {
        queue: crate::pending::Queue,
        actor: Arc<crate::actor::Actor>,
    }

    impl DebounceQueue {
        /// An empty queue; its events come from a host process `pid`.
        pub fn new(pid: u32) -> DebounceQueue {
            let process = crate::model::Process {
                pid,
                ppid: 1,
                uid: 0,
                gid: 0,
                comm: "bench".to_owned(),
                exe: None,
                cmdline: None,
            };
            let actor = Arc::new(crate::actor::Actor { process, container: None, pod: None });
            DebounceQueue { queue: crate::pending::Queue::default(), actor }
        }

        /// Notes a syscall event on `path`, as the loop does (`close`: a writer's close).
        pub fn note(&mut self, path: &Path, op: Option<FileOp>, close: bool, time: SystemTime) {
            let note = crate::pending::Note { op, close, syscall: true, inferred: false };
            self.queue.note(path, &self.actor, note, time);
        }

        /// Takes what is due (everything with `all`); how many paths that was.
        pub fn take_due(&mut self, all: bool) -> usize {
            self.queue.take_due(all).len()
        }

        /// When the next path is due.
        pub fn next_due(&self) -> Option<Instant> {
            self.queue.next_due()
        }
    }

    /// `index::Index`, built as `state::State::load` builds it from a baseline's records.
    pub struct BaselineIndex(crate::index::Index);

    impl BaselineIndex {
        /// An index of `(path, inode, is a directory)`, in any order.
        pub fn build<'a>(records: impl IntoIterator<Item = (&'a [u8], InodeKey, bool)>) -> BaselineIndex {
            let mut builder = crate::index::IndexBuilder::new();
            for (path, key, is_dir) in records {
                let id = builder.entry_for(path, is_dir);
                let kind = if is_dir { FileKind::Dir } else { FileKind::File };
                builder.set(id, Some((key, kind, key.ino)), crate::index::SIGNED);
            }
            BaselineIndex(builder.finish())
        }

        /// The entry of a path (`State::get`'s first step).
        pub fn lookup(&self, path: &Path) -> Option<u32> {
            self.0.lookup(path)
        }

        /// The paths whose current inode is `key` (`State::paths_of_inode`: an inode event).
        pub fn paths_of_inode(&self, key: InodeKey) -> Vec<PathBuf> {
            self.0.ids_of_inode(key).into_iter().map(|id| self.0.path(id)).collect()
        }
    }
}
