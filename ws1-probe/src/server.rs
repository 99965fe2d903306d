//! The agent's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`, and
//! `/debug/pprof/profile?seconds=N` (a CPU profile of the next N seconds, gzipped pprof, as
//! Go's net/http/pprof serves it, for Parca/Pyroscope-style scrapers).
//!
//! A deliberately small HTTP/1.1 responder (GET/HEAD, `Connection: close`): scrapers and probes
//! need nothing more, and it keeps the agent's dependency tree and memory small.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::metrics::CONTENT_TYPE;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
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

/// Routes a request. `render` is called only for `/metrics`.
pub fn route(method: &str, path: &str, ready: bool, render: impl FnOnce() -> String) -> Response {
    if method != "GET" && method != "HEAD" {
        return Response::text(405, "method not allowed\n");
    }
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: render().into_bytes(),
        },
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
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Accepts connections until `shutdown` completes. `render` produces the `/metrics` body.
pub async fn serve<R>(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    render: R,
    profile: Option<Arc<ProfileFn>>,
    shutdown: impl Future<Output = ()>,
) where
    R: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let render = Arc::clone(&render);
                    let ready = Arc::clone(&ready);
                    let profile = profile.clone();
                    tokio::spawn(async move {
                        if let Err(err) = handle(stream, &ready, &*render, profile.as_deref()).await {
                            tracing::debug!("http connection: {err}");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!("accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    ready: &AtomicBool,
    render: &(dyn Fn() -> String + Send + Sync),
    profile: Option<&ProfileFn>,
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
    let response = match parse_request_line(&head).filter(|_| complete) {
        Some(("GET", "/debug/pprof/profile")) => {
            match (profile, profile_seconds(request_query(&head))) {
                (None, _) => Response::text(
                    404,
                    "profiling is off: start the agent with --collectors including profile and --profile-frequency above 0\n",
                ),
                (Some(_), Err(msg)) => Response::text(400, &msg),
                (Some(profile), Ok(seconds)) => profile(seconds).await,
            }
        }
        Some((method, path)) => {
            let head_only = method == "HEAD";
            let mut r = route(method, path, ready.load(Ordering::Acquire), render);
            if head_only {
                // Content-Length still describes the body a GET would get.
                let len = r.body.len();
                r.body.clear();
                return write_response(&mut stream, &r, len).await;
            }
            r
        }
        None => Response::text(400, "bad request\n"),
    };
    let len = response.body.len();
    write_response(&mut stream, &response, len).await
}

async fn write_response(stream: &mut TcpStream, r: &Response, len: usize) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
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
        let never = || panic!("render must not run");
        assert_eq!(route("GET", "/healthz", false, never).status, 200);
        assert_eq!(route("GET", "/readyz", false, never).status, 503);
        assert_eq!(route("GET", "/readyz", true, never).status, 200);
        assert_eq!(route("POST", "/metrics", true, never).status, 405);
        assert_eq!(route("GET", "/nope", true, never).status, 404);
        let r = route("GET", "/metrics", true, || "m 1\n".to_owned());
        assert_eq!(
            (r.status, r.content_type, r.body.as_slice()),
            (200, CONTENT_TYPE, b"m 1\n".as_slice())
        );
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
