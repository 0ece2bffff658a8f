//! Who may take actions on the dashboard. Read-only pages are open, like `/metrics`; actions
//! need `serve --dashboard-actions` and credentials: a token (`TALLY_DASHBOARD_TOKEN`) or
//! users and passwords from a file. A browser signs in once and gets a session cookie; a
//! script sends `Authorization: Bearer <token>` or basic auth. Every form carries a CSRF token
//! bound to the user, checked on every action not made with a bearer token.
//!
//! Sessions and CSRF tokens are HMACs under a key derived from the credentials, so every
//! `serve` replica with the same credentials accepts them, and changing the credentials ends
//! every session.

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// The variable holding the dashboard's action token.
pub const TOKEN_ENV: &str = "TALLY_DASHBOARD_TOKEN";
/// The session cookie.
pub const COOKIE: &str = "tally_session";
/// How long a session lasts.
pub const SESSION: Duration = Duration::from_secs(12 * 3600);
/// Shortest token accepted: a guessable one would guard nothing.
const MIN_TOKEN_LEN: usize = 16;

/// A password as stored: plain, or `sha256:<hex>` of it.
#[derive(Clone)]
enum Password {
    Plain(String),
    Sha256([u8; 32]),
}

impl Password {
    fn matches(&self, given: &str) -> bool {
        // Digests of both sides: the comparison takes the same time wherever they differ.
        let given = Sha256::digest(given.as_bytes());
        match self {
            Password::Plain(p) => Sha256::digest(p.as_bytes()) == given,
            Password::Sha256(d) => d[..] == given[..],
        }
    }
}

/// The credentials actions accept.
#[derive(Clone)]
pub struct Auth {
    token: Option<String>,
    users: Vec<(String, Password)>,
    key: Vec<u8>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a secret in a log line.
        f.debug_struct("Auth")
            .field("token", &self.token.is_some())
            .field("users", &self.users.len())
            .finish()
    }
}

/// Who an action is taken as, and how they showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    /// A bearer token: no browser sends one by itself, so no CSRF token is needed.
    pub bearer: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a users file: one `user:password` or `user:sha256:<64 hex digits>` per line; empty
/// lines and lines starting with `#` are skipped. Errors name the file and line.
fn parse_users(path: &Path, text: &str) -> Result<Vec<(String, Password)>, String> {
    let mut users = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((user, secret)) = line.split_once(':') else {
            return Err(format!("{at}: expected user:password"));
        };
        if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!("{at}: the user name is empty or holds spaces"));
        }
        let password = match secret.strip_prefix("sha256:") {
            Some(h) => match unhex(h).and_then(|d| <[u8; 32]>::try_from(d).ok()) {
                Some(d) => Password::Sha256(d),
                None => return Err(format!("{at}: sha256: must be followed by 64 hex digits")),
            },
            None if secret.is_empty() => return Err(format!("{at}: the password is empty")),
            None => Password::Plain(secret.to_string()),
        };
        if users.iter().any(|(u, _)| u == user) {
            return Err(format!("{at}: user {user:?} appears twice"));
        }
        users.push((user.to_string(), password));
    }
    if users.is_empty() {
        return Err(format!("{}: no users in the file", path.display()));
    }
    Ok(users)
}

impl Auth {
    /// Credentials from the token (the value of [`TOKEN_ENV`]) and/or a users file.
    pub fn new(token: Option<String>, users_file: Option<&Path>) -> Result<Auth, String> {
        let mut material = Sha256::new();
        material.update(b"tally-dashboard-v1\0");
        let token = token.filter(|t| !t.is_empty());
        if let Some(t) = &token {
            if t.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "{TOKEN_ENV} is {} characters long; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 24`)",
                    t.len()
                ));
            }
            material.update(t.as_bytes());
        }
        material.update(b"\0");
        let users = match users_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read --dashboard-users {}: {e}", path.display())
                })?;
                material.update(text.as_bytes());
                parse_users(path, &text)?
            }
            None => Vec::new(),
        };
        if token.is_none() && users.is_empty() {
            return Err(format!(
                "--dashboard-actions needs credentials: set {TOKEN_ENV}, or give --dashboard-users FILE"
            ));
        }
        Ok(Auth {
            token,
            users,
            key: material.finalize().to_vec(),
        })
    }

    fn mac(&self, parts: &[&str]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any size");
        for p in parts {
            mac.update(p.as_bytes());
            mac.update(b"\0");
        }
        mac
    }

    /// The user a login form's fields name, if they are right. With the token, the user name
    /// is free (it is what the audit shows) and the token is the password.
    pub fn login(&self, user: &str, password: &str) -> Option<String> {
        let user = user.trim();
        if let Some((name, _)) = self
            .users
            .iter()
            .find(|(u, p)| u == user && p.matches(password))
        {
            return Some(name.clone());
        }
        let token = self.token.as_ref()?;
        Password::Plain(token.clone()).matches(password).then(|| {
            if user.is_empty() {
                "token".to_string()
            } else {
                format!("token:{user}")
            }
        })
    }

    /// A session cookie's value for `user`, valid for [`SESSION`] from `now`.
    pub fn session(&self, user: &str, now: SystemTime) -> String {
        let expires = now
            .checked_add(SESSION)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let mac = self
            .mac(&["session", user, &expires])
            .finalize()
            .into_bytes();
        format!("{}.{expires}.{}", hex(user.as_bytes()), hex(&mac))
    }

    fn check_session(&self, value: &str, now: SystemTime) -> Option<String> {
        let mut parts = value.split('.');
        let (user, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let user = String::from_utf8(unhex(user)?).ok()?;
        let until: u64 = expires.parse().ok()?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        self.mac(&["session", &user, expires])
            .verify_slice(&unhex(mac)?)
            .ok()?;
        (now < until).then_some(user)
    }

    /// Who the request comes from, if anyone: a session cookie, a bearer token or basic auth.
    pub fn identify(&self, headers: &HeaderMap, now: SystemTime) -> Option<Identity> {
        if let Some(auth) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            if let Some(t) = auth.strip_prefix("Bearer ") {
                let token = self.token.as_ref()?;
                return Password::Plain(token.clone())
                    .matches(t.trim())
                    .then(|| Identity {
                        user: "token".into(),
                        bearer: true,
                    });
            }
            if let Some(b) = auth.strip_prefix("Basic ") {
                let decoded = base64_decode(b.trim())?;
                let text = String::from_utf8(decoded).ok()?;
                let (user, password) = text.split_once(':')?;
                return self.login(user, password).map(|user| Identity {
                    user,
                    bearer: false,
                });
            }
            return None;
        }
        let cookies = headers.get_all(header::COOKIE);
        for value in cookies.iter().filter_map(|v| v.to_str().ok()) {
            for pair in value.split(';') {
                if let Some(v) = pair
                    .trim()
                    .strip_prefix(COOKIE)
                    .and_then(|r| r.strip_prefix('='))
                {
                    if let Some(user) = self.check_session(v, now) {
                        return Some(Identity {
                            user,
                            bearer: false,
                        });
                    }
                }
            }
        }
        None
    }

    /// The CSRF token of `user`'s forms.
    pub fn csrf(&self, user: &str) -> String {
        hex(&self.mac(&["csrf", user]).finalize().into_bytes())
    }

    /// Whether `given` is `user`'s CSRF token.
    pub fn csrf_ok(&self, user: &str, given: &str) -> bool {
        unhex(given).is_some_and(|g| self.mac(&["csrf", user]).verify_slice(&g).is_ok())
    }
}

/// Standard base64 (basic auth), without a crate for a dozen lines.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn auth() -> Auth {
        let dir = std::env::temp_dir().join(format!("tally-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("users");
        let digest = hex(&Sha256::digest(b"s3cret"));
        std::fs::write(&file, format!("# ops\nana:plain-pw\nbo:sha256:{digest}\n")).unwrap();
        Auth::new(Some("0123456789abcdef".into()), Some(&file)).unwrap()
    }

    #[test]
    fn users_file_errors_name_the_line() {
        let p = Path::new("users.txt");
        assert_eq!(
            parse_users(p, "ana:x\nbroken\n").err().unwrap(),
            "users.txt:2: expected user:password"
        );
        assert!(parse_users(p, "a:sha256:zz")
            .err()
            .unwrap()
            .starts_with("users.txt:1:"));
        assert!(parse_users(p, "a:x\na:y")
            .err()
            .unwrap()
            .contains("appears twice"));
        assert!(parse_users(p, "# only a comment\n").is_err());
        assert!(Auth::new(Some("short".into()), None).is_err());
        assert!(Auth::new(None, None).is_err());
    }

    #[test]
    fn logins_sessions_and_csrf() {
        let a = auth();
        assert_eq!(a.login("ana", "plain-pw").as_deref(), Some("ana"));
        assert_eq!(a.login("bo", "s3cret").as_deref(), Some("bo"));
        assert_eq!(a.login("bo", "wrong"), None);
        assert_eq!(a.login("", "0123456789abcdef").as_deref(), Some("token"));
        let now = SystemTime::now();
        let cookie = a.session("ana", now);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {COOKIE}={cookie}")).unwrap(),
        );
        assert_eq!(a.identify(&h, now).map(|i| i.user).as_deref(), Some("ana"));
        assert_eq!(a.identify(&h, now + SESSION + Duration::from_secs(1)), None);
        // A cookie made under other credentials, or altered, is nobody's.
        let other = Auth::new(Some("fedcba9876543210".into()), None).unwrap();
        assert_eq!(other.identify(&h, now), None);
        let forged = cookie.replacen(&hex(b"ana"), &hex(b"bo"), 1);
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}={forged}")).unwrap(),
        );
        assert_eq!(a.identify(&h, now), None);
        assert!(a.csrf_ok("ana", &a.csrf("ana")));
        assert!(!a.csrf_ok("bo", &a.csrf("ana")));
        assert!(!a.csrf_ok("ana", ""));
        let mut b = HeaderMap::new();
        b.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic Ym86czNjcmV0"),
        );
        assert_eq!(
            a.identify(&b, now),
            Some(Identity {
                user: "bo".into(),
                bearer: false
            })
        );
        b.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 0123456789abcdef"),
        );
        assert!(a.identify(&b, now).is_some_and(|i| i.bearer));
        b.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer nope"),
        );
        assert_eq!(a.identify(&b, now), None);
    }
}
