//! The classic Prometheus text format (0.0.4), made from the OpenMetrics text that
//! `prometheus_client` writes. It owns this one rewrite and nothing else: which format a client
//! gets is `http`'s decision, what the metrics are is `metrics`'.
//!
//! Why it exists: `prometheus_client` encodes OpenMetrics only, and no crate converts its
//! output; yet `promtool check metrics`, older Prometheus servers, and the agents and
//! exporters that scrape with `Accept: text/plain;version=0.0.4` read only the classic format,
//! in which OpenMetrics' `info` type is unknown (promtool: `unknown metric type "info"`).
//!
//! The two formats differ, for what we register, in the metadata and a few lines, never in a
//! sample's name or value, so the rewrite is line by line:
//! - a family's `# TYPE`/`# HELP` name: a counter's gets `_total` and an info's `_info` (the
//!   name its samples carry; classic metadata names the samples), and `info` becomes `gauge`
//!   (its sample is a constant 1), `stateset` `gauge`, `unknown` and `gaugehistogram`
//!   `untyped` (their samples have no classic shape);
//! - `# UNIT` and `# EOF` lines dropped (classic has neither);
//! - a counter's or histogram's `_created` sample dropped (classic has none), and so is any
//!   exemplar (` # {...} value` after a sample's value);
//! - everything else (gauges, histograms, label escaping, `+Inf`) is the same in both.

/// A sample line's metric name, labels and value, with what OpenMetrics may add after the
/// value (a timestamp, an exemplar) cut down to the timestamp. `None` for a line that is not
/// a sample (which the caller keeps as it is).
fn split_sample(line: &str) -> Option<(&str, &str)> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest_start = name_end;
    if line[name_end..].starts_with('{') {
        // Skip the label set, whose quoted values may hold `}`, `#` or escaped quotes.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in line[name_end..].char_indices() {
            match (in_quotes, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (_, false, '"') => in_quotes = !in_quotes,
                (false, _, '}') => {
                    end = Some(name_end + i + 1);
                    break;
                }
                _ => {}
            }
        }
        rest_start = end?;
    }
    let sample_end = line[rest_start..].find(" # ").map_or(line.len(), |i| rest_start + i);
    Some((name, &line[..sample_end]))
}

/// The classic type of an OpenMetrics type, and the suffix its samples add to the family's
/// name (which classic metadata must use).
fn classic_type(openmetrics: &str) -> (&'static str, &'static str) {
    match openmetrics {
        "counter" => ("counter", "_total"),
        "info" => ("gauge", "_info"),
        "gauge" | "stateset" => ("gauge", ""),
        "histogram" => ("histogram", ""),
        "summary" => ("summary", ""),
        _ => ("untyped", ""),
    }
}

/// `openmetrics` (as `prometheus_client::encoding::text::encode` writes it) in the classic
/// text format 0.0.4.
pub(super) fn from_openmetrics(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family the last `# TYPE` named, and its OpenMetrics type, to recognise its
    // `_created` samples.
    let mut family = "";
    let mut family_type = "";
    // `# HELP` comes before `# TYPE` in OpenMetrics but must carry the name the type implies:
    // held back until the type is known.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (classic, suffix) = classic_type(kind);
            if let Some((help_name, text)) = help.take() {
                // HELP escapes only `\` and newlines in classic, also `"` in OpenMetrics.
                let text = text.replace("\\\"", "\"");
                let help_name = if help_name == name { format!("{name}{suffix}") } else { help_name.to_owned() };
                out.push_str(&format!("# HELP {help_name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {classic}\n"));
            family = name;
            family_type = kind;
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            // Classic has no units and no end marker.
        } else if line.starts_with('#') || line.trim().is_empty() {
            out.push_str(line);
            out.push('\n');
        } else {
            match split_sample(line) {
                Some((name, sample)) => {
                    let created = matches!(family_type, "counter" | "histogram" | "summary")
                        && name.strip_prefix(family) == Some("_created");
                    if !created {
                        out.push_str(sample);
                        out.push('\n');
                    }
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    if let Some((name, text)) = help {
        // A HELP with no TYPE after it (not something prometheus_client writes): kept.
        out.push_str(&format!("# HELP {name} {text}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_names_units_and_markers() {
        let openmetrics = "\
# HELP app_build The version.
# TYPE app_build info
app_build_info{version=\"1.2.3\"} 1
# HELP app_events Events, by op.
# TYPE app_events counter
app_events_total{op=\"write\"} 2
app_events_created{op=\"write\"} 1700000000.0
# HELP app_up 1 when up.
# TYPE app_up gauge
app_up 1
# HELP app_rehash_seconds Time to rehash.
# TYPE app_rehash_seconds histogram
# UNIT app_rehash_seconds seconds
app_rehash_seconds_sum 0.5
app_rehash_seconds_count 2
app_rehash_seconds_bucket{le=\"0.1\"} 1 # {trace_id=\"x\"} 0.05
app_rehash_seconds_bucket{le=\"+Inf\"} 2
# HELP app_odd A \\\"quoted\\\" help.
# TYPE app_odd unknown
app_odd{path=\"a } # {b\"} 3 # {x=\"y\"} 1
# EOF
";
        let classic = from_openmetrics(openmetrics);
        assert_eq!(
            classic,
            "\
# HELP app_build_info The version.
# TYPE app_build_info gauge
app_build_info{version=\"1.2.3\"} 1
# HELP app_events_total Events, by op.
# TYPE app_events_total counter
app_events_total{op=\"write\"} 2
# HELP app_up 1 when up.
# TYPE app_up gauge
app_up 1
# HELP app_rehash_seconds Time to rehash.
# TYPE app_rehash_seconds histogram
app_rehash_seconds_sum 0.5
app_rehash_seconds_count 2
app_rehash_seconds_bucket{le=\"0.1\"} 1
app_rehash_seconds_bucket{le=\"+Inf\"} 2
# HELP app_odd A \"quoted\" help.
# TYPE app_odd untyped
app_odd{path=\"a } # {b\"} 3
"
        );
    }

    #[test]
    fn a_sample_split_keeps_labels_with_hashes_and_braces() {
        assert_eq!(split_sample("a 1"), Some(("a", "a 1")));
        assert_eq!(split_sample("a{x=\"}\\\"#\"} 1 # {e=\"1\"} 2"), Some(("a", "a{x=\"}\\\"#\"} 1")));
        assert_eq!(split_sample("a{x=\"unterminated"), None);
        assert_eq!(split_sample("noval"), None);
    }
}
