//! The generated tree one size measures: N regular files of 256 bytes, 1000 per directory
//! (`d0000/f0000` ...), the layout of the trees made by hand before this harness (so that
//! `/var/tmp/scale/t1m` is reused as it is). Owns checking, completing, and the probe file
//! that each run appends to (and puts back afterwards); not what kubefim makes of the tree.

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
