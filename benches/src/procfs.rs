//! What the harnesses read about running processes from outside: memory and CPU time
//! (`/proc/PID/status`, `/proc/PID/stat`), the whole machine's CPU time (`/proc/stat`) and
//! the kernel memory of the watcher's eBPF maps (the map fds it holds, `/proc/PID/fdinfo`,
//! named by `bpftool`). Reads only; no kubefim knowledge beyond the map names.

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The maps whose memory grows with the baseline (or with the event rate), by the names the
/// eBPF side gives them (`kubefim_common::maps`).
pub const KERNEL_MAPS: [&str; 3] = ["WATCHED", "NAMES", "EVENTS"];

/// Resident and peak resident memory, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path} (did the watcher exit?)"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok(Memory { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
}

/// Clock ticks a second in /proc: USER_HZ is 100 in the kernel's user ABI whatever
/// CONFIG_HZ is.
pub const TICKS_PER_SECOND: f64 = 100.0;

/// User and system CPU time, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticks {
    pub user: u64,
    pub system: u64,
}

impl Ticks {
    /// `self - earlier`, in seconds: (user, system).
    pub fn seconds_since(self, earlier: Ticks) -> (f64, f64) {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS_PER_SECOND;
        (s(self.user, earlier.user), s(self.system, earlier.system))
    }

    fn add(self, other: Ticks) -> Ticks {
        Ticks { user: self.user + other.user, system: self.system + other.system }
    }
}

/// User and system CPU time of a whole process (all threads) so far.
pub fn cpu_ticks(pid: u32) -> Result<Ticks> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may hold spaces, hence the last ')'): state is
    // field 3, utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).with_context(|| format!("parsing {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields.get(i - 3).and_then(|f| f.parse().ok()).with_context(|| format!("parsing field {i} of {path}"))
    };
    Ok(Ticks { user: ticks(14)?, system: ticks(15)? })
}

/// The CPU time of several processes together; one that is gone counts for nothing (its
/// ticks until then are lost: callers read monitors that outlive the window).
pub fn cpu_ticks_of(pids: &[u32]) -> Ticks {
    pids.iter().filter_map(|&p| cpu_ticks(p).ok()).fold(Ticks::default(), Ticks::add)
}

/// User (with nice) and system CPU time of every CPU of the machine, from `/proc/stat`.
pub fn machine_ticks() -> Result<Ticks> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_default();
    match cpu[..] {
        [user, nice, system, ..] => Ok(Ticks { user: user + nice, system }),
        _ => bail!("no cpu line in /proc/stat"),
    }
}

/// User plus system CPU seconds of the whole process (all threads) so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let t = cpu_ticks(pid)?;
    Ok((t.user + t.system) as f64 / TICKS_PER_SECOND)
}

/// Bytes of kernel memory (`memlock`) per map name, for the [`KERNEL_MAPS`] the process holds.
/// Only this process's maps are counted (by map id from its fds), so other kubefim instances
/// on the machine (a concurrent test run) do not add to it.
pub fn kernel_maps(pid: u32) -> Result<BTreeMap<String, u64>> {
    let mut held: BTreeMap<u64, u64> = BTreeMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))? {
        let entry = entry.with_context(|| format!("listing {fd_dir}"))?;
        if fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-map") {
            let info_path = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(info) = fs::read_to_string(&info_path) else { continue };
            let field =
                |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok());
            if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
                held.insert(id, memlock);
            }
        }
    }
    if held.is_empty() {
        bail!("the watcher (pid {pid}) holds no eBPF map");
    }
    let out = Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .context("running bpftool -j map show (install bpftool, or pass --no-kernel-maps)")?;
    if !out.status.success() {
        bail!("bpftool -j map show failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let maps: Vec<Value> = serde_json::from_slice(&out.stdout).context("parsing bpftool -j map show")?;
    let mut by_name = BTreeMap::new();
    for map in maps {
        let (Some(id), Some(name)) = (map["id"].as_u64(), map["name"].as_str()) else { continue };
        if let Some(&memlock) = held.get(&id)
            && KERNEL_MAPS.contains(&name)
        {
            *by_name.entry(name.to_owned()).or_insert(0) += memlock;
        }
    }
    Ok(by_name)
}
