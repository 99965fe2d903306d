//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and
//! `/debug/pprof/profile?seconds=N` (a CPU profile of the next N seconds, gzipped pprof, as
//! Go's net/http/pprof serves it, for Parca/Pyroscope-style scrapers).
//!
//! A deliberately small HTTP/1.1 responder (GET/HEAD, `Connection: close`): scrapers and probes
//! need nothing more, and it keeps the agent's dependency tree and memory small.
//!
//! Scrapes are cheap for the rest of the agent: `/metrics` is rendered on the blocking pool,
//! never on the runtime's workers, so `/healthz` answers while a render runs; scrapers that
//! arrive while a render is running wait for it and share its result ([`Scrapes`]); the body is
//! gzipped when the client asks (`Accept-Encoding: gzip`), as Prometheus does.

use std::{
    future::Future,
    io::Write as _,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    metrics::CONTENT_TYPE,
    webconfig::{AuthVerdict, UNAUTHENTICATED_PATHS, WebConfig},
};

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head (and to finish a TLS handshake).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// bcrypt checks running at once: wrong passwords cannot take more of the blocking pool.
const AUTH_CHECKS: usize = 2;
/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// `Content-Encoding` of the body, if any (`gzip`).
    pub encoding: Option<&'static str>,
    /// Extra header lines (each ending in CRLF), e.g. `WWW-Authenticate`.
    pub headers: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            encoding: None,
            headers: "",
            body: body.as_bytes().to_vec(),
        }
    }
}

/// One `/metrics` render, shared by the scrapes that waited for it.
#[derive(Debug)]
pub struct Rendered {
    /// When the render finished.
    pub at: Instant,
    pub body: Vec<u8>,
    gzip: OnceLock<Vec<u8>>,
}

impl Rendered {
    pub fn new(body: Vec<u8>) -> Self {
        Self {
            at: Instant::now(),
            body,
            gzip: OnceLock::new(),
        }
    }

    /// The body gzipped (compressed once, at the first scrape that asks).
    pub fn gzipped(&self) -> &[u8] {
        self.gzip.get_or_init(|| gzip(&self.body))
    }
}

/// Gzip at a fast level: a scrape body compresses 7–16× at level 1 already.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

/// Single-flight `/metrics` renders: a scrape that arrives while a render runs waits for it and
/// is answered with its result; one that arrives later starts a new render. At most one render
/// runs at a time, on the blocking pool.
pub struct Scrapes {
    render: Arc<dyn Fn() -> String + Send + Sync>,
    last: tokio::sync::Mutex<Option<Arc<Rendered>>>,
}

impl Scrapes {
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self {
            render: Arc::new(render),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// A render that finished after `arrived` (a scrape never gets data older than itself),
    /// gzipped too if `gzip`.
    pub async fn get(&self, arrived: Instant, gzip: bool) -> Arc<Rendered> {
        let mut last = self.last.lock().await;
        let current = match last.as_ref() {
            Some(r) if r.at >= arrived => Arc::clone(r),
            _ => {
                let render = Arc::clone(&self.render);
                let body = tokio::task::spawn_blocking(move || render().into_bytes())
                    .await
                    .unwrap_or_default();
                let r = Arc::new(Rendered::new(body));
                *last = Some(Arc::clone(&r));
                r
            }
        };
        if gzip && current.gzip.get().is_none() {
            let r = Arc::clone(&current);
            // Compress on the blocking pool too; the result lands in the shared render.
            let _ = tokio::task::spawn_blocking(move || {
                r.gzipped();
            })
            .await;
        }
        current
    }
}

/// Whether a request head's `Accept-Encoding` accepts gzip (`gzip` or `*`, not with `q=0`).
pub fn accepts_gzip(head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else {
        return false;
    };
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept-encoding"))
        .flat_map(|(_, value)| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Default and largest `seconds` of a profile request (Go's net/http/pprof defaults to 30).
pub const PROFILE_DEFAULT_SECONDS: u64 = 30;
pub const PROFILE_MAX_SECONDS: u64 = 300;

/// Produces a profile of the next `seconds` seconds: the gzipped pprof body, or a status and
/// message.
pub type ProfileFn =
    dyn Fn(u64) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync + 'static;

/// The `seconds` parameter of a profile request's query string.
pub fn profile_seconds(query: Option<&str>) -> Result<u64, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("seconds="))
    else {
        return Ok(PROFILE_DEFAULT_SECONDS);
    };
    match value.parse::<u64>() {
        Ok(s) if (1..=PROFILE_MAX_SECONDS).contains(&s) => Ok(s),
        _ => Err(format!(
            "bad seconds={value}: use 1 to {PROFILE_MAX_SECONDS}\n"
        )),
    }
}

/// The query string of a request head's target, if any.
pub fn request_query(head: &[u8]) -> Option<&str> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let target = line.split(' ').nth(1)?;
    target.split_once('?').map(|(_, q)| q)
}

/// Method and path of a request head, or `None` if it is not an HTTP request line.
pub fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    let path = target.split('?').next().unwrap_or(target);
    Some((method, path))
}

/// Routes a request other than `/metrics` (which [`Scrapes`] answers).
pub fn route(method: &str, path: &str, ready: bool) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "method not allowed\n");
    }
    match path {
        "/healthz" => Response::text(200, "ok\n"),
        "/readyz" if ready => Response::text(200, "ready\n"),
        "/readyz" => Response::text(503, "not ready: programs are still loading\n"),
        "/" => Response::text(
            200,
            "ws1-probe agent: /metrics (Prometheus), /healthz, /readyz, /debug/pprof/profile?seconds=N\n",
        ),
        _ => Response::text(404, "not found: try /metrics, /healthz or /readyz\n"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// What a connection handler shares with the others.
struct Shared {
    ready: Arc<AtomicBool>,
    scrapes: Scrapes,
    profile: Option<Arc<ProfileFn>>,
    web: Arc<WebConfig>,
    auth_checks: tokio::sync::Semaphore,
}

/// Accepts connections until `shutdown` completes. `render` produces the `/metrics` body; it
/// runs on the blocking pool, one render at a time, shared by concurrent scrapes. `web` adds TLS
/// and basic authentication (`--web-config`); [`WebConfig::default`] serves plain HTTP.
pub async fn serve<R>(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    render: R,
    profile: Option<Arc<ProfileFn>>,
    web: Arc<WebConfig>,
    shutdown: impl Future<Output = ()>,
) where
    R: Fn() -> String + Send + Sync + 'static,
{
    let shared = Arc::new(Shared {
        ready,
        scrapes: Scrapes::new(render),
        profile,
        web,
        auth_checks: tokio::sync::Semaphore::new(AUTH_CHECKS),
    });
    let tls = shared
        .web
        .tls
        .as_ref()
        .map(|c| tokio_rustls::TlsAcceptor::from(Arc::clone(c)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let result = match tls {
                            None => handle(stream, &shared).await,
                            Some(tls) => handle_tls(stream, tls, &shared).await,
                        };
                        if let Err(err) = result {
                            tracing::debug!("http connection: {err}");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(
                        "accept failed: {err}; retrying in 100 ms (on EMFILE raise the agent's open-file limit, LimitNOFILE in the unit)"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// A TLS connection: a client speaking plain HTTP gets a 400 in plain text saying so (as Go's
/// servers answer), never metrics; a failed handshake closes the connection.
async fn handle_tls(
    mut stream: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(READ_TIMEOUT, stream.peek(&mut first))
        .await
        .unwrap_or(Ok(0))?;
    if n == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE {
        let r = Response::text(
            400,
            "client sent an HTTP request to an HTTPS server: use https://\n",
        );
        let len = r.body.len();
        return write_response(&mut stream, &r, len, false).await;
    }
    let stream = tokio::time::timeout(READ_TIMEOUT, tls.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tls handshake"))??;
    handle(stream, shared).await
}

/// Whether a request may proceed: always for the probe endpoints and without `basic_auth_users`;
/// otherwise its credentials are checked off the async workers, a few at a time.
async fn authorized(shared: &Shared, head: &[u8], path: &str) -> bool {
    if shared.web.auth.is_none() || UNAUTHENTICATED_PATHS.contains(&path) {
        return true;
    }
    let header = crate::webconfig::authorization(head).map(str::to_owned);
    let Ok(_permit) = shared.auth_checks.acquire().await else {
        return false;
    };
    let web = Arc::clone(&shared.web);
    tokio::task::spawn_blocking(move || {
        web.auth
            .as_ref()
            .is_some_and(|a| a.check(header.as_deref()) == AuthVerdict::Allowed)
    })
    .await
    .unwrap_or(false)
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    })
    .await
    .unwrap_or(Ok(false))?;
    let arrived = Instant::now();
    let request = parse_request_line(&head).filter(|_| complete);
    if let Some((_, path)) = request
        && !authorized(shared, &head, path).await
    {
        let r = Response {
            headers: "WWW-Authenticate: Basic realm=\"ws1-probe\", charset=\"UTF-8\"\r\n",
            ..Response::text(
                401,
                "unauthorized: send the user and password of the agent's --web-config\n",
            )
        };
        let len = r.body.len();
        return write_response(&mut stream, &r, len, false).await;
    }
    let (response, head_only) = match request {
        Some(("GET", "/debug/pprof/profile")) => {
            let r = match (
                shared.profile.as_deref(),
                profile_seconds(request_query(&head)),
            ) {
                (None, _) => Response::text(
                    404,
                    "profiling is off: start the agent with --collectors including profile and --profile-frequency above 0\n",
                ),
                (Some(_), Err(msg)) => Response::text(400, &msg),
                (Some(profile), Ok(seconds)) => profile(seconds).await,
            };
            (r, false)
        }
        Some((method @ ("GET" | "HEAD"), "/metrics")) => {
            let gzip = accepts_gzip(&head);
            let rendered = shared.scrapes.get(arrived, gzip).await;
            let body = if gzip {
                rendered.gzipped().to_vec()
            } else {
                rendered.body.clone()
            };
            let r = Response {
                status: 200,
                content_type: CONTENT_TYPE,
                encoding: gzip.then_some("gzip"),
                headers: "",
                body,
            };
            (r, method == "HEAD")
        }
        Some((method, path)) => (
            route(method, path, shared.ready.load(Ordering::Acquire)),
            method == "HEAD",
        ),
        None => (Response::text(400, "bad request\n"), false),
    };
    // A HEAD's Content-Length still describes the body a GET would get.
    let len = response.body.len();
    write_response(&mut stream, &response, len, head_only).await
}

async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    r: &Response,
    len: usize,
    head_only: bool,
) -> std::io::Result<()> {
    let encoding = r
        .encoding
        .map(|e| format!("Content-Encoding: {e}\r\nVary: Accept-Encoding\r\n"))
        .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\n{encoding}{}Content-Length: {len}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.headers
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(&r.body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line(b"hello\r\n\r\n"), None);
    }

    #[test]
    fn profile_queries() {
        assert_eq!(profile_seconds(None), Ok(PROFILE_DEFAULT_SECONDS));
        assert_eq!(profile_seconds(Some("seconds=5")), Ok(5));
        assert_eq!(profile_seconds(Some("debug=0&seconds=7")), Ok(7));
        assert!(profile_seconds(Some("seconds=0")).is_err());
        assert!(profile_seconds(Some("seconds=301")).is_err());
        assert!(profile_seconds(Some("seconds=x")).is_err());
        assert_eq!(
            request_query(b"GET /debug/pprof/profile?seconds=3 HTTP/1.1\r\n\r\n"),
            Some("seconds=3")
        );
        assert_eq!(request_query(b"GET /metrics HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz", false).status, 200);
        assert_eq!(route("GET", "/readyz", false).status, 503);
        assert_eq!(route("GET", "/readyz", true).status, 200);
        assert_eq!(route("POST", "/metrics", true).status, 405);
        assert_eq!(route("GET", "/nope", true).status, 404);
    }

    #[test]
    fn gzip_is_accepted_as_clients_send_it() {
        let head = |v: &str| format!("GET /metrics HTTP/1.1\r\nAccept-Encoding: {v}\r\n\r\n");
        assert!(accepts_gzip(head("gzip").as_bytes()));
        assert!(accepts_gzip(head("deflate, gzip;q=0.5").as_bytes()));
        assert!(accepts_gzip(head("*").as_bytes()));
        assert!(!accepts_gzip(head("gzip;q=0").as_bytes()));
        assert!(!accepts_gzip(head("identity").as_bytes()));
        assert!(accepts_gzip(
            b"GET / HTTP/1.1\r\naccept-encoding:GZIP\r\n\r\n"
        ));
        assert!(!accepts_gzip(b"GET /metrics HTTP/1.1\r\n\r\n"));
        let body = b"m 1\n".repeat(1000);
        let mut out = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&gzip(&body)[..]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, body);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_one_render() {
        let renders = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&renders);
        let scrapes = Arc::new(Scrapes::new(move || {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            std::thread::sleep(Duration::from_millis(200));
            format!("renders {n}\n")
        }));
        let arrived = Instant::now();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let s = Arc::clone(&scrapes);
                tokio::spawn(async move { s.get(arrived, false).await.body.clone() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), b"renders 1\n");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // A scrape arriving after that render finished gets a new one.
        let later = scrapes.get(Instant::now(), true).await;
        assert_eq!(later.body, b"renders 2\n");
        assert_eq!(renders.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&ready),
            || "x 1\n".to_owned(),
            None,
            Arc::new(WebConfig::default()),
            async {
                let _ = rx.await;
            },
        ));
        let get = |path: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Release);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK\r\n"), "{m}");
        assert!(
            m.contains("Content-Length: 4\r\n") && m.ends_with("\r\n\r\nx 1\n"),
            "{m}"
        );
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}
