//! Validation of batch and queue names before they reach SQL or logs.

/// Longest accepted batch or queue name.
pub const MAX_NAME_LEN: usize = 128;

/// A name is 1..=128 characters of ASCII letters, digits, `.`, `_`, `-` and `:`,
/// starting with a letter or digit, so it is safe in URLs, metrics labels and file names.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{kind} name is {} characters long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "{kind} name {name:?} must start with a letter or a digit"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {bad:?}; allowed are letters, digits, '.', '_', '-' and ':'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn accepts_plain_names() {
        for ok in ["nightly-2026-11-21", "a", "q.email_v2", "b:1"] {
            assert!(validate_name("batch", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            "-x",
            "a b",
            "x';drop table t;--",
            "é",
            "a/b",
            &"x".repeat(129),
        ] {
            let err = validate_name("batch", bad).unwrap_err();
            assert!(err.starts_with("batch name"), "{err}");
        }
    }
}
