//! Bytes in JSON without losing any: [`escape_bytes`] (the reversible escape of bytes that are
//! not UTF-8), [`EscapedBytes`] (that escape and, when it was needed, the bytes in hex) and
//! [`EscapedField`], which prints one under a pair of keys such as `path` / `path_hex` when
//! flattened into an object. It knows nothing of records or changes.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::policy::path_bytes;

/// Bytes as a JSON string: UTF-8 as is; otherwise invalid bytes as `\xNN` and backslashes
/// doubled. The bool says whether escaping was needed. [`EscapedBytes`] is built on it; the
/// watcher also calls it for its `to` key, until that is an [`EscapedField`] with keys of its own.
pub fn escape_bytes(bytes: &[u8]) -> (String, bool) {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return (s.to_owned(), false);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    (out, true)
}

/// A path for JSON fields that have no `_hex` twin: lossless escape of non-UTF-8 bytes.
/// Human output uses [`human_path`].
pub fn display_path(path: &Path) -> String {
    escape_bytes(path_bytes(path)).0
}

/// A path for human output, on one line whatever its bytes: [`human_text`] of its
/// [`display_path`]. A file name may hold CR, LF or an escape sequence; printed raw, it would
/// forge a line of the report (`modified /etc/x` on a line of its own) or restyle a terminal.
pub fn human_path(path: &Path) -> String {
    human_text(&display_path(path)).into_owned()
}

/// `text` with every control character (C0, DEL, C1) escaped: `\n`, `\r`, `\t`, else `\xNN`
/// (`\u{NN}` for C1), and backslashes doubled when anything was escaped so the escape reads
/// back unambiguously. Text without control characters is returned as it is.
pub fn human_text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Bytes as kubefim prints them: the text of [`escape_bytes`] and, only when that text is an
/// escape, the bytes themselves in lowercase hex (so a reader never has to undo the escape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EscapedBytes {
    /// The bytes when they are UTF-8, else their reversible escape.
    pub text: String,
    /// The bytes in lowercase hex; `Some` exactly when `text` is an escape.
    pub hex: Option<String>,
}

impl EscapedBytes {
    /// Escapes `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let (text, escaped) = escape_bytes(bytes);
        EscapedBytes { text, hex: escaped.then(|| hex::encode(bytes)) }
    }

    /// Escapes the bytes of `path`.
    pub fn of_path(path: &Path) -> Self {
        Self::new(path_bytes(path))
    }
}

/// The JSON keys an [`EscapedField`] is printed under: `TEXT` always, `HEX` only when the
/// bytes are not UTF-8. A type that prints another pair (the watcher's `to` / `to_hex`)
/// implements this on a unit struct of its own.
pub trait FieldKeys {
    /// The key of the text, e.g. `path`.
    const TEXT: &'static str;
    /// The key of the hex, e.g. `path_hex`.
    const HEX: &'static str;
    /// What the bytes are, for the schema's description of `TEXT` (one sentence).
    const WHAT: &'static str;
}

/// The keys `path` and `path_hex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathKeys;

impl FieldKeys for PathKeys {
    const TEXT: &'static str = "path";
    const HEX: &'static str = "path_hex";
    const WHAT: &'static str = "The path (with `--host-root`, the host path).";
}

/// [`EscapedBytes`] printed as the keys `K` names. Meant for `#[serde(flatten)]`, so that the
/// two keys sit in the enclosing object (`{"path": ..., "path_hex": ..., "kind": ...}`); its
/// schema is an object with those two properties, which schemars merges the same way.
pub struct EscapedField<K> {
    /// The escaped bytes.
    pub bytes: EscapedBytes,
    keys: PhantomData<fn() -> K>,
}

// By hand: derives would require `K` (a marker) to be Debug, Clone and PartialEq too.
impl<K> fmt::Debug for EscapedField<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.bytes.fmt(f)
    }
}

impl<K> Clone for EscapedField<K> {
    fn clone(&self) -> Self {
        self.bytes.clone().into()
    }
}

impl<K> PartialEq for EscapedField<K> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<K> Eq for EscapedField<K> {}

/// A path as `path` (and `path_hex`).
pub type EscapedPath = EscapedField<PathKeys>;

impl<K: FieldKeys> EscapedField<K> {
    /// Escapes `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        EscapedBytes::new(bytes).into()
    }

    /// Escapes the bytes of `path`.
    pub fn of_path(path: &Path) -> Self {
        EscapedBytes::of_path(path).into()
    }
}

impl<K> From<EscapedBytes> for EscapedField<K> {
    fn from(bytes: EscapedBytes) -> Self {
        EscapedField { bytes, keys: PhantomData }
    }
}

impl<K: FieldKeys> Serialize for EscapedField<K> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + usize::from(self.bytes.hex.is_some())))?;
        map.serialize_entry(K::TEXT, &self.bytes.text)?;
        if let Some(hex) = &self.bytes.hex {
            map.serialize_entry(K::HEX, hex)?;
        }
        map.end()
    }
}

impl<'de, K: FieldKeys> Deserialize<'de> for EscapedField<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys<K>(PhantomData<K>);

        impl<'de, K: FieldKeys> Visitor<'de> for Keys<K> {
            type Value = EscapedField<K>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an object with a string `{}` and maybe `{}`", K::TEXT, K::HEX)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut text, mut hex) = (None, None);
                // Other keys belong to the object this field is flattened into.
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == K::TEXT {
                        text = Some(map.next_value::<String>()?);
                    } else if key == K::HEX {
                        hex = map.next_value::<Option<String>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                let text = text.ok_or_else(|| de::Error::missing_field(K::TEXT))?;
                Ok(EscapedBytes { text, hex }.into())
            }
        }

        deserializer.deserialize_map(Keys(PhantomData))
    }
}

impl<K: FieldKeys> JsonSchema for EscapedField<K> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Escaped_{}", K::TEXT).into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let text = json!({
            "type": "string",
            "description": format!(
                "{} UTF-8 as is; otherwise each byte that is not part of valid UTF-8 as `\\xNN` and each backslash doubled, and `{}` is present.",
                K::WHAT,
                K::HEX
            ),
        });
        let hex = json!({
            "type": "string",
            "pattern": "^([0-9a-f]{2})+$",
            "description": format!("The bytes of `{}` in lowercase hex; present only when they are not UTF-8.", K::TEXT),
        });
        let properties: Map<String, Value> =
            [(K::TEXT.to_owned(), text), (K::HEX.to_owned(), hex)].into_iter().collect();
        Schema::try_from(json!({"type": "object", "properties": properties, "required": [K::TEXT]}))
            .expect("an object is a schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_text_escapes_every_control_character_and_nothing_else() {
        assert!(matches!(human_text("/etc/ok \\ é"), Cow::Borrowed("/etc/ok \\ é")));
        assert_eq!(human_text("a\nb\rc\td\u{1b}[2K\u{7f}\u{85}\\"), "a\\nb\\rc\\td\\x1b[2K\\x7f\\u{85}\\\\");
        assert_eq!(human_path(Path::new("/t/x\ny")), "/t/x\\ny");
    }

    #[test]
    fn escapes_only_what_is_not_utf8() {
        assert_eq!(escape_bytes(b"/etc/a\\b"), ("/etc/a\\b".into(), false));
        assert_eq!(escape_bytes(b"bad\xffname\\x"), ("bad\\xffname\\\\x".into(), true));
        assert_eq!(EscapedBytes::new(b"/etc/a\\b"), EscapedBytes { text: "/etc/a\\b".into(), hex: None });
        assert_eq!(
            EscapedBytes::new(b"a\\\xff"),
            EscapedBytes { text: "a\\\\\\xff".into(), hex: Some("615cff".into()) }
        );
    }

    /// The watcher's second pair of keys, declared the way it would declare it.
    struct ToKeys;

    impl FieldKeys for ToKeys {
        const TEXT: &'static str = "to";
        const HEX: &'static str = "to_hex";
        const WHAT: &'static str = "Where the path was renamed to.";
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Renamed {
        #[serde(flatten)]
        path: EscapedPath,
        #[serde(flatten)]
        to: Option<EscapedField<ToKeys>>,
        kind: String,
    }

    #[test]
    fn two_pairs_of_keys_flatten_into_one_object_and_back() {
        let line = Renamed {
            path: EscapedPath::new(b"/etc/a\xff"),
            to: Some(EscapedField::new(b"/etc/b")),
            kind: "renamed".into(),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(text, r#"{"path":"/etc/a\\xff","path_hex":"2f6574632f61ff","to":"/etc/b","kind":"renamed"}"#);
        assert_eq!(serde_json::from_str::<Renamed>(&text).unwrap(), line);
        let without_to = Renamed { to: None, ..line };
        let text = serde_json::to_string(&without_to).unwrap();
        assert_eq!(text, r#"{"path":"/etc/a\\xff","path_hex":"2f6574632f61ff","kind":"renamed"}"#);
        assert_eq!(serde_json::from_str::<Renamed>(&text).unwrap(), without_to);

        let schema = serde_json::to_value(schemars::schema_for!(Renamed)).unwrap();
        let properties: Vec<&str> = schema["properties"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(properties, ["path", "path_hex", "to", "to_hex", "kind"], "{schema:#}");
        assert_eq!(schema["required"], json!(["path", "kind"]), "{schema:#}");
    }
}
