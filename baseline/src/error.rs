//! The one error type of the baseline library, and [`chain`], which writes any error with its
//! causes on one line. Each variant says what failed and, where a file is involved, which path;
//! the inner causes stay private so they can change.
//!
//! A variant that carries its cause as `source` never prints it too: the cause is printed once,
//! after the message, by whoever prints the whole chain (`main`, or [`chain`] where an error
//! becomes a string, such as the watcher's JSON `error` fields).

use std::path::PathBuf;

/// An error from policy loading, scanning, the store, signing or verifying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy file could not be read.
    #[error("cannot read policy {path} (a FimPolicy YAML file; `kubefim default-policy` prints one to start from)")]
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
    /// The baseline was written by a kubefim that stored records in scan order (format 1):
    /// it is still trusted and watched, but what needs its records in path order (verify,
    /// accepting some paths) cannot use it.
    #[error(
        "baseline {path} has format {version}, whose records are not in path order, so it cannot be \
         {what}; make a new one with `kubefim baseline create` (or `kubefim baseline accept` without paths)"
    )]
    OldFormat {
        /// The database.
        path: PathBuf,
        /// Its format version.
        version: u32,
        /// What could not be done ("verified").
        what: &'static str,
    },
    /// The database could not be created or written.
    #[error("baseline store {path}: {message}")]
    Store {
        /// The database.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The directory given as the host's root file system cannot be used.
    #[error(
        "cannot use {path} as the host root (--host-root takes the absolute path of the directory \
         the host's / is mounted at)"
    )]
    HostRoot {
        /// The directory given.
        path: PathBuf,
        /// Why not: the I/O error, or what is wrong with the path.
        source: std::io::Error,
    },
    /// Another process holds the lock of a database or journal (see `lock`): two watchers on
    /// one journal, or two rewrites of one database, would each undo what the other did.
    #[error(
        "{path} is in use by {holder} (it holds {lock}); wait for it to finish or stop it, then run \
         this again"
    )]
    Locked {
        /// The database or journal.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// Who holds it, as far as it said.
        holder: crate::lock::Holder,
    },
    /// A file system operation failed on a path.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done, as a verb phrase ("read the signature").
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Error {
    /// `action` failed on `path`: "cannot {action} {path}", caused by `source`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    /// True when the error means the baseline must not be trusted (exit code 3).
    pub fn is_untrusted(&self) -> bool {
        matches!(self, Error::Untrusted { .. })
    }

    /// True when another process holds the lock of what this one needed (exit code 4).
    pub fn is_locked(&self) -> bool {
        matches!(self, Error::Locked { .. })
    }
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `error` and its causes on one line, outermost first: "outer: inner: innermost".
///
/// For every place an error becomes a string (a JSON `error` field, a log field, the binary's
/// error line) rather than travelling on as an error: [`std::fmt::Display`] alone gives only
/// the outermost message, since messages do not repeat their cause. A cause whose text is
/// already on the line is left out, so a dependency's error that prints its source in its own
/// message (as some of aya's and kube's do) still says it once.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if line.is_empty() {
            line = text;
        } else if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn not_found() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn messages_do_not_repeat_their_source() {
        let cause = not_found().to_string();
        let errors = [
            Error::PolicyRead { path: "/p.yaml".into(), source: not_found() },
            Error::HostRoot { path: "/host".into(), source: not_found() },
            Error::io("read the signature", "/sig", not_found()),
        ];
        for e in &errors {
            let message = e.to_string();
            assert!(!message.contains(&cause), "{message:?} prints its source, which the chain prints again");
            assert_eq!(chain(e).matches(&cause).count(), 1, "{}", chain(e));
        }
    }

    #[test]
    fn chain_writes_every_cause_outermost_first() {
        assert_eq!(
            chain(&Error::io("read the signature", "/sig", not_found())),
            format!("cannot read the signature /sig: {}", not_found())
        );
        // Three levels: io::Error::other shows its inner error and hands on that one's source.
        let inner = Error::io("list the files of", "/db", not_found());
        let outer = Error::HostRoot { path: "/host".into(), source: io::Error::other(inner) };
        let line = chain(&outer);
        assert!(
            line.starts_with("cannot use /host as the host root (")
                && line.ends_with(&format!("): cannot list the files of /db: {}", not_found())),
            "{line}"
        );
    }

    #[test]
    fn chain_says_a_cause_once_when_a_message_already_repeats_it() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Repeats(#[source] io::Error);
        assert_eq!(chain(&Repeats(not_found())), format!("outer: {}", not_found()));
    }

    #[test]
    fn chain_of_an_error_without_source_is_its_message() {
        let e = Error::Key { path: "/k".into(), message: "not a key".into() };
        assert_eq!(chain(&e), e.to_string());
    }
}
