//! Ready-made handlers for operators who do not write Rust: [`http::HttpHandler`] sends each
//! record to a URL, [`exec::ExecHandler`] runs a command per record. Both implement
//! [`tally::Handler`], are built from a validated config struct, and carry the record's
//! idempotency key on every delivery.

pub mod exec;
pub mod http;

pub use exec::{ExecConfig, ExecHandler};
pub use http::{HttpConfig, HttpHandler, HttpMethod, UrlTemplate};

/// A handler's configuration is invalid; holds every problem found, for the caller to report
/// at once before starting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid handler configuration: {}", .0.join("; "))]
pub struct ConfigError(pub Vec<String>);

/// Bytes a `last_error` excerpt (a response body, the end of stderr) holds at most.
pub const DEFAULT_ERROR_EXCERPT_BYTES: usize = 1024;

/// The first `max` bytes of `bytes` as text: cut at a character boundary, invalid UTF-8
/// replaced, NUL replaced (PostgreSQL text cannot hold it), and `…` appended when cut.
pub fn head_excerpt(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return clean_text(bytes);
    }
    let mut cut = max;
    // Back off to the start of the character that straddles the cut.
    while cut > 0 && is_continuation(bytes[cut]) {
        cut -= 1;
    }
    format!("{}…", clean_text(&bytes[..cut]))
}

/// The last `max` bytes of `bytes` as text, like [`head_excerpt`] but keeping the end, with
/// `…` prepended when cut.
pub fn tail_excerpt(bytes: &[u8], max: usize) -> String {
    if bytes.len() <= max {
        return clean_text(bytes);
    }
    let mut start = bytes.len() - max;
    // Skip the rest of a character whose first bytes were cut off.
    while start < bytes.len() && is_continuation(bytes[start]) {
        start += 1;
    }
    format!("…{}", clean_text(&bytes[start..]))
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

fn clean_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .replace('\0', "\u{FFFD}")
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_excerpt_cuts_at_a_character_boundary() {
        assert_eq!(head_excerpt(b"short", 10), "short");
        assert_eq!(head_excerpt("héllo".as_bytes(), 2), "h…");
        assert_eq!(head_excerpt("héllo".as_bytes(), 3), "hé…");
        assert_eq!(head_excerpt(b"a\0b", 10), "a\u{FFFD}b");
        assert_eq!(head_excerpt(&[0xff, b'x'], 10), "\u{FFFD}x");
    }

    #[test]
    fn tail_excerpt_keeps_the_end_at_a_character_boundary() {
        assert_eq!(tail_excerpt(b"error\n", 10), "error");
        assert_eq!(tail_excerpt("aé".as_bytes(), 1), "…");
        assert_eq!(tail_excerpt("abcé".as_bytes(), 2), "…é");
        assert_eq!(tail_excerpt(b"0123456789", 3), "…789");
    }
}
