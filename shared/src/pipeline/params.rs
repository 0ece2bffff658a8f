//! Run parameters: `:name` placeholders in queries become bind parameters (never text), `{name}`
//! in file paths is substituted, and a run's name and its stages' batch names are derived.

use std::collections::BTreeMap;

/// A run's parameter values, by name.
pub type Params = BTreeMap<String, String>;

/// A parameter name: a lower-case SQL-style identifier.
pub fn valid_param_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// A query with its `:name` placeholders replaced by `$1`, `$2`, …; returns the new text and
/// the parameter names in placeholder order. String literals, quoted identifiers,
/// dollar-quoted strings, comments and `::` casts are left alone.
pub fn bind_placeholders(query: &str) -> (String, Vec<String>) {
    let b = query.as_bytes();
    let mut out = String::with_capacity(query.len());
    let mut names: Vec<String> = Vec::new();
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let quote = b[i];
                i += 1;
                while i < b.len() {
                    if b[i] == quote {
                        // A doubled quote is an escaped one.
                        if i + 1 < b.len() && b[i + 1] == quote {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b'$' => {
                // $tag$ ... $tag$ (the tag may be empty); `$1` is not a dollar quote.
                let start = i;
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                if j < b.len() && b[j] == b'$' && !b[i + 1].is_ascii_digit() {
                    let tag = &query[start..=j];
                    match query[j + 1..].find(tag) {
                        Some(end) => i = j + 1 + end + tag.len(),
                        None => i = b.len(),
                    }
                } else {
                    i += 1;
                }
            }
            b':' if b.get(i + 1) == Some(&b':') => i += 2,
            b':' if i + 1 < b.len() && (b[i + 1].is_ascii_lowercase() || b[i + 1] == b'_') => {
                let mut j = i + 1;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                    j += 1;
                }
                let name = &query[i + 1..j];
                let n = match names.iter().position(|x| x == name) {
                    Some(p) => p + 1,
                    None => {
                        names.push(name.to_string());
                        names.len()
                    }
                };
                out.push_str(&query[copied..i]);
                out.push_str(&format!("${n}"));
                copied = j;
                i = j;
            }
            _ => i += 1,
        }
    }
    out.push_str(&query[copied.min(query.len())..]);
    (out, names)
}

/// The `{name}` placeholders of a path template.
pub fn path_placeholders(template: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        rest = &rest[open + close + 1..];
    }
    names
}

/// Fills a path template. A value that would leave its path segment (a `/`, `..`, a NUL) is
/// refused, so that a parameter cannot choose another file.
pub fn fill_path(template: &str, params: &Params) -> Result<String, String> {
    let mut path = template.to_string();
    for (name, value) in params {
        let placeholder = format!("{{{name}}}");
        if !path.contains(&placeholder) {
            continue;
        }
        if value.is_empty()
            || value.contains('/')
            || value.contains('\0')
            || value == ".."
            || value == "."
        {
            return Err(format!(
                "--param {name}={value:?} cannot be used in a file path (it is empty, or holds \
                 '/', NUL or a bare '.' or '..')"
            ));
        }
        path = path.replace(&placeholder, value);
    }
    Ok(path)
}

/// Characters of a parameter value kept as they are in a run's name; others are %-encoded.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

fn encode(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if plain(c) {
            out.push(c);
        } else {
            let mut buf = [0; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    out
}

/// A run's name: `pipeline/k=v,k2=v2` in the pipeline's parameter order, values %-encoded
/// outside letters, digits and `-_.:`.
pub fn run_name(pipeline: &str, order: &[String], params: &Params) -> String {
    let parts: Vec<String> = order
        .iter()
        .map(|k| {
            format!(
                "{k}={}",
                encode(params.get(k).map(String::as_str).unwrap_or(""))
            )
        })
        .collect();
    if parts.is_empty() {
        pipeline.to_string()
    } else {
        format!("{pipeline}/{}", parts.join(","))
    }
}

/// The batch of a stage: `pipeline:values:stage`, within the batch name rules, and `:rN` after
/// it from the run's second attempt on (a rerun prepares new batches). Values that are not
/// plain, or a name that would be too long, are replaced by a digest of the run's name, so
/// that two runs never share a batch.
pub fn batch_name(
    pipeline: &str,
    order: &[String],
    params: &Params,
    stage: &str,
    attempt: i32,
) -> String {
    let stage = if attempt > 1 {
        format!("{stage}:r{attempt}")
    } else {
        stage.to_string()
    };
    let values: Vec<&str> = order
        .iter()
        .map(|k| params.get(k).map(String::as_str).unwrap_or(""))
        .collect();
    let joined = values.join(":");
    let all_plain = values
        .iter()
        .all(|v| !v.is_empty() && v.chars().all(|c| plain(c) && c != ':'));
    let name = if values.is_empty() {
        format!("{pipeline}:{stage}")
    } else {
        format!("{pipeline}:{joined}:{stage}")
    };
    if all_plain && name.len() <= crate::names::MAX_NAME_LEN {
        return name;
    }
    use sha2::{Digest, Sha256};
    let digest: String = Sha256::digest(run_name(pipeline, order, params).as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{pipeline}:{digest}:{stage}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_bind_parameters() {
        let (q, names) = bind_placeholders(
            "select id from t where day = :date::date and x = ':date' and y = :n -- :c\n \
             and z = $$ :d $$ and \"a:b\" = :date",
        );
        assert_eq!(names, vec!["date", "n"]);
        assert_eq!(
            q,
            "select id from t where day = $1::date and x = ':date' and y = $2 -- :c\n \
             and z = $$ :d $$ and \"a:b\" = $1"
        );
        let (q, names) = bind_placeholders("select :date::text as id");
        assert_eq!(
            (q.as_str(), names),
            ("select $1::text as id", vec!["date".to_string()])
        );
        let (q, names) = bind_placeholders("select 'it''s :x' as id, array[1][1:2]");
        assert!(names.is_empty(), "{q}");
    }

    #[test]
    fn names_of_runs_and_batches() {
        let order = vec!["date".to_string()];
        let mut p = Params::new();
        p.insert("date".into(), "2024-06-01".into());
        assert_eq!(
            run_name("nightly-orders", &order, &p),
            "nightly-orders/date=2024-06-01"
        );
        assert_eq!(
            batch_name("nightly-orders", &order, &p, "load", 1),
            "nightly-orders:2024-06-01:load"
        );
        assert_eq!(
            batch_name("nightly-orders", &order, &p, "load", 2),
            "nightly-orders:2024-06-01:load:r2"
        );
        p.insert("date".into(), "'; drop table x; --".into());
        assert_eq!(
            run_name("n", &order, &p),
            "n/date=%27%3B%20drop%20table%20x%3B%20--"
        );
        let b = batch_name("n", &order, &p, "load", 3);
        assert!(b.ends_with(":load:r3"), "{b}");
        assert!(crate::names::validate_name("batch", &b).is_ok(), "{b}");
        for bad in ["../../etc/passwd", "..", ""] {
            p.insert("date".into(), bad.into());
            assert!(fill_path("/d/{date}.jsonl", &p).is_err(), "{bad}");
        }
        p.insert("date".into(), "2024-06-01".into());
        assert_eq!(
            fill_path("/d/{date}.jsonl", &p).unwrap(),
            "/d/2024-06-01.jsonl"
        );
    }
}
