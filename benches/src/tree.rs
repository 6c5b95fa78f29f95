//! The generated tree one size measures: N regular files of 256 bytes, 1000 per directory
//! (`d0000/f0000` ...), the layout of the trees made by hand before this harness (so that
//! `/var/tmp/scale/t1m` is reused as it is). Owns checking, completing, and the probe file
//! that each run appends to (and puts back afterwards), and the sizes' names (`100k`, `1m`);
//! not what kubefim makes of the tree.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};

/// Files per directory.
const PER_DIR: u64 = 1000;
/// Every file's content: 255 `x` and a newline (what the hand-made trees hold).
const CONTENT: [u8; 256] = {
    let mut c = [b'x'; 256];
    c[255] = b'\n';
    c
};

/// A number of files as given on the command line: `100000`, `100k`, `1m`, `2.5m`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (number, unit) = match lower.strip_suffix('k') {
        Some(n) => (n, 1e3),
        None => lower.strip_suffix('m').map_or((lower.as_str(), 1.0), |n| (n, 1e6)),
    };
    let value: f64 = number.parse().map_err(|_| format!("{s:?} is not a size like 100000, 100k or 1m"))?;
    let files = (value * unit).round();
    if !(1.0..=1e9).contains(&files) {
        return Err(format!("{s:?}: sizes go from 1 to 1000m files"));
    }
    #[expect(clippy::cast_possible_truncation, reason = "between 1 and 1e9 (checked above), an integer after round()")]
    let files = files as u64;
    Ok(files)
}

/// The name of a size in paths: `1m`, `100k`, `1500`.
pub fn label(files: u64) -> String {
    match files {
        f if f.is_multiple_of(1_000_000) => format!("{}m", f / 1_000_000),
        f if f.is_multiple_of(1000) => format!("{}k", f / 1000),
        f => f.to_string(),
    }
}

/// A tree of `files` files under `path`.
pub struct Tree {
    pub path: PathBuf,
    pub files: u64,
}

impl Tree {
    fn dirs(&self) -> u64 {
        self.files.div_ceil(PER_DIR)
    }

    fn files_in(&self, dir: u64) -> u64 {
        PER_DIR.min(self.files - dir * PER_DIR)
    }

    fn dir_path(&self, dir: u64) -> PathBuf {
        self.path.join(format!("d{dir:04}"))
    }

    /// The file each run appends to: the first one.
    pub fn probe(&self) -> PathBuf {
        self.dir_path(0).join("f0000")
    }

    /// Directories that are missing files, or whose last file is short (an interrupted
    /// creation: files are made in order within a directory, so only the last one made can
    /// be partial). Fails on entries the layout does not have, rather than measuring a tree
    /// that is not the one asked for.
    pub fn incomplete_dirs(&self) -> Result<Vec<u64>> {
        if !self.path.exists() {
            return Ok((0..self.dirs()).collect());
        }
        let top = count_entries(&self.path)?;
        if top > self.dirs() {
            bail!(
                "{} has {top} entries where a tree of {} files has {} directories: remove it or choose another --root",
                self.path.display(),
                self.files,
                self.dirs()
            );
        }
        let mut incomplete = Vec::new();
        for dir in 0..self.dirs() {
            let path = self.dir_path(dir);
            if !path.is_dir() {
                incomplete.push(dir);
                continue;
            }
            let want = self.files_in(dir);
            let have = count_entries(&path)?;
            if have > want {
                bail!(
                    "{} has {have} entries, expected {want}: remove the tree or choose another --root",
                    path.display()
                );
            }
            let last = path.join(format!("f{:04}", want - 1));
            let last_ok = fs::symlink_metadata(&last).is_ok_and(|m| m.is_file() && m.len() == CONTENT.len() as u64);
            if have < want || !last_ok {
                incomplete.push(dir);
            }
        }
        Ok(incomplete)
    }

    /// (Re)writes every file of `dirs`, `threads` directories at a time.
    pub fn fill(&self, dirs: &[u64], threads: usize) -> Result<()> {
        let next = AtomicUsize::new(0);
        let first_error = Mutex::new(None);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&dir) = dirs.get(i) else { return };
                        if let Err(e) = self.fill_dir(dir) {
                            first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                            return;
                        }
                        if (i + 1).is_multiple_of(100) {
                            eprintln!(
                                "  tree: {} of {} directories written ({:.0} s)",
                                i + 1,
                                dirs.len(),
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fill_dir(&self, dir: u64) -> Result<()> {
        let path = self.dir_path(dir);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        for f in 0..self.files_in(dir) {
            let file = path.join(format!("f{f:04}"));
            fs::write(&file, CONTENT).with_context(|| format!("writing {} (is the disk full?)", file.display()))?;
        }
        Ok(())
    }
}

fn count_entries(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        entry.with_context(|| format!("listing {}", dir.display()))?;
        n += 1;
    }
    Ok(n)
}

/// The probe file's content and times before a run appended to it. Dropping it puts them
/// back (also when the run failed), so that the tree stays complete and a later run starts
/// from the same file; only its ctime stays changed (no system call sets it), so a baseline
/// that compares ctime reports this one file as modified in every run after its first.
pub struct ProbeRestore {
    path: PathBuf,
    accessed: SystemTime,
    modified: SystemTime,
}

impl ProbeRestore {
    /// Remembers the probe's times, after making sure it has its original length (a run
    /// killed before its restore leaves the appended line behind).
    pub fn new(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening the probe file {}", path.display()))?;
        let meta = file.metadata().with_context(|| format!("reading {}", path.display()))?;
        if meta.len() != CONTENT.len() as u64 {
            file.set_len(CONTENT.len() as u64).with_context(|| format!("truncating {}", path.display()))?;
        }
        let accessed = meta.accessed().with_context(|| format!("reading the atime of {}", path.display()))?;
        let modified = meta.modified().with_context(|| format!("reading the mtime of {}", path.display()))?;
        Ok(ProbeRestore { path: path.to_owned(), accessed, modified })
    }

    /// Appends one line to the probe (open, write, close: the close is what the watcher's
    /// event is about).
    pub fn append(&self) -> Result<()> {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {} to append", self.path.display()))?;
        file.write_all(b"kubefim watch_scale probe\n").with_context(|| format!("appending to {}", self.path.display()))
    }
}

impl Drop for ProbeRestore {
    fn drop(&mut self) {
        let restored = File::options().write(true).open(&self.path).and_then(|f| {
            f.set_len(CONTENT.len() as u64)?;
            f.set_times(FileTimes::new().set_accessed(self.accessed).set_modified(self.modified))
        });
        if let Err(e) = restored {
            eprintln!("warning: could not put the probe file {} back: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_their_names() {
        assert_eq!(parse_size("100k"), Ok(100_000));
        assert_eq!(parse_size("1M"), Ok(1_000_000));
        assert_eq!(parse_size("2.5m"), Ok(2_500_000));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert_eq!((label(1_000_000), label(100_000), label(1500)), ("1m".into(), "100k".into(), "1500".into()));
    }

    #[test]
    fn a_tree_is_written_checked_and_completed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree { path: dir.path().join("t"), files: 2500 };
        assert_eq!(tree.incomplete_dirs().unwrap(), [0, 1, 2]);
        tree.fill(&[0, 1, 2], 2).unwrap();
        assert!(tree.incomplete_dirs().unwrap().is_empty());
        assert_eq!(fs::read_dir(tree.path.join("d0002")).unwrap().count(), 500);
        fs::remove_file(tree.path.join("d0001/f0999")).unwrap();
        assert_eq!(tree.incomplete_dirs().unwrap(), [1]);
    }
}
