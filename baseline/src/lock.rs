//! Exclusive use of a database or a journal by one process: an advisory `flock` on a lock file
//! beside it (`<path>.lock`), held for as long as the [`Lock`] lives, with the holder's pid
//! written inside so a refused process can name it. It owns nothing else: which paths are
//! locked, and for how long, is the caller's choice (`kubefim watch` holds its journal's for its
//! lifetime; `baseline accept` and `attach` hold the database's while they rewrite it).
//!
//! A lock file is never removed: removing it would let a second process lock a new file of
//! the same name while the first still holds the old one. The kernel drops the lock when the
//! holder exits, however it exits, so a killed holder leaves nothing stale.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::error::{Error, Result};

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct Lock {
    /// Keeps the lock: it belongs to this open file description.
    _file: std::fs::File,
    path: PathBuf,
}

/// The lock file of `path`: `<path>.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl Lock {
    /// Takes the exclusive lock of `path` (a database or a journal) for `what` this process
    /// does with it ("watch", "accept"), without waiting: when another process holds it, the
    /// error names that process's pid (when it wrote one) and what to do.
    pub fn acquire(path: &Path, what: &str) -> Result<Lock> {
        let lock = lock_path(path);
        // O_NOFOLLOW: a symlink planted at the lock's name must not make us write elsewhere.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock)
            .map_err(|e| Error::io("open the lock file", &lock, e))?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e != rustix::io::Errno::WOULDBLOCK {
                return Err(Error::io("lock", &lock, e.into()));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::Locked { path: path.to_owned(), lock, holder: Holder::parse(&holder) });
        }
        let stamp = format!("{} {what}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(stamp.as_bytes()))
            .map_err(|e| Error::io("write the lock file", &lock, e))?;
        Ok(Lock { _file: file, path: lock })
    }

    /// The lock of a database about to be rewritten from its current state (`accept`,
    /// `attach`), taken before that state is read so no rewrite is lost. `None` when there is
    /// no database and nowhere to put a lock (its directory is missing): the caller's open of
    /// it then says what is wrong.
    pub fn for_rewrite(db: &Path, what: &str) -> Result<Option<Lock>> {
        match Lock::acquire(db, what) {
            Ok(lock) => Ok(Some(lock)),
            Err(Error::Io { .. }) if db.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds a lock, as the holder wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id, if it wrote one.
    pub pid: Option<u32>,
    /// What it is doing (`watch`, `accept`, ...), if it said.
    pub what: Option<String>,
}

impl Holder {
    fn parse(text: &str) -> Holder {
        let mut words = text.split_whitespace();
        let pid = words.next().and_then(|p| p.parse().ok());
        // The holder's own words, shown in an error: kept short and printable.
        let what = words.next().filter(|w| w.len() <= 32 && w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        Holder { pid, what: what.map(str::to_owned) }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = self.what.as_deref().map_or_else(|| "another kubefim".to_owned(), |w| format!("kubefim {w}"));
        match self.pid {
            Some(pid) => write!(f, "{what} (pid {pid})"),
            None => write!(f, "{what} (pid unknown)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let first = Lock::acquire(&db, "watch").unwrap();
        // flock conflicts between open file descriptions, so the same process stands in for
        // a second one.
        let e = Lock::acquire(&db, "watch").unwrap_err();
        let Error::Locked { holder, .. } = &e else { panic!("not a lock error: {e}") };
        assert_eq!(holder.pid, Some(std::process::id()));
        let text = e.to_string();
        assert!(text.contains(&format!("kubefim watch (pid {})", std::process::id())), "{text}");
        assert!(text.contains(&lock_path(&db).display().to_string()), "{text}");
        drop(first);
        Lock::acquire(&db, "accept").unwrap();
    }

    #[test]
    fn a_symlink_at_the_lock_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, lock_path(&db)).unwrap();
        assert!(Lock::acquire(&db, "watch").is_err());
        assert!(!target.exists());
    }
}
