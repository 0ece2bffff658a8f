//! How to reach PostgreSQL: the URL (given directly or read from a file), the password (in the
//! URL or `PGPASSWORD`), TLS with libpq's `sslmode` semantics over rustls, and whether a
//! PgBouncer in transaction pooling mode sits in between.

use crate::error::StoreError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Environment variable holding the database URL.
pub const ENV_DATABASE_URL: &str = "DATABASE_URL";
/// Environment variable naming a file that holds the database URL (a mounted Secret).
pub const ENV_DATABASE_URL_FILE: &str = "DATABASE_URL_FILE";
/// Environment variable naming a PEM file of CA certificates to verify the server with.
pub const ENV_DB_CA_FILE: &str = "TALLY_DB_CA_FILE";
/// Environment variable overriding the URL's `sslmode`.
pub const ENV_DB_SSLMODE: &str = "TALLY_DB_SSLMODE";
/// Environment variable switching on PgBouncer transaction pooling mode.
pub const ENV_PGBOUNCER: &str = "TALLY_PGBOUNCER";
/// The password used when the URL carries none, as with libpq.
pub const ENV_PGPASSWORD: &str = "PGPASSWORD";
/// `sslmode` when neither the URL nor `--db-sslmode` gives one: libpq's default.
pub const DEFAULT_SSLMODE: SslMode = SslMode::Prefer;

/// TLS to the server, with libpq's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked.
    Prefer,
    /// TLS or nothing; the certificate is checked against a CA only when one is given.
    Require,
    /// TLS, with a certificate chain to a trusted CA; the host name is not checked.
    VerifyCa,
    /// TLS, with a chain to a trusted CA and a certificate naming the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" | "allow" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode \"{other}\" is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }
}

/// Everything needed to open a [`super::Store`].
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// A `postgres://` URL or a `key=value` connection string; may hold `sslmode` and
    /// `sslrootcert`.
    pub url: String,
    /// Overrides the URL's `sslmode`.
    pub sslmode: Option<SslMode>,
    /// PEM file of CA certificates; overrides the URL's `sslrootcert`.
    pub ca_file: Option<PathBuf>,
    /// Used when the URL has no password (the binaries pass `PGPASSWORD`).
    pub password: Option<String>,
    /// PgBouncer in transaction pooling mode: no session state, no statement kept between
    /// transactions, no LISTEN.
    pub pgbouncer: bool,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &"<redacted>")
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pgbouncer", &self.pgbouncer)
            .finish()
    }
}

impl ConnectOptions {
    /// Options for `url`, with `PGPASSWORD` as the password when the URL has none.
    pub fn new(url: &str) -> Self {
        ConnectOptions {
            url: url.to_string(),
            password: std::env::var(ENV_PGPASSWORD).ok().filter(|p| !p.is_empty()),
            ..ConnectOptions::default()
        }
    }

    /// Options from the binaries' flags: the URL from exactly one of `url` and `url_file`,
    /// `PGPASSWORD` when the URL has no password.
    pub fn from_flags(
        url: Option<&str>,
        url_file: Option<&Path>,
        ca_file: Option<PathBuf>,
        sslmode: Option<SslMode>,
        pgbouncer: bool,
    ) -> Result<Self, StoreError> {
        let url = Self::resolve_url(url, url_file)?;
        Ok(ConnectOptions {
            ca_file,
            sslmode,
            pgbouncer,
            ..ConnectOptions::new(&url)
        })
    }

    /// Checks `url` as [`super::Store::connect`] reads it (`sslmode` and `sslrootcert` taken
    /// out first), without connecting or reading the CA file. The error names the problem,
    /// never the URL's password.
    pub fn validate_url(url: &str) -> Result<(), StoreError> {
        let (rest, mode, _) = split_tls_params(url)?;
        tokio_postgres::Config::from_str(&rest).map_err(|e| StoreError::BadUrl(e.to_string()))?;
        if let Some(mode) = mode {
            mode.parse::<SslMode>().map_err(StoreError::BadUrl)?;
        }
        Ok(())
    }

    /// The URL from exactly one of `--database-url` and `--database-url-file`. The file holds
    /// the whole URL (surrounding whitespace ignored), as a mounted Secret does.
    pub fn resolve_url(url: Option<&str>, url_file: Option<&Path>) -> Result<String, StoreError> {
        match (url, url_file) {
            (Some(_), Some(_)) => Err(StoreError::BadUrl(
                "both --database-url (DATABASE_URL) and --database-url-file (DATABASE_URL_FILE) \
                 are set; give one"
                    .into(),
            )),
            (None, None) => Err(StoreError::BadUrl(
                "no database given: pass --database-url (DATABASE_URL) or --database-url-file \
                 (DATABASE_URL_FILE)"
                    .into(),
            )),
            (Some(url), None) => Ok(url.trim().to_string()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StoreError::BadUrl(format!(
                        "cannot read --database-url-file {}: {e}",
                        path.display()
                    ))
                })?;
                let url = text.trim();
                if url.is_empty() {
                    return Err(StoreError::BadUrl(format!(
                        "--database-url-file {} is empty",
                        path.display()
                    )));
                }
                Ok(url.to_string())
            }
        }
    }
}

/// The driver settings and TLS connector for `options`, ready for a pool.
pub(super) struct Prepared {
    pub config: tokio_postgres::Config,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
}

pub(super) fn prepare(options: &ConnectOptions) -> Result<Prepared, StoreError> {
    let (rest, url_mode, url_root) = split_tls_params(&options.url)?;
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(|e| StoreError::BadUrl(e.to_string()))?;
    if config.get_password().is_none() {
        if let Some(password) = &options.password {
            config.password(password.as_bytes());
        }
    }
    let mode = match (options.sslmode, url_mode) {
        (Some(mode), _) => mode,
        (None, Some(text)) => text.parse().map_err(StoreError::BadUrl)?,
        (None, None) => DEFAULT_SSLMODE,
    };
    let root_file = options.ca_file.clone().or(url_root.map(PathBuf::from));
    let roots = match &root_file {
        Some(path) => Some(load_roots(path)?),
        None => None,
    };
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(mode, roots)?);
    Ok(Prepared { config, tls })
}

/// Takes `sslmode` and `sslrootcert` out of the URL (the driver knows only some modes and no
/// root certificates); returns the rest and the two values.
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let (mut mode, mut root) = (None, None);
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decoded = || {
                percent_encoding::percent_decode_str(value)
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| StoreError::BadUrl(format!("{key} in the URL is not UTF-8")))
            };
            match key {
                "sslmode" => mode = Some(decoded()?),
                "sslrootcert" => root = Some(decoded()?),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, mode, root));
    }
    // key=value form: values of these two never need quoting.
    let mut kept = Vec::new();
    for word in url.split_whitespace() {
        match word.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => root = Some(v.to_string()),
            _ => kept.push(word),
        }
    }
    Ok((kept.join(" "), mode, root))
}

fn load_roots(path: &Path) -> Result<RootCertStore, StoreError> {
    let bad = |why: String| StoreError::BadUrl(format!("CA file {}: {why}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(mode: SslMode, roots: Option<RootCertStore>) -> Result<ClientConfig, StoreError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::BadUrl(format!("TLS setup: {e}")))?;
    let webpki = |roots: Option<RootCertStore>| {
        // Without a CA file, the public web roots (as a managed service's certificate has).
        let roots = roots.unwrap_or_else(|| {
            RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
        });
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| StoreError::BadUrl(format!("TLS setup: {e}")))
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyFull, roots) => webpki(roots)?,
        // libpq: `require` with a root certificate checks the chain, like verify-ca.
        (SslMode::VerifyCa, roots) | (SslMode::Require, roots @ Some(_)) => {
            Arc::new(ChainOnly(webpki(roots)?))
        }
        (SslMode::Disable | SslMode::Prefer | SslMode::Require, _) => {
            Arc::new(EncryptOnly(provider.clone()))
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// verify-ca: the chain must reach a trusted CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The name is checked last, so the chain has passed by then.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require without a CA: encrypted, the certificate taken as presented (libpq's
/// behaviour; it protects against passive listeners only). The handshake's signature is not
/// checked either: parsing the certificate to check it would refuse what libpq accepts (an
/// X.509 v1 certificate, such as the one Citus generates), and with any certificate accepted
/// the signature proves nothing an attacker could not also produce. The key exchange still
/// keeps a passive listener out.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure that will happen again, said plainly with what to do about it; `None` when
/// `reason` (the error with its causes) is not one. Only the certificate's rejection and a
/// server without TLS (under sslmode=require or verify-*) are permanent: tokio-postgres
/// reports any I/O error during the handshake as a TLS error too ("error performing TLS
/// handshake: connection reset by peer" while the server restarts), and those pass.
pub(super) fn describe_tls_failure(reason: &str, host: &str) -> Option<(String, &'static str)> {
    let rejected = reason.contains("invalid peer certificate");
    let why = if rejected && reason.contains("UnknownIssuer") {
        (
            format!("certificate verification failed for host {host}: unknown issuer"),
            "pass --db-ca-file (TALLY_DB_CA_FILE) with the CA that signed the server's \
             certificate, or sslrootcert= in the URL",
        )
    } else if rejected && reason.contains("NotValidForName") {
        (
            format!("certificate verification failed for host {host}: the certificate does not name this host"),
            "connect by a name the certificate lists, or use sslmode=verify-ca",
        )
    } else if rejected && reason.contains("UnsupportedCertVersion") {
        (
            format!(
                "certificate verification failed for host {host}: the server's certificate is \
                 X.509 v1, which cannot be verified (Citus generates such a certificate)"
            ),
            "give the server a v3 certificate signed by a CA, or use sslmode=require, which \
             encrypts without checking the certificate",
        )
    } else if rejected && (reason.contains("Expired") || reason.contains("NotValidYet")) {
        (
            format!("certificate verification failed for host {host}: the certificate is expired or not yet valid"),
            "renew the server's certificate (or check this machine's clock)",
        )
    } else if reason.contains("server does not support TLS") {
        (
            format!("the server at {host} does not accept TLS"),
            "enable ssl on the server, or use sslmode=prefer or disable",
        )
    } else if rejected {
        (
            format!("TLS with host {host} failed: {reason}"),
            "check sslmode and --db-ca-file (TALLY_DB_CA_FILE)",
        )
    } else {
        return None;
    };
    Some(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_leave_the_url() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/tmp/ca.pem"));
        let (rest, mode, _) = split_tls_params("host=h user=u sslmode=require").unwrap();
        assert_eq!(rest, "host=h user=u");
        assert_eq!(mode.as_deref(), Some("require"));
    }

    #[test]
    fn only_rejected_certificates_and_servers_without_tls_are_permanent() {
        let host = "db.example.com";
        let permanent = [
            "error performing TLS handshake: invalid peer certificate: UnknownIssuer",
            "error performing TLS handshake: invalid peer certificate: NotValidForName",
            "error performing TLS handshake: invalid peer certificate: Expired",
            "error performing TLS handshake: invalid peer certificate: BadSignature",
            "error performing TLS handshake: server does not support TLS",
        ];
        for reason in permanent {
            assert!(describe_tls_failure(reason, host).is_some(), "{reason}");
        }
        let (msg, _) = describe_tls_failure(permanent[0], host).unwrap();
        assert!(
            msg.contains("unknown issuer") && msg.contains(host),
            "{msg}"
        );
        // What a server restart looks like under sslmode=prefer: I/O inside the handshake.
        let transient = [
            "error performing TLS handshake: Connection reset by peer (os error 104)",
            "error performing TLS handshake: unexpected end of file",
            "error performing TLS handshake: Broken pipe (os error 32)",
            "error connecting to server: Connection refused (os error 111)",
        ];
        for reason in transient {
            assert!(describe_tls_failure(reason, host).is_none(), "{reason}");
        }
    }

    #[test]
    fn unknown_sslmode_is_named() {
        let err = prepare(&ConnectOptions {
            url: "postgres://u@h/db?sslmode=verify".into(),
            ..ConnectOptions::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("sslmode \"verify\""), "{err}");
    }

    #[test]
    fn url_from_exactly_one_source() {
        assert!(ConnectOptions::resolve_url(None, None).is_err());
        let dir = std::env::temp_dir().join(format!("tally-url-{}", std::process::id()));
        std::fs::write(&dir, "  postgres://u:secret@h/db\n").unwrap();
        assert_eq!(
            ConnectOptions::resolve_url(None, Some(&dir)).unwrap(),
            "postgres://u:secret@h/db"
        );
        assert!(ConnectOptions::resolve_url(Some("postgres://h/db"), Some(&dir)).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
