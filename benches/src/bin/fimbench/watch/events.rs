//! What the watcher's JSON lines say, as the watch benchmark checks them: whether it
//! reported the final state of every path a workload left behind, and how long a change
//! took from `close()` to its line (the latency probe).

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::workload::WRITE;

/// How long a probe waits for its line.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state a workload left: every path under a directory (or one file), with its size
/// (`None` for a directory).
pub fn expected(root: &Path) -> Result<Vec<(PathBuf, Option<u64>)>> {
    let mut out = Vec::new();
    let meta = fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !meta.is_dir() {
        out.push((root.to_owned(), Some(meta.len())));
        return Ok(out);
    }
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let meta = e.metadata().with_context(|| format!("reading {}", e.path().display()))?;
            if meta.is_dir() {
                out.push((e.path(), None));
                stack.push(e.path());
            } else {
                out.push((e.path(), Some(meta.len())));
            }
        }
    }
    Ok(out)
}

/// What kubefim's output said about a workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    /// Paths whose last change line gives the state the workload left.
    pub final_states: usize,
    /// Paths the workload left.
    pub expected: usize,
    /// Change lines.
    pub lines: usize,
    /// Events the watcher said it lost.
    pub lost: u64,
    /// Rescans other than the startup one.
    pub rescans: usize,
}

/// Reads the watcher's JSON lines and compares the last change line of each path with
/// `expected`.
pub fn check(events: &Path, expected: &[(PathBuf, Option<u64>)]) -> Result<Reported> {
    let file = fs::File::open(events).with_context(|| format!("opening {}", events.display()))?;
    let mut last: HashMap<String, Value> = HashMap::new();
    let mut r = Reported { expected: expected.len(), ..Reported::default() };
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", events.display()))?;
        let Ok(v) = serde_json::from_slice::<Value>(&line) else { continue };
        match v["kind"].as_str().unwrap_or("") {
            "lost" => r.lost += v["events"].as_u64().unwrap_or(0),
            "rescan" if v["reason"].as_str() != Some("startup") => r.rescans += 1,
            kind @ ("added" | "modified" | "removed" | "renamed") => {
                let Some(path) = v["path"].as_str() else { continue };
                r.lines += 1;
                last.insert(path.to_owned(), v["new"].clone());
                if kind == "renamed"
                    && let Some(to) = v["to"].as_str()
                {
                    last.insert(to.to_owned(), v["new"].clone());
                }
            }
            _ => {}
        }
    }
    r.final_states = expected
        .iter()
        .filter(|(path, size)| {
            path.to_str()
                .and_then(|p| last.get(p))
                .is_some_and(|new| !new.is_null() && size.is_none_or(|s| new["size"].as_u64() == Some(s)))
        })
        .count();
    Ok(r)
}

/// Latencies of `samples` probes, in ms, and how many were never reported: each appends
/// 64 B to `file`, closes it, and waits for the line showing `file` at its new size in
/// `events`, read by polling every 0.5 ms (arrival time, not the line's own `time`).
pub fn latency(file: &Path, events: &Path, samples: usize, interval: Duration) -> Result<(Vec<f64>, usize)> {
    let mut ev = fs::File::open(events).with_context(|| format!("opening {}", events.display()))?;
    ev.seek(SeekFrom::End(0)).context("seeking to the end of the events")?;
    let want_path = file.to_str().context("the probe path is UTF-8")?;
    let mut pending: Vec<u8> = Vec::new();
    let (mut lat, mut missed) = (Vec::new(), 0);
    for _ in 0..samples {
        let mut f =
            OpenOptions::new().append(true).open(file).with_context(|| format!("opening {}", file.display()))?;
        f.write_all(&WRITE).with_context(|| format!("appending to {}", file.display()))?;
        drop(f);
        let closed = Instant::now();
        let want = fs::metadata(file).with_context(|| format!("reading {}", file.display()))?.len();
        let mut found = false;
        while !found && closed.elapsed() < PROBE_TIMEOUT {
            let mut chunk = Vec::new();
            ev.read_to_end(&mut chunk).context("reading the events")?;
            if chunk.is_empty() {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            let arrived = closed.elapsed();
            pending.extend_from_slice(&chunk);
            let end = pending.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            for line in pending[..end].split(|&b| b == b'\n') {
                let Ok(v) = serde_json::from_slice::<Value>(line) else { continue };
                if v["path"].as_str() == Some(want_path) && v["new"]["size"].as_u64() == Some(want) {
                    lat.push(arrived.as_secs_f64() * 1e3);
                    found = true;
                }
            }
            pending.drain(..end);
        }
        if !found {
            missed += 1;
        }
        std::thread::sleep(interval);
    }
    Ok((lat, missed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_state_of_each_path_is_its_last_change_line() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let lines = [
            r#"{"kind":"rescan","reason":"startup"}"#,
            r#"{"kind":"modified","path":"/t/a","new":{"size":64}}"#,
            r#"{"kind":"modified","path":"/t/a","new":{"size":128}}"#,
            r#"{"kind":"modified","path":"/t/b","new":{"size":64}}"#,
            r#"{"kind":"added","path":"/t/d","new":{"size":4096}}"#,
            r#"{"kind":"renamed","path":"/t/tmp","to":"/t/c","new":{"size":5}}"#,
            r#"{"kind":"lost","events":3}"#,
            r#"{"kind":"rescan","reason":"lost"}"#,
            "not json",
        ];
        fs::write(&events, lines.join("\n")).unwrap();
        let expected = [
            (PathBuf::from("/t/a"), Some(128)),
            (PathBuf::from("/t/b"), Some(128)),
            (PathBuf::from("/t/c"), Some(5)),
            (PathBuf::from("/t/d"), None),
            (PathBuf::from("/t/e"), Some(0)),
        ];
        let r = check(&events, &expected).unwrap();
        assert_eq!(r, Reported { final_states: 3, expected: 5, lines: 5, lost: 3, rescans: 1 });
    }

    #[test]
    fn expected_lists_a_tree_or_one_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/f"), b"abc").unwrap();
        let mut e = expected(dir.path()).unwrap();
        e.sort();
        assert_eq!(e, [(dir.path().join("d"), None), (dir.path().join("d/f"), Some(3))]);
        assert_eq!(expected(&dir.path().join("d/f")).unwrap(), [(dir.path().join("d/f"), Some(3))]);
    }
}
