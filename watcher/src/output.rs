//! Where lines go: standard output, one JSON object per line (`jsonl`, for log collectors:
//! the serde form of [`Event`]) or the short human form (its `Display`). A closed stdout
//! ends the watcher.

use std::fmt;
use std::io::Write;

use crate::model::{Change, Event, Line};

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// For people.
    Human,
}

/// Writes lines to stdout in the chosen format.
pub(crate) struct Printer {
    format: Format,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl Printer {
    /// A printer on stdout.
    pub fn new(format: Format) -> Self {
        Printer { format, out: std::io::BufWriter::new(std::io::stdout()) }
    }

    /// Prints one line.
    pub fn print(&mut self, event: &Event) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => {
                serde_json::to_writer(&mut self.out, event)?;
                self.out.write_all(b"\n")
            }
            Format::Human => writeln!(self.out, "{event}"),
        }
    }

    /// Flushes what was printed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = &self.time;
        match &self.line {
            Line::Added(c) => change(f, time, "added", c),
            Line::Removed(c) => change(f, time, "removed", c),
            Line::Modified(c) => change(f, time, "modified", c),
            Line::Renamed(c) => change(f, time, "renamed", c),
            Line::MountedOver(m) => {
                write!(f, "{time} mounted-over {} ops={}", m.target.bytes.text, m.op)?;
                match (&m.fs_type, &m.source) {
                    (Some(fs_type), Some(source)) => write!(f, " ({fs_type} from {source})")?,
                    _ if !m.mounted => write!(f, " (nothing mounted there now)")?,
                    _ => {}
                }
                write!(f, " by {}[{}] uid={}", m.process.comm, m.process.pid, m.process.uid)?;
                if let Some(container) = &m.container {
                    write!(f, " container={}", &container.id[..container.id.len().min(12)])?;
                }
                if let Some(pod) = &m.pod {
                    write!(f, " pod={}/{}", pod.namespace, pod.name)?;
                }
                Ok(())
            }
            Line::Rescan(r) => {
                write!(f, "{time} rescan ({}): {} scanned, {} changes", r.reason.as_str(), r.scanned, r.changes)?;
                if !r.scope.is_empty() {
                    write!(f, " under {}", r.scope.join(", "))?;
                }
                for u in &r.unverified {
                    write!(f, "\n  unverified {}: {}", u.path, u.error)?;
                }
                Ok(())
            }
            Line::Lost(l) => {
                write!(f, "{time} lost: {} events dropped by the {:?}; {}", l.events, l.dropped_by, l.action)
            }
            Line::Degraded(d) => {
                write!(f, "{time} degraded: {}", d.message)?;
                if !d.missing.is_empty() {
                    write!(f, " ({})", d.missing.join(", "))?;
                }
                if let Some(e) = &d.error {
                    write!(f, ": {e}")?;
                }
                Ok(())
            }
            Line::Error(e) => write!(f, "{time} error: {}: {}", e.path.bytes.text, e.error),
            Line::Verify(v) => {
                write!(
                    f,
                    "{time} verify ({:?}): {}: {} added, {} removed, {} modified, {} unverified",
                    v.reason,
                    v.result.as_str(),
                    v.added,
                    v.removed,
                    v.modified,
                    v.errors
                )?;
                for d in &v.deviations {
                    write!(f, "\n  {:?} {}", d.kind, d.path.bytes.text)?;
                }
                Ok(())
            }
            Line::AwaitingSignature(a) => write!(
                f,
                "{time} awaiting signature for node {} in {}: {}\n{}",
                a.node,
                a.signature_file,
                a.what_to_do,
                serde_json::to_string(&a.request).map_err(|_| fmt::Error)?
            ),
            Line::SignatureRejected(r) => write!(f, "{time} signature rejected for node {}: {}", r.node, r.error),
            Line::BaselineInstalled(b) => write!(f, "{time} baseline installed for node {} at {}", b.node, b.db),
        }
    }
}

fn change(f: &mut fmt::Formatter<'_>, time: &str, kind: &str, c: &Change) -> fmt::Result {
    write!(f, "{time} {kind:<8} {}", c.path.bytes.text)?;
    if let Some(to) = &c.to {
        write!(f, " -> {}", to.bytes.text)?;
    }
    if !c.changed.is_empty() {
        write!(f, " [{}]", join(&c.changed))?;
    }
    if !c.ops.is_empty() {
        write!(f, " ops={}", join(&c.ops))?;
    }
    for w in &c.processes {
        write!(f, " by {}[{}] uid={}", w.process.comm, w.process.pid, w.process.uid)?;
        if let Some(container) = &w.container {
            write!(f, " container={}", &container.id[..container.id.len().min(12)])?;
        }
        if let Some(pod) = &w.pod {
            write!(f, " pod={}/{}", pod.namespace, pod.name)?;
        }
    }
    if c.baseline_match {
        write!(f, " (matches the baseline again)")?;
    }
    if let Some(diff) = &c.diff {
        write!(f, "\n{}", diff.trim_end())?;
    }
    Ok(())
}
