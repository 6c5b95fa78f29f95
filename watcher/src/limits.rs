//! The agent's descriptor budget. A watcher that runs out of file descriptors cannot open the
//! files it must rehash, list the directories whose entries changed, or accept a probe: at
//! start the soft `RLIMIT_NOFILE` is raised to the hard limit (which needs no privilege),
//! and the HTTP endpoint's connections are capped far below it (`http::MAX_CONNECTIONS`), so
//! that what a network client can hold never eats into [`DESCRIPTOR_RESERVE`]. This module
//! only sets and reads the limit; what fails for lack of descriptors is reported where it
//! fails (an `error` line for a rehash, never a change).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors the watcher keeps for itself beyond the endpoint's connections: the programs
/// and their links and perf events (about 200), the journal's files, the reader's /proc
/// look-ups, a rehash's open file and a rescan's directory walk (one per level), with room.
pub const DESCRIPTOR_RESERVE: u64 = 512;

/// What [`raise_descriptor_limit`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorLimit {
    /// The soft limit before.
    pub was: Option<u64>,
    /// The soft limit now (`None`: unlimited).
    pub now: Option<u64>,
}

impl DescriptorLimit {
    /// True when the limit leaves the watcher its reserve with every endpoint connection
    /// open.
    pub fn leaves_reserve(&self, connections: usize) -> bool {
        self.now.is_none_or(|n| n >= DESCRIPTOR_RESERVE + connections as u64)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. A failure leaves the limit as it was
/// (and is logged): the agent still runs, with the limit it was given.
pub fn raise_descriptor_limit() -> DescriptorLimit {
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
    if limit.current == limit.maximum {
        return DescriptorLimit { was: limit.current, now: limit.current };
    }
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => DescriptorLimit { was: limit.current, now: limit.maximum },
        Err(e) => {
            tracing::warn!(soft = ?limit.current, hard = ?limit.maximum, "cannot raise the descriptor limit: {e}");
            DescriptorLimit { was: limit.current, now: limit.current }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let limit = raise_descriptor_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(now.current, now.maximum, "{limit:?}");
        assert_eq!(limit.now, now.current);
    }

    #[test]
    fn the_reserve_is_counted_beside_the_connections() {
        let limit = DescriptorLimit { was: Some(256), now: Some(1024) };
        assert!(limit.leaves_reserve(64));
        assert!(!DescriptorLimit { was: None, now: Some(560) }.leaves_reserve(64));
        assert!(DescriptorLimit { was: None, now: None }.leaves_reserve(64));
    }
}
