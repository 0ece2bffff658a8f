//! `--handler http`: each record's payload is sent as JSON to a URL, with its idempotency key.
//!
//! 2xx completes the record. 408, 429, 5xx, timeouts and connection or TLS errors are
//! retryable (a `Retry-After` header sets the delay). Any other status fails the record, with
//! the status and the start of the response body in its `last_error`.

use super::{head_excerpt, ConfigError, DEFAULT_ERROR_EXCERPT_BYTES};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use tally::{Handler, HandlerError, RecordContext};

/// How long one request may take, from connecting to the end of the response body.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of a response body read; the rest is discarded with the connection.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Longest `Retry-After` honoured; a server asking for more gets this.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Idle connections are kept this long for reuse.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// `<batch>/<record id>`, each part percent-encoded: the same on every delivery.
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The batch name, percent-encoded.
pub const HEADER_BATCH: &str = "tally-batch";
/// The record id, percent-encoded.
pub const HEADER_RECORD_ID: &str = "tally-record-id";
/// The attempt number: 1 on the first delivery.
pub const HEADER_ATTEMPT: &str = "tally-attempt";

/// Everything but RFC 3986's unreserved characters is encoded, so a value is one path segment
/// and a valid header value whatever it holds (`/`, `?`, `#`, spaces, unicode).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn encode_segment(value: &str) -> String {
    utf8_percent_encode(value, UNRESERVED).to_string()
}

/// The request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMethod {
    #[default]
    Post,
    Put,
}

impl FromStr for HttpMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "POST" => Ok(HttpMethod::Post),
            "PUT" => Ok(HttpMethod::Put),
            _ => Err(format!("method {s:?} is not supported; use POST or PUT")),
        }
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
        })
    }
}

impl From<HttpMethod> for reqwest::Method {
    fn from(m: HttpMethod) -> Self {
        match m {
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Put => reqwest::Method::PUT,
        }
    }
}

/// Settings of [`HttpHandler`]; [`HttpConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// URL template, e.g. `https://api.example.com/orders/{id}` (see [`UrlTemplate`]).
    pub url: String,
    pub method: HttpMethod,
    /// Extra request headers (name, value), e.g. `("Authorization", "Bearer …")`.
    pub headers: Vec<(String, String)>,
    /// Limit on one whole request ([`DEFAULT_TIMEOUT`]); past it the attempt is retryable.
    pub timeout: Duration,
    /// Most response-body bytes read ([`DEFAULT_MAX_BODY`]).
    pub max_body: usize,
    /// Cap on a server's `Retry-After` ([`DEFAULT_MAX_RETRY_AFTER`]).
    pub max_retry_after: Duration,
    /// Bytes of an error response's body kept in `last_error`.
    pub error_excerpt_bytes: usize,
}

impl HttpConfig {
    /// Defaults for a POST to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        HttpConfig {
            url: url.into(),
            method: HttpMethod::Post,
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            error_excerpt_bytes: DEFAULT_ERROR_EXCERPT_BYTES,
        }
    }
}

/// Splits `Name: value` into its name and (trimmed) value.
pub fn parse_header(line: &str) -> Result<(String, String), String> {
    match line.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!(
            "--header {line:?} is not of the form 'Name: value'"
        )),
    }
}

/// One piece of a [`UrlTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    RecordId,
    Batch,
    Field(String),
}

/// A URL with placeholders filled per record: `{id}` the record id, `{batch}` the batch name,
/// `{name}` the payload's top-level field `name` (a string, number or boolean). Each value is
/// percent-encoded as one path segment. `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

impl UrlTemplate {
    /// Parses and checks a template: balanced braces, and an absolute http(s) URL once filled.
    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = template.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => return Err(format!("unbalanced '{{' at byte {at} of --url")),
                            c => name.push(c),
                        }
                    }
                    if !closed {
                        return Err(format!("unbalanced '{{' at byte {at} of --url"));
                    }
                    if name.trim().is_empty() {
                        return Err(format!("empty placeholder '{{}}' at byte {at} of --url"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(match name.as_str() {
                        "id" => Part::RecordId,
                        "batch" => Part::Batch,
                        _ => Part::Field(name),
                    });
                }
                '}' => return Err(format!("unbalanced '}}' at byte {at} of --url")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let template_ = UrlTemplate { parts };
        template_.check_sample(template)?;
        Ok(template_)
    }

    /// Filled with a sample value, the template must be an absolute http(s) URL with a host.
    fn check_sample(&self, source: &str) -> Result<(), String> {
        let sample: String = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                _ => "x",
            })
            .collect();
        let url = Url::parse(&sample).map_err(|e| format!("--url {source:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "--url {source:?} has scheme {:?}; use http or https",
                url.scheme()
            ));
        }
        match url.host_str() {
            Some(host) if !host.is_empty() => Ok(()),
            _ => Err(format!("--url {source:?} has no host")),
        }
    }

    /// The payload fields the template names (other than `id` and `batch`).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The URL for one record; the error says which field is missing or unusable.
    pub fn render(
        &self,
        batch: &str,
        record_id: &str,
        payload: &serde_json::Value,
    ) -> Result<Url, String> {
        let mut url = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => url.push_str(s),
                Part::RecordId => url.push_str(&segment("id", record_id)?),
                Part::Batch => url.push_str(&segment("batch", batch)?),
                Part::Field(name) => {
                    let value = field_text(payload, name)?;
                    url.push_str(&segment(name, &value)?);
                }
            }
        }
        Url::parse(&url).map_err(|e| format!("the URL for this record is invalid: {e}"))
    }
}

/// `value` encoded as one path segment; `.` and `..` would be resolved away by the URL
/// parser (even encoded), so they are refused rather than silently changing the path.
fn segment(name: &str, value: &str) -> Result<String, String> {
    if value == "." || value == ".." {
        return Err(format!(
            "URL template field {{{name}}} is {value:?}, which cannot be a path segment"
        ));
    }
    Ok(encode_segment(value))
}

fn field_text(payload: &serde_json::Value, name: &str) -> Result<String, String> {
    use serde_json::Value;
    match payload.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        None | Some(Value::Null) => Err(format!(
            "the record has no field {name:?} for URL template field {{{name}}}"
        )),
        Some(_) => Err(format!(
            "field {name:?} of the record is an object or array; URL template field \
             {{{name}}} needs a string, number or boolean"
        )),
    }
}

/// The delay a `Retry-After` value asks for: whole seconds, or an HTTP date (a date in the
/// past means now). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits but too large for u64: as long as possible (the caller caps it).
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The outcome of a response: 2xx completes; 408, 429 and 5xx are retryable (after
/// `retry_after` if given); everything else is permanent. `body` is the start of the body.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
) -> Result<(), HandlerError> {
    if status.is_success() {
        return Ok(());
    }
    let message = if body.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {body}")
    };
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        Err(HandlerError::Retryable {
            message,
            retry_after,
        })
    } else {
        Err(HandlerError::Permanent { message })
    }
}

/// Sends each record to [`HttpConfig::url`] over a pool of kept-alive connections (HTTPS with
/// rustls and the Mozilla root certificates; proxy variables are ignored, redirects are not
/// followed).
pub struct HttpHandler {
    client: reqwest::Client,
    template: UrlTemplate,
    headers: HeaderMap,
    config: HttpConfig,
}

impl HttpHandler {
    /// Checks the whole config (every problem at once) and builds the connection pool.
    pub fn new(config: HttpConfig) -> Result<HttpHandler, ConfigError> {
        let mut problems = Vec::new();
        let template = UrlTemplate::parse(&config.url)
            .map_err(|e| problems.push(e))
            .ok();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &config.headers {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                problems.push(format!("--header name {name:?} is not a valid header name"));
                continue;
            };
            let per_record = [
                HEADER_IDEMPOTENCY_KEY,
                HEADER_BATCH,
                HEADER_RECORD_ID,
                HEADER_ATTEMPT,
            ];
            if per_record.contains(&header.as_str()) {
                problems.push(format!(
                    "--header {name} is set by the worker for each record and cannot be given"
                ));
                continue;
            }
            match HeaderValue::from_str(value) {
                // A user's Content-Type replaces the default; other repeated names add up.
                Ok(v) if header == CONTENT_TYPE => {
                    headers.insert(header, v);
                }
                Ok(v) => {
                    headers.append(header, v);
                }
                Err(_) => problems.push(format!(
                    "--header {name}: the value holds characters a header cannot carry"
                )),
            }
        }
        if config.timeout.is_zero() {
            problems.push("--timeout must be above zero".into());
        }
        if config.max_body == 0 {
            problems.push("--max-body must be above zero".into());
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout)
            .pool_idle_timeout(DEFAULT_POOL_IDLE_TIMEOUT)
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .user_agent(concat!("tally-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| problems.push(format!("cannot set up the HTTP client: {e}")))
            .ok();
        match (template, client) {
            (Some(template), Some(client)) if problems.is_empty() => Ok(HttpHandler {
                client,
                template,
                headers,
                config,
            }),
            _ => Err(ConfigError(problems)),
        }
    }

    /// Reads at most `max` bytes of the body (an error while reading ends it early).
    async fn read_body(response: &mut reqwest::Response, max: usize) -> Vec<u8> {
        let mut body = Vec::new();
        while body.len() < max {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = max - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        body
    }

    async fn deliver(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        let url = self
            .template
            .render(&ctx.batch, &ctx.record_id, payload)
            .map_err(HandlerError::permanent)?;
        let body = serde_json::to_vec(payload)
            .map_err(|e| HandlerError::permanent(format!("cannot encode the payload: {e}")))?;
        let (batch, record_id) = (encode_segment(&ctx.batch), encode_segment(&ctx.record_id));
        let mut headers = self.headers.clone();
        // Percent-encoded values are plain ASCII, always valid header values.
        for (name, value) in [
            (HEADER_IDEMPOTENCY_KEY, format!("{batch}/{record_id}")),
            (HEADER_BATCH, batch),
            (HEADER_RECORD_ID, record_id),
            (HEADER_ATTEMPT, ctx.attempt.to_string()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        let mut response = self
            .client
            .request(self.config.method.into(), url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_success() {
            // Read the body so that the connection goes back to the pool.
            Self::read_body(&mut response, self.config.max_body).await;
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
            .map(|d| d.min(self.config.max_retry_after));
        let excerpt_max = self.config.error_excerpt_bytes.min(self.config.max_body);
        let body = Self::read_body(&mut response, excerpt_max + 1).await;
        classify(status, retry_after, &head_excerpt(&body, excerpt_max))
    }

    fn transport_error(&self, e: reqwest::Error) -> HandlerError {
        if e.is_builder() {
            // Without the URL: its query may hold a secret, and this reaches `last_error`.
            let e = e.without_url();
            return HandlerError::permanent(format!("cannot build the request: {e}"));
        }
        if e.is_timeout() {
            return HandlerError::retryable(format!(
                "HTTP request timed out after {}",
                humantime::format_duration(self.config.timeout)
            ));
        }
        // The causes say what went wrong (refused, reset, certificate); the URL is left out
        // in case its query holds a secret.
        let e = e.without_url();
        let mut message = format!("HTTP request failed: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        HandlerError::retryable(message)
    }
}

#[async_trait::async_trait]
impl Handler for HttpHandler {
    fn name(&self) -> &'static str {
        "http"
    }

    async fn handle(
        &self,
        ctx: &RecordContext,
        payload: &serde_json::Value,
    ) -> Result<(), HandlerError> {
        tokio::select! {
            result = self.deliver(ctx, payload) => result,
            _ = ctx.cancel.cancelled() => Err(HandlerError::retryable("worker stopped during the request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(template: &str, payload: serde_json::Value) -> Result<String, String> {
        UrlTemplate::parse(template)?
            .render("june batch", "a/b?c", &payload)
            .map(|u| u.to_string())
    }

    #[test]
    fn placeholders_are_filled_and_encoded_as_one_segment() {
        assert_eq!(
            render("https://api.test/x/{id}", json!({})).unwrap(),
            "https://api.test/x/a%2Fb%3Fc"
        );
        assert_eq!(
            render(
                "http://h:8080/{batch}/{customer}/{n}?flag={ok}",
                json!({"customer": "Zoë #1", "n": 7, "ok": true})
            )
            .unwrap(),
            "http://h:8080/june%20batch/Zo%C3%AB%20%231/7?flag=true"
        );
        assert_eq!(
            render("https://h/{{literal}}/{id}", json!({})).unwrap(),
            "https://h/%7Bliteral%7D/a%2Fb%3Fc"
        );
    }

    #[test]
    fn a_missing_or_unusable_field_is_named() {
        let err = render("https://h/{customer}", json!({"other": 1})).unwrap_err();
        assert!(err.contains("no field \"customer\""), "{err}");
        let err = render("https://h/{customer}", json!({"customer": null})).unwrap_err();
        assert!(err.contains("no field \"customer\""), "{err}");
        let err = render("https://h/{customer}", json!({"customer": {"a": 1}})).unwrap_err();
        assert!(err.contains("object or array"), "{err}");
        let err = render("https://h/{d}", json!({"d": ".."})).unwrap_err();
        assert!(err.contains("path segment"), "{err}");
    }

    #[test]
    fn bad_templates_are_refused_at_start() {
        for (template, expected) in [
            ("https://h/{id", "unbalanced '{' at byte 10"),
            ("https://h/id}", "unbalanced '}' at byte 12"),
            ("https://h/{a{b}}", "unbalanced '{'"),
            ("https://h/{}", "empty placeholder"),
            ("not a url", "is not a URL"),
            ("ftp://h/{id}", "use http or https"),
            ("/relative/{id}", "is not a URL"),
        ] {
            let err = UrlTemplate::parse(template).unwrap_err();
            assert!(err.contains(expected), "{template}: {err}");
        }
        let fields: Vec<String> = UrlTemplate::parse("https://h/{id}/{a}/{batch}/{b}")
            .unwrap()
            .fields()
            .map(String::from)
            .collect();
        assert_eq!(fields, ["a", "b"]);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert!(classify(StatusCode::OK, None, "").is_ok());
        assert!(classify(StatusCode::NO_CONTENT, None, "").is_ok());
        for status in [408, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                matches!(
                    classify(status, Some(Duration::from_secs(3)), "busy"),
                    Err(HandlerError::Retryable { retry_after: Some(d), .. }) if d == Duration::from_secs(3)
                ),
                "{status}"
            );
        }
        for status in [301, 400, 401, 403, 404, 409, 422] {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(
                matches!(
                    classify(status, None, ""),
                    Err(HandlerError::Permanent { .. })
                ),
                "{status}"
            );
        }
        let err = classify(StatusCode::NOT_FOUND, None, "no such order").unwrap_err();
        assert_eq!(err.to_string(), "HTTP 404 Not Found: no such order");
    }

    #[test]
    fn config_problems_are_reported_together() {
        let mut config = HttpConfig::new("https://h/{id");
        config.headers = vec![
            ("Bad Name".into(), "x".into()),
            ("Idempotency-Key".into(), "x".into()),
            ("X-Ok".into(), "fine".into()),
        ];
        config.timeout = Duration::ZERO;
        let Err(ConfigError(problems)) = HttpHandler::new(config) else {
            panic!("accepted a bad config");
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(HttpHandler::new(HttpConfig::new("https://h/{id}")).is_ok());
    }

    #[test]
    fn headers_parse_as_name_and_value() {
        assert_eq!(
            parse_header("Authorization: Bearer a:b").unwrap(),
            ("Authorization".to_string(), "Bearer a:b".to_string())
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(": value").is_err());
    }

    #[test]
    fn methods_parse_case_insensitively() {
        assert_eq!("post".parse::<HttpMethod>(), Ok(HttpMethod::Post));
        assert_eq!("PUT".parse::<HttpMethod>(), Ok(HttpMethod::Put));
        assert!("GET".parse::<HttpMethod>().is_err());
    }
}
