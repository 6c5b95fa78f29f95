//! Where lines go: standard output, one JSON object per line (`jsonl`, for log collectors:
//! the serde form of [`Event`]) or the short human form (its `Display`). A closed stdout
//! ends the watcher. The human form escapes control characters in every path, name and
//! message it prints ([`human_text`]): a file or process name holding CR or LF would otherwise
//! forge a line of the report.

use std::fmt;
use std::io::Write;

use kubefim_baseline::report::human_text as h;

use crate::model::{Change, Container, Event, Line, Reference};

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

/// Strings of the watcher's own (tracepoint names, subtrees) escaped and joined.
fn join_escaped(items: &[String]) -> String {
    items.iter().map(|i| h(i)).collect::<Vec<_>>().join(", ")
}

/// File content (a diff) for people: each line's control characters escaped, tabs kept.
fn content(text: &str) -> String {
    text.lines().map(|line| line.split('\t').map(h).collect::<Vec<_>>().join("\t")).collect::<Vec<_>>().join("\n")
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
                write!(f, "{time} mounted-over {} ops={}", h(&m.target.bytes.text), m.op)?;
                match (&m.fs_type, &m.source) {
                    (Some(fs_type), Some(source)) => write!(f, " ({} from {})", h(fs_type), h(source))?,
                    _ if !m.mounted => write!(f, " (nothing mounted there now)")?,
                    _ => {}
                }
                write!(f, " by {}[{}] uid={}", h(&m.process.comm), m.process.pid, m.process.uid)?;
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
                    write!(f, " under {}", join_escaped(&r.scope))?;
                }
                for u in &r.unverified {
                    write!(f, "\n  unverified {}: {}", h(&u.path), h(&u.error))?;
                }
                Ok(())
            }
            Line::Lost(l) => {
                write!(f, "{time} lost: {} events dropped by the {:?}; {}", l.events, l.dropped_by, l.action)
            }
            Line::Degraded(d) => {
                write!(f, "{time} degraded: {}", h(&d.message))?;
                if !d.missing.is_empty() {
                    write!(f, " ({})", join_escaped(&d.missing))?;
                }
                if let Some(e) = &d.error {
                    write!(f, ": {}", h(e))?;
                }
                Ok(())
            }
            Line::Error(e) => write!(f, "{time} error: {}: {}", h(&e.path.bytes.text), h(&e.error)),
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
                    write!(f, "\n  {:?} {}", d.kind, h(&d.path.bytes.text))?;
                }
                Ok(())
            }
            Line::AwaitingSignature(a) => write!(
                f,
                "{time} awaiting signature for node {} in {}: {}\n{}",
                h(&a.node),
                h(&a.signature_file),
                h(&a.what_to_do),
                serde_json::to_string(&a.request).map_err(|_| fmt::Error)?
            ),
            Line::SignatureRejected(r) => {
                write!(f, "{time} signature rejected for node {}: {}", h(&r.node), h(&r.error))
            }
            Line::BaselineInstalled(b) => {
                write!(f, "{time} baseline installed for node {} at {}", h(&b.node), h(&b.db))
            }
            Line::ContainerWatched(w) => {
                write!(f, "{time} container-watched {}", container(&w.container))?;
                if let Some(pod) = &w.pod {
                    write!(f, " pod={}/{}", h(&pod.namespace), h(&pod.name))?;
                }
                write!(
                    f,
                    " policies={}: {} scanned, {} changes against its image, {} entries watched",
                    join_escaped(&w.policies),
                    w.scanned,
                    w.changes,
                    w.watched
                )?;
                for e in &w.errors {
                    write!(f, "\n  cannot check it: {}", h(e))?;
                }
                for u in &w.unverified {
                    write!(f, "\n  unverified {}: {}", h(&u.path), h(&u.error))?;
                }
                Ok(())
            }
            Line::ContainerGone(g) => write!(f, "{time} container-gone {}", container(&g.container)),
            Line::PolicyRejected(r) => {
                let name = match &r.namespace {
                    Some(ns) => format!("{ns}/{}", r.name),
                    None => r.name.clone(),
                };
                write!(f, "{time} policy-rejected {} {}: {}", h(&r.policy_kind), h(&name), h(&r.error))
            }
            Line::LayerModified(l) => {
                write!(f, "{time} layer-modified {} in layer {}", h(&l.path.bytes.text), h(&l.layer))?;
                if let Some(p) = &l.process {
                    write!(f, " by {}[{}] uid={}", h(&p.comm), p.pid, p.uid)?;
                }
                match (&l.hash, &l.error) {
                    (Some(hash), _) => write!(f, " blake3={hash}")?,
                    (None, Some(e)) => write!(f, " (cannot read it: {})", h(e))?,
                    (None, None) => write!(f, " (gone)")?,
                }
                let used: Vec<String> = l.containers.iter().map(container).collect();
                write!(f, ", used by {}", used.join(", "))
            }
            Line::DriftExec(d) => {
                write!(
                    f,
                    "{time} drift-exec {} in container {} by {}[{}] uid={} blake3={}",
                    h(&d.path.bytes.text),
                    container(&d.container),
                    h(&d.process.comm),
                    d.process.pid,
                    d.process.uid,
                    d.hash
                )?;
                match &d.image_hash {
                    Some(image) => write!(f, " (the image's differs: {image})"),
                    None => write!(f, " (not in the image)"),
                }
            }
        }
    }
}

/// A container for people: its short id, and its name and image when known.
fn container(c: &Container) -> String {
    let mut out: String = h(&c.id).chars().take(12).collect();
    if let Some(name) = &c.name {
        out.push_str(&format!(" ({})", h(name)));
    }
    if let Some(image) = &c.image {
        out.push_str(&format!(" image={}", h(image)));
    }
    out
}

fn change(f: &mut fmt::Formatter<'_>, time: &str, kind: &str, c: &Change) -> fmt::Result {
    write!(f, "{time} {kind:<8} {}", h(&c.path.bytes.text))?;
    if c.baseline == Reference::Image
        && let Some(inside) = &c.container
    {
        write!(f, " in container {} (against its image)", container(inside))?;
    }
    if let Some(to) = &c.to {
        write!(f, " -> {}", h(&to.bytes.text))?;
    }
    if !c.changed.is_empty() {
        write!(f, " [{}]", join(&c.changed))?;
    }
    if !c.ops.is_empty() {
        write!(f, " ops={}", join(&c.ops))?;
    }
    for w in &c.processes {
        // comm is whatever the process named itself (prctl PR_SET_NAME): escaped too.
        write!(f, " by {}[{}] uid={}", h(&w.process.comm), w.process.pid, w.process.uid)?;
        if let Some(container) = &w.container {
            let id: String = container.id.chars().take(12).collect();
            write!(f, " container={}", h(&id))?;
        }
        if let Some(pod) = &w.pod {
            write!(f, " pod={}/{}", h(&pod.namespace), h(&pod.name))?;
        }
    }
    if c.baseline_match {
        write!(f, " (matches the baseline again)")?;
    }
    if c.already_known {
        write!(f, " (deviation already in the journal)")?;
    }
    if let Some(diff) = &c.diff {
        write!(f, "\n{}", content(diff.trim_end()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line as JSON (the watcher's own serde form), printed for people.
    fn human(json: serde_json::Value) -> String {
        let event: Event = serde_json::from_value(json).expect("an event");
        event.to_string()
    }

    #[test]
    fn control_characters_in_names_and_content_cannot_forge_a_line() {
        let change = human(serde_json::json!({
            "time": "t", "kind": "modified", "path": "/t/x\nt modified  /etc/passwd\u{1b}[2K\r",
            "changed": ["content"], "ops": ["write"], "old": null, "new": null,
            "diff": "--- a\n+++ b\n-alpha\n+\tbeta\r\u{1b}[1A", "changed_ranges": null, "baseline_match": false,
            "process": null, "container": null, "pod": null, "origin": null, "processes": [],
            "attribution": "none", "detected_by": "rescan", "baseline": "signed", "already_known": true,
        }));
        let lines: Vec<&str> = change.lines().collect();
        assert_eq!(lines.len(), 5, "one line and the four of the diff: {change:?}");
        assert_eq!(
            lines[0],
            "t modified /t/x\\nt modified  /etc/passwd\\x1b[2K\\r [content] ops=write (deviation already in the journal)"
        );
        assert_eq!(lines[4], "+\tbeta\\r\\x1b[1A", "tabs kept, the rest escaped");

        let error = human(serde_json::json!({"time": "t", "kind": "error", "path": "/t/a\nb", "error": "gone\r"}));
        assert_eq!(error, "t error: /t/a\\nb: gone\\r");
    }
}
