//! `--web-config FILE`: TLS and HTTP basic authentication for the agent's endpoint, in the file
//! format of Prometheus' exporter-toolkit (`tls_server_config`, `basic_auth_users` with bcrypt
//! hashes), so one file serves every exporter on a host.
//!
//! Why rustls under the agent's own small HTTP responder rather than hyper or axum: the
//! responder's work is GET/HEAD of five paths plus the single-flight render sharing of
//! [`crate::server::Scrapes`], which a framework would not replace; the part that must not be
//! hand-written is TLS, and rustls (with the `ring` provider, no C toolchain beyond `cc`) is a
//! maintained implementation that needs only a byte stream. Basic authentication is one header.
//!
//! Library logic only: parsing and validation, building the rustls configuration, checking an
//! `Authorization` header. The server applies it.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

/// Endpoints a liveness or readiness probe calls; they answer without authentication (they
/// reveal nothing but "up" and "ready").
pub const UNAUTHENTICATED_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// Successful (user, password) checks remembered, so a scraper does not pay a bcrypt
/// verification (tens of milliseconds at the usual cost 10) on every scrape.
const AUTH_CACHE_ENTRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("cannot read web config {path}: {reason}; check the path given with --web-config")]
    Read { path: PathBuf, reason: String },
    #[error("invalid web config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid web config {path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    /// exporter-toolkit's `http2` and response `headers`; accepted so a shared file loads, and
    /// reported as ignored.
    http_server_config: Option<serde_yaml_ng::Value>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    // Go's TLS knobs; rustls offers only safe suites and groups, so these are ignored.
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
    client_allowed_sans: Option<Vec<String>>,
}

/// A validated web configuration; the default serves plain HTTP without authentication.
#[derive(Default)]
pub struct WebConfig {
    /// TLS on the listener, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Basic authentication, if any user is configured.
    pub auth: Option<BasicAuth>,
    /// Settings that were accepted but have no effect here (to log once at start).
    pub ignored: Vec<String>,
    /// Whether clients must present a certificate signed by the client CA.
    pub client_cert_required: bool,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.auth.as_ref().map(|a| a.users.len()))
            .field("ignored", &self.ignored)
            .finish()
    }
}

impl WebConfig {
    /// Reads, parses and validates a web config file: certificates and keys load, hashes are
    /// bcrypt, and no setting is silently weaker than asked.
    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| WebConfigError::Read {
            path: path.to_owned(),
            reason: crate::units::os_text(&e),
        })?;
        Self::parse(&text, path)
    }

    /// Parses a web config's text; relative file names are relative to the file's directory, as
    /// exporter-toolkit resolves them.
    pub fn parse(text: &str, path: &Path) -> Result<Self, WebConfigError> {
        let raw: RawWebConfig = if text.trim().is_empty() {
            RawWebConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| WebConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?
        };
        let field = |field: &str, reason: String| WebConfigError::Field {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let mut ignored = Vec::new();
        if raw.http_server_config.is_some() {
            ignored.push("http_server_config".to_owned());
        }
        let mut client_cert_required = false;
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => {
                if t.client_allowed_sans.is_some() {
                    return Err(field(
                        "tls_server_config.client_allowed_sans",
                        "not supported: remove it and issue client certificates from a CA used only for this endpoint".into(),
                    ));
                }
                for (name, set) in [
                    ("cipher_suites", t.cipher_suites.is_some()),
                    (
                        "prefer_server_cipher_suites",
                        t.prefer_server_cipher_suites.is_some(),
                    ),
                    ("curve_preferences", t.curve_preferences.is_some()),
                ] {
                    if set {
                        ignored.push(format!("tls_server_config.{name}"));
                    }
                }
                let cert_file = t.cert_file.map(|p| resolve(&p)).ok_or_else(|| {
                    field(
                        "tls_server_config.cert_file",
                        "missing: name the server certificate (PEM)".into(),
                    )
                })?;
                let key_file = t.key_file.map(|p| resolve(&p)).ok_or_else(|| {
                    field(
                        "tls_server_config.key_file",
                        "missing: name the certificate's private key (PEM)".into(),
                    )
                })?;
                let certs =
                    read_certs(&cert_file).map_err(|r| field("tls_server_config.cert_file", r))?;
                let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| {
                    field(
                        "tls_server_config.key_file",
                        format!("{}: {e}", key_file.display()),
                    )
                })?;
                let versions = versions(t.min_version.as_deref(), t.max_version.as_deref())
                    .map_err(|r| field("tls_server_config.min_version/max_version", r))?;
                let auth_type = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
                // rustls deprecates the ring provider for lacking post-quantum key exchange; the
                // aws-lc-rs provider that has it needs cmake and a C toolchain to build. ring's
                // X25519 and P-256 are what Prometheus' Go client negotiates with other exporters.
                #[allow(deprecated)]
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                    .with_protocol_versions(versions)
                    .map_err(|e| field("tls_server_config.min_version", e.to_string()))?;
                let builder = match (auth_type, t.client_ca_file) {
                    ("NoClientCert", None) => builder.with_no_client_auth(),
                    ("NoClientCert", Some(_)) => {
                        return Err(field(
                            "tls_server_config.client_auth_type",
                            "client_ca_file is set but client_auth_type is NoClientCert: set RequireAndVerifyClientCert (or VerifyClientCertIfGiven)".into(),
                        ));
                    }
                    (kind @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven"), ca) => {
                        let ca = ca.map(|p| resolve(&p)).ok_or_else(|| {
                            field(
                                "tls_server_config.client_ca_file",
                                format!(
                                    "missing: {kind} needs the CA that signs client certificates"
                                ),
                            )
                        })?;
                        let mut roots = rustls::RootCertStore::empty();
                        for cert in read_certs(&ca)
                            .map_err(|r| field("tls_server_config.client_ca_file", r))?
                        {
                            roots.add(cert).map_err(|e| {
                                field("tls_server_config.client_ca_file", e.to_string())
                            })?;
                        }
                        let verifier = WebPkiClientVerifier::builder_with_provider(
                            Arc::new(roots),
                            Arc::clone(&provider),
                        );
                        let verifier = if kind == "VerifyClientCertIfGiven" {
                            verifier.allow_unauthenticated()
                        } else {
                            client_cert_required = true;
                            verifier
                        };
                        let verifier = verifier.build().map_err(|e| {
                            field("tls_server_config.client_ca_file", e.to_string())
                        })?;
                        builder.with_client_cert_verifier(verifier)
                    }
                    (other, _) => {
                        return Err(field(
                            "tls_server_config.client_auth_type",
                            format!(
                                "`{other}` is not supported: use NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert (certificates are always verified against client_ca_file)"
                            ),
                        ));
                    }
                };
                let mut config = builder.with_single_cert(certs, key).map_err(|e| {
                    field(
                        "tls_server_config.key_file",
                        format!("does not match the certificate: {e}"),
                    )
                })?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
        };
        let auth = match raw.basic_auth_users {
            Some(users) if !users.is_empty() => {
                for (user, hash) in &users {
                    if user.contains(':') {
                        return Err(field(
                            &format!("basic_auth_users.{user}"),
                            "a user name cannot contain `:`".into(),
                        ));
                    }
                    hash.parse::<bcrypt::HashParts>().map_err(|e| {
                        field(
                            &format!("basic_auth_users.{user}"),
                            format!(
                                "not a bcrypt hash ({e}): make one with `htpasswd -nBC 10 {user}` and keep the part after the colon"
                            ),
                        )
                    })?;
                }
                Some(BasicAuth::new(users))
            }
            _ => None,
        };
        Ok(Self {
            tls,
            auth,
            ignored,
            client_cert_required,
        })
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

static TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(
    min: Option<&str>,
    max: Option<&str>,
) -> Result<&'static [&'static rustls::SupportedProtocolVersion], String> {
    let rank = |v: Option<&str>, default: u8| match v {
        None => Ok(default),
        // rustls implements neither TLS 1.0 nor 1.1: asking for them as a minimum still gets 1.2.
        Some("TLS10" | "TLS11" | "TLS12") => Ok(12),
        Some("TLS13") => Ok(13),
        Some(other) => Err(format!("unknown TLS version `{other}`: use TLS12 or TLS13")),
    };
    match (rank(min, 12)?, rank(max, 13)?) {
        (12, 13) => Ok(rustls::ALL_VERSIONS),
        (12, 12) => Ok(TLS12_ONLY),
        (13, 13) => Ok(TLS13_ONLY),
        _ => Err("min_version is above max_version".into()),
    }
}

/// The verdict on a request's credentials.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum AuthVerdict {
    /// A user and its password matched.
    Allowed,
    /// Credentials missing, malformed or wrong: answer 401.
    Denied,
}

/// `basic_auth_users`: user name → bcrypt hash, with a small cache of checks that succeeded.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// SHA-256 of (user, password, hash) for checks that succeeded; cleared when full. Keyed by
    /// a digest, so no password is kept.
    ok: Mutex<HashSet<[u8; 32]>>,
    /// A valid hash to verify against when the user is unknown, so an unknown user takes as long
    /// as a wrong password.
    dummy: String,
}

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> Self {
        let dummy = users.values().next().cloned().unwrap_or_default();
        Self {
            users,
            ok: Mutex::new(HashSet::new()),
            dummy,
        }
    }

    /// Decodes `Authorization: Basic …` into (user, password).
    pub fn credentials(header: &str) -> Option<(String, String)> {
        let (scheme, value) = header.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_owned(), password.to_owned()))
    }

    fn digest(user: &str, password: &str, hash: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [user, password, hash] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part.as_bytes());
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Checks an `Authorization` header value. CPU-heavy (bcrypt) unless cached: call it off
    /// the async workers.
    pub fn check(&self, header: Option<&str>) -> AuthVerdict {
        let Some((user, password)) = header.and_then(Self::credentials) else {
            return AuthVerdict::Denied;
        };
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let key = Self::digest(&user, &password, hash);
        if known
            && self
                .ok
                .lock()
                .map(|set| set.contains(&key))
                .unwrap_or(false)
        {
            return AuthVerdict::Allowed;
        }
        let matches = bcrypt::verify(&password, hash).unwrap_or(false);
        if !(known && matches) {
            return AuthVerdict::Denied;
        }
        if let Ok(mut set) = self.ok.lock() {
            if set.len() >= AUTH_CACHE_ENTRIES {
                set.clear();
            }
            set.insert(key);
        }
        AuthVerdict::Allowed
    }
}

/// The `Authorization` header of a request head, if any.
pub fn authorization(head: &[u8]) -> Option<&str> {
    let head = std::str::from_utf8(head).ok()?;
    head.lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, WebConfigError> {
        WebConfig::parse(text, Path::new("/etc/ws1-probe/web.yml"))
    }

    #[test]
    fn empty_file_means_plain_http_without_auth() {
        let c = parse("").unwrap();
        assert!(c.tls.is_none() && c.auth.is_none());
    }

    #[test]
    fn unknown_fields_and_bad_hashes_are_one_clear_error() {
        let e = parse("tls_server_config:\n  cert_fil: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cert_fil`"), "{e}");
        let e = parse("basic_auth_users:\n  alice: secret\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid web config /etc/ws1-probe/web.yml: basic_auth_users.alice: not a bcrypt hash"),
            "{e}"
        );
        assert!(e.contains("htpasswd -nBC 10 alice"), "{e}");
        let e = parse("tls_server_config:\n  key_file: k.pem\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_server_config.cert_file: missing"), "{e}");
        let e = parse("tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_allowed_sans: [x]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("client_allowed_sans: not supported"), "{e}");
    }

    #[test]
    fn missing_certificate_names_the_resolved_path() {
        let e = parse("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/ws1-probe/server.crt"), "{e}");
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/web-config.yml");
        let text = std::fs::read_to_string(&path).unwrap();
        // Its certificate files are placeholders; everything else must load as shipped.
        let e = WebConfig::parse(&text, &path).unwrap_err().to_string();
        assert!(
            e.contains("tls_server_config.cert_file") && e.contains("ws1-probe.crt"),
            "{e}"
        );
        let users = text.split("basic_auth_users:").nth(1).unwrap();
        let c = WebConfig::parse(&format!("basic_auth_users:{users}"), &path).unwrap();
        assert_eq!(c.auth.unwrap().users.len(), 1);
    }

    #[test]
    fn tls_versions() {
        assert_eq!(versions(None, None).unwrap().len(), 2);
        assert_eq!(versions(Some("TLS13"), None).unwrap().len(), 1);
        assert_eq!(versions(Some("TLS10"), Some("TLS12")).unwrap().len(), 1);
        assert!(versions(Some("TLS13"), Some("TLS12")).is_err());
        assert!(versions(Some("SSL3"), None).is_err());
    }

    #[test]
    fn basic_auth_checks_bcrypt_and_caches_successes() {
        // Cost 4 keeps the test fast; the format is what htpasswd -B writes.
        let hash = bcrypt::hash_with_result("s3cret", 4)
            .unwrap()
            .format_for_version(bcrypt::Version::TwoY);
        let c = parse(&format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        let auth = c.auth.unwrap();
        let header = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))),
            AuthVerdict::Allowed
        );
        assert_eq!(auth.ok.lock().unwrap().len(), 1);
        assert_eq!(
            auth.check(Some(&header("alice", "s3cret"))),
            AuthVerdict::Allowed
        );
        assert_eq!(
            auth.check(Some(&header("alice", "wrong"))),
            AuthVerdict::Denied
        );
        assert_eq!(
            auth.check(Some(&header("bob", "s3cret"))),
            AuthVerdict::Denied
        );
        assert_eq!(auth.check(Some("Bearer abc")), AuthVerdict::Denied);
        assert_eq!(auth.check(Some("Basic !!!")), AuthVerdict::Denied);
        assert_eq!(auth.check(None), AuthVerdict::Denied);
        assert_eq!(auth.ok.lock().unwrap().len(), 1);
    }

    #[test]
    fn authorization_header_is_found_case_insensitively() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nauthorization: Basic YTpi\r\n\r\n";
        assert_eq!(authorization(head), Some("Basic YTpi"));
        assert_eq!(
            BasicAuth::credentials("Basic YTpi"),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(authorization(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
