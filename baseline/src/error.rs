//! The one error type of the baseline library. Each variant says what failed and, where a
//! file is involved, which path; the inner causes stay private so they can change.

use std::path::PathBuf;

/// An error from policy loading, scanning, the store, signing or verifying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy file could not be read.
    #[error("cannot read policy {path}: {source}")]
    PolicyRead {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The policy is not valid; the message names the line where the parser knows it.
    #[error("invalid policy {origin}: {message}")]
    Policy {
        /// Where the policy came from (a path or "embedded default").
        origin: String,
        /// What is wrong, with the line.
        message: String,
    },
    /// A key file could not be read, parsed or written.
    #[error("key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong and what to do.
        message: String,
    },
    /// The baseline cannot be trusted: its signature is missing or does not verify with the
    /// given public key, or the database is corrupt or unreadable. Never to be softened.
    #[error("baseline {path} cannot be trusted: {reason}")]
    Untrusted {
        /// The database.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The database could not be created or written.
    #[error("baseline store {path}: {message}")]
    Store {
        /// The database.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A file system operation failed on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// True when the error means the baseline must not be trusted (exit code 3).
    pub fn is_untrusted(&self) -> bool {
        matches!(self, Error::Untrusted { .. })
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
