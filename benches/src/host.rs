//! The machine a report was made on, as its header prints it: CPUs, kernel, memory, load,
//! the file system of a path, and the versions of the tools measured.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// CPUs the harness may use.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The 1, 5 and 15 minute load averages.
pub fn load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// `2 CPUs, kernel 6.18.44, 23.5 GiB memory`.
pub fn machine() -> String {
    let uname = rustix::system::uname();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    format!(
        "{} CPUs, kernel {}, {:.1} GiB memory",
        cpus(),
        uname.release().to_string_lossy(),
        mem_kib as f64 / (1 << 20) as f64
    )
}

/// Now, as RFC 3339 UTC to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The file system type and source of the mount holding `path` (`ext4 on /dev/vda`).
pub fn file_system(path: &Path) -> String {
    let out =
        Command::new("findmnt").args(["-n", "-o", "FSTYPE,SOURCE", "-T"]).arg(path).stderr(Stdio::null()).output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let mut it = text.split_whitespace();
            match (it.next(), it.next()) {
                (Some(fs), Some(src)) => format!("{fs} on {src}"),
                (Some(fs), None) => fs.to_owned(),
                _ => "?".into(),
            }
        }
        _ => "?".into(),
    }
}

/// The first line a tool prints for its version (stdout, else stderr), or `program: not found`.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        }
        Err(_) => format!("{program}: not found"),
    }
}

/// Whether `program` can be run from PATH (or is a path that exists).
pub fn has(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
