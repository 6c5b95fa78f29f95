//! The workloads the watch benchmark measures, run as real children: the harness starts
//! itself again with the hidden `workload` subcommand, so what the kernel hooks see is a
//! process doing nothing but the syscalls of the workload (as the C loop of the former
//! script did), and the sampler's `wait4` gets that process's own CPU time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

/// The bytes of every write: 63 `x` and a newline.
pub const WRITE: [u8; 64] = {
    let mut b = [b'x'; 64];
    b[63] = b'\n';
    b
};

#[derive(Subcommand, Debug, Clone)]
pub enum Workload {
    /// `iters` x (open(O_WRONLY|O_APPEND) + write 64 B + close), round-robin over the files
    /// DIR/f00000 ... DIR/f{files-1}.
    Loop { dir: PathBuf, files: usize, iters: u64 },
    /// `writes` x write(64 B) to one file, opened once (O_WRONLY|O_APPEND), then closed.
    Append { file: PathBuf, writes: u64 },
}

/// Runs a workload in this process.
pub fn run(workload: &Workload) -> Result<()> {
    match workload {
        Workload::Loop { dir, files, iters } => {
            if *files == 0 {
                bail!("the loop needs at least one file");
            }
            let paths: Vec<PathBuf> = (0..*files).map(|i| dir.join(format!("f{i:05}"))).collect();
            let mut open = OpenOptions::new();
            open.append(true);
            for i in 0..*iters {
                let path = &paths[usize::try_from(i % *files as u64).context("an index below files")?];
                let mut f = open.open(path).with_context(|| format!("opening {}", path.display()))?;
                let n = f.write(&WRITE).with_context(|| format!("writing {}", path.display()))?;
                if n != WRITE.len() {
                    bail!("a short write to {} ({n} bytes)", path.display());
                }
                // Dropping closes (close(2) without looking at its result): the close is
                // part of what is measured, an error of it is not expected on a local file.
                drop(f);
            }
        }
        Workload::Append { file, writes } => {
            let mut f: File =
                OpenOptions::new().append(true).open(file).with_context(|| format!("opening {}", file.display()))?;
            for _ in 0..*writes {
                let n = f.write(&WRITE).with_context(|| format!("writing {}", file.display()))?;
                if n != WRITE.len() {
                    bail!("a short write to {} ({n} bytes)", file.display());
                }
            }
        }
    }
    Ok(())
}
