//! What the watcher prints: one JSON object per line (`jsonl`, for log collectors) or a
//! short human form, for changes and for the watcher's own state (`rescan`, `lost`,
//! `degraded`). The change objects reuse verify's shapes (baseline::report), so a consumer
//! reads the same attributes from both.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use kubefim_baseline::policy::{Policy, path_bytes};
use kubefim_baseline::report::{change_json, escape_bytes};
use kubefim_baseline::verify::Change;
use serde_json::{Map, Value, json};

use crate::actor::Actor;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// For people.
    Human,
}

/// RFC 3339 UTC time with milliseconds.
pub fn time_string(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// How a change was found.
#[derive(Debug, Clone, Copy)]
pub enum DetectedBy {
    /// A kernel event and a targeted rehash.
    Event,
    /// A rescan (startup, interval, or after lost events).
    Rescan,
}

/// One change, as reported.
pub struct ChangeLine<'a> {
    /// The change.
    pub change: &'a Change,
    /// `renamed` (with `to`) instead of the change's own kind.
    pub renamed_to: Option<&'a Path>,
    /// What the kernel saw.
    pub ops: &'a [&'static str],
    /// Who.
    pub actor: Option<&'a Actor>,
    /// When (the latest event's time).
    pub time: SystemTime,
    /// Whether the path now equals the signed baseline.
    pub baseline_match: bool,
    /// How it was found.
    pub detected_by: DetectedBy,
}

impl ChangeLine<'_> {
    /// The JSON object.
    pub fn json(&self, policy: &Policy) -> Value {
        let mut o = Map::new();
        o.insert("time".into(), json!(time_string(self.time)));
        let mut body = change_json(self.change, policy);
        if let Some(to) = self.renamed_to {
            body.insert("kind".into(), json!("renamed"));
            let (text, lossy) = escape_bytes(path_bytes(to));
            let mut with_to = Map::new();
            for (k, v) in body {
                let after_path = k == "path" || k == "path_hex";
                with_to.insert(k, v);
                if after_path && !with_to.contains_key("to") {
                    with_to.insert("to".into(), json!(text));
                    if lossy {
                        with_to.insert("to_hex".into(), json!(hex_of(path_bytes(to))));
                    }
                }
            }
            body = with_to;
        }
        // Path and kind first, as in verify; then what only the watcher knows.
        let changed = body.remove("changed");
        let (old, new) = (body.remove("old"), body.remove("new"));
        let (diff, ranges) = (body.remove("diff"), body.remove("changed_ranges"));
        o.extend(body);
        o.insert("changed".into(), changed.unwrap_or(json!([])));
        o.insert("ops".into(), json!(self.ops));
        o.insert("old".into(), old.unwrap_or(Value::Null));
        o.insert("new".into(), new.unwrap_or(Value::Null));
        o.insert("diff".into(), diff.unwrap_or(Value::Null));
        o.insert("changed_ranges".into(), ranges.unwrap_or(Value::Null));
        o.insert("baseline_match".into(), json!(self.baseline_match));
        o.insert("process".into(), self.actor.map_or(Value::Null, Actor::process_json));
        o.insert("container".into(), self.actor.map_or(Value::Null, Actor::container_json));
        o.insert("pod".into(), self.actor.and_then(|a| a.pod.clone()).unwrap_or(Value::Null));
        // Who, in one word: `host`, `container` or `pod`; null when found by a rescan.
        o.insert("origin".into(), self.actor.map_or(Value::Null, |a| json!(a.origin())));
        let by = match self.detected_by {
            DetectedBy::Event => "event",
            DetectedBy::Rescan => "rescan",
        };
        o.insert("detected_by".into(), json!(by));
        Value::Object(o)
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A line about the watcher's own state (`kind`: rescan, lost, degraded, ...).
pub fn state_line(kind: &str, fields: Value) -> Value {
    let mut o = Map::new();
    o.insert("time".into(), json!(time_string(SystemTime::now())));
    o.insert("kind".into(), json!(kind));
    if let Value::Object(f) = fields {
        o.extend(f);
    }
    Value::Object(o)
}

/// Writes lines to stdout in the chosen format.
pub struct Printer {
    format: Format,
    out: std::io::BufWriter<std::io::Stdout>,
}

impl Printer {
    /// A printer on stdout.
    pub fn new(format: Format) -> Self {
        Printer { format, out: std::io::BufWriter::new(std::io::stdout()) }
    }

    /// Prints one line (a change or a state line). A closed stdout ends the watcher.
    pub fn print(&mut self, line: &Value) -> std::io::Result<()> {
        match self.format {
            Format::Jsonl => writeln!(self.out, "{line}")?,
            Format::Human => writeln!(self.out, "{}", human(line))?,
        }
        Ok(())
    }

    /// Flushes what was printed.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn human(line: &Value) -> String {
    let s = |k: &str| line.get(k).and_then(Value::as_str).unwrap_or("");
    let kind = s("kind");
    match kind {
        "added" | "removed" | "modified" | "renamed" => {
            let mut text = format!("{} {kind:<8} {}", s("time"), s("path"));
            if kind == "renamed" {
                text.push_str(&format!(" -> {}", s("to")));
            }
            let list = |k: &str| {
                line.get(k)
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default()
            };
            if !list("changed").is_empty() {
                text.push_str(&format!(" [{}]", list("changed")));
            }
            if !list("ops").is_empty() {
                text.push_str(&format!(" ops={}", list("ops")));
            }
            if let Some(p) = line.get("process").filter(|p| !p.is_null()) {
                text.push_str(&format!(" by {}[{}] uid={}", p["comm"].as_str().unwrap_or("?"), p["pid"], p["uid"]));
            }
            if let Some(id) = line.get("container").and_then(|c| c.get("id")).and_then(Value::as_str) {
                text.push_str(&format!(" container={}", &id[..id.len().min(12)]));
            }
            if line.get("baseline_match") == Some(&json!(true)) {
                text.push_str(" (matches the baseline again)");
            }
            if let Some(diff) = line.get("diff").and_then(Value::as_str) {
                text.push('\n');
                text.push_str(diff.trim_end());
            }
            text
        }
        _ => {
            let mut o = line.as_object().cloned().unwrap_or_default();
            o.remove("time");
            o.remove("kind");
            format!("{} {kind}: {}", s("time"), Value::Object(o))
        }
    }
}
