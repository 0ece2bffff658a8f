//! HTML for the dashboard: escaping (every id, payload and message is hostile text), the page
//! frame with its security headers, and the small pieces pages share.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Text made safe inside an element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A query-string value: everything but unreserved characters %-encoded.
pub fn url_value(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// No script at all, styles only from the binary's own stylesheet, no framing.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Adds the security headers every dashboard response carries.
pub fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A whole page. `refresh`: seconds after which the browser reloads it.
/// `who` is the header's right-hand side (already HTML).
pub fn page(
    status: StatusCode,
    title: &str,
    refresh: Option<u32>,
    who: &str,
    body: &str,
) -> Response {
    let refresh = refresh
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tally</title><link rel=\"stylesheet\" href=\"/assets/tally.css\"></head>\
         <body><header><a class=\"brand\" href=\"/\">Tally</a><nav><a href=\"/\">Batches</a>\
         <a href=\"/pipelines\">Pipelines</a><a href=\"/workers\">Workers</a></nav>\
         <span class=\"who\">{who}</span></header><main>{body}</main></body></html>",
        esc(title)
    );
    let mut response = (status, html).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(response)
}

/// The stylesheet, served from the binary.
pub fn stylesheet() -> Response {
    let mut response = include_str!("tally.css").into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    secure(response)
}

/// A progress bar split by state, as SVG (attributes, not inline styles, which the CSP
/// forbids).
pub fn bar(total: i64, parts: &[(&str, i64)]) -> String {
    let total = total.max(parts.iter().map(|(_, n)| *n).sum()).max(1) as f64;
    let mut x = 0.0;
    let mut rects = String::new();
    for (class, n) in parts {
        if *n <= 0 {
            continue;
        }
        let w = *n as f64 * 100.0 / total;
        rects.push_str(&format!(
            "<rect class=\"{class}\" x=\"{x:.3}\" y=\"0\" width=\"{w:.3}\" height=\"10\"><title>{class}: {n}</title></rect>"
        ));
        x += w;
    }
    format!(
        "<svg class=\"bar\" viewBox=\"0 0 100 10\" preserveAspectRatio=\"none\" role=\"img\">\
         <rect class=\"track\" x=\"0\" y=\"0\" width=\"100\" height=\"10\"></rect>{rects}</svg>"
    )
}

/// A state as a coloured label.
pub fn state(s: &str) -> String {
    format!(
        "<span class=\"state {}\">{}</span>",
        state_class(s),
        esc(&s.replace('_', " "))
    )
}

/// A state as a CSS class: only the characters a class name may hold.
pub fn state_class(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// 1234567 as "1,234,567".
pub fn int(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A rate per second, or a dash.
pub fn rate(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 100.0 => format!("{}/s", int(r.round() as i64)),
        Some(r) => format!("{r:.1}/s"),
        None => "–".into(),
    }
}

/// A duration in seconds, or a dash.
pub fn took(s: Option<f64>) -> String {
    s.map(tally::model::human_duration)
        .unwrap_or_else(|| "–".into())
}

/// Text cut to `max` characters, with an ellipsis.
pub fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_only_text() {
        assert_eq!(
            esc("<img src=x onerror=alert(1)>"),
            "&lt;img src=x onerror=alert(1)&gt;"
        );
        assert_eq!(
            esc("</script><script>\"'&"),
            "&lt;/script&gt;&lt;script&gt;&quot;&#39;&amp;"
        );
        assert_eq!(url_value("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(
            state("a\"><b"),
            "<span class=\"state ab\">a&quot;&gt;&lt;b</span>"
        );
        assert_eq!(int(1234567), "1,234,567");
        assert_eq!(int(-1000), "-1,000");
        assert_eq!(int(12), "12");
        assert_eq!(cut("abcdef", 3), "abc…");
    }

    #[test]
    fn bars_split_by_state() {
        let svg = bar(10, &[("complete", 5), ("failed", 5), ("pending", 0)]);
        assert!(svg.contains("class=\"complete\" x=\"0.000\" y=\"0\" width=\"50.000\""));
        assert!(svg.contains("class=\"failed\" x=\"50.000\""));
        assert!(!svg.contains("class=\"pending\""));
    }
}
