//! Server-set metadata: stripped before storing, stamped when reading.

use portico_core::Resource;
use portico_core::time::format_rfc3339;

/// Adds `metadata.revision` (and `metadata.expires`) to a stored JSON document.
pub fn stamp(value: &str, revision: i64, expires: Option<i64>) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(value) else {
        return value.to_string();
    };
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.insert("revision".into(), revision.into());
        if let Some(e) = expires {
            meta.insert("expires".into(), format_rfc3339(e).into());
        }
    }
    v.to_string()
}

/// The JSON to store: the resource without server-set fields.
pub fn to_stored(r: &Resource) -> String {
    let mut r = r.clone();
    let m = r.metadata_mut();
    m.revision = 0;
    m.expires = None;
    r.to_json()
}
