//! `ws1-probe slo`: where each service with an SLO stands (attainment, error budget left, burn
//! rate), over a window from Prometheus' HTTP API, or from one scrape of the agent for the
//! time since it started. The numbers are computed by `slo::status`, the queries and answers
//! are `slo::promapi`'s, the table `report::slo`'s.

use std::{
    io::Write as _,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use ws1_probe::{
    report::slo::{self as report, SloReport},
    slo::{PromDuration, Slo, promapi, status},
    targeting::config::{self, FlagOverrides},
};

/// Attainment, error budget left and burn rate of each service's SLO
#[derive(clap::Args, Debug)]
pub struct SloArgs {
    /// TOML config file with the services' SLOs (`slo = { latency = "5ms", target = 0.99 }`;
    /// also: WS1_PROBE_CONFIG)
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prometheus base URL (e.g. http://127.0.0.1:9090): the numbers cover --window. Without
    /// it they come from the agent alone and cover the time since it started
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// Window of the Prometheus numbers, in Prometheus' syntax (30d, 7d, 1h) [default: each
    /// SLO's window, 30d unless configured]
    #[arg(long, value_name = "DURATION")]
    pub window: Option<String>,
    /// The agent's metrics endpoint, without --prometheus [default: the config's listen address,
    /// http://127.0.0.1:9479/metrics]
    #[arg(long, value_name = "URL")]
    pub agent: Option<String>,
    /// JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: SloArgs) -> anyhow::Result<()> {
    let window = match (&args.window, &args.prometheus) {
        (Some(w), Some(_)) => Some(PromDuration::parse(w).map_err(|reason| {
            anyhow::anyhow!("invalid --window {w}: {reason} (e.g. --window 30d)")
        })?),
        (Some(_), None) => anyhow::bail!(
            "--window needs --prometheus: from the agent alone the numbers cover the time since it started"
        ),
        (None, _) => None,
    };
    let flags = FlagOverrides {
        config: args.config.clone(),
        ..Default::default()
    };
    let settings = config::resolve(&flags, Vec::new(), |k| std::env::var(k).ok())
        .context("invalid configuration")?;
    let Some(path) = &settings.config_path else {
        anyhow::bail!(
            "no SLOs to report: give the config with the services' SLOs (-c FILE or WS1_PROBE_CONFIG)"
        );
    };
    if settings.slos.is_empty() {
        anyhow::bail!(
            "{} has no [[service]] with an SLO: add e.g. slo = {{ latency = \"5ms\", target = 0.99 }} to a service",
            path.display()
        );
    }
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        // Prometheus explains a refused query in the JSON body of a 400 or 422.
        .http_status_as_error(false)
        .build()
        .into();
    let report = match &args.prometheus {
        Some(url) => from_prometheus(&http, url, &settings.slos, window)?,
        None => {
            let url = agent_url(args.agent.as_deref(), settings.listen);
            from_agent(&http, &url, &settings.slos)?
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = serde_json::to_string(&report).context("cannot encode the report")?;
        writeln!(out, "{line}")
    } else {
        let over = match report.source.as_str() {
            "prometheus" => format!(
                "Prometheus {}, last {}",
                report.url,
                PromDuration((report.window_seconds * 1000.0) as u64)
            ),
            _ => format!(
                "the agent at {}, since it started {} ago",
                report.url,
                PromDuration((report.window_seconds.max(1.0)) as u64 * 1000)
            ),
        };
        writeln!(out, "SLOs of {} from {over}", path.display())
            .and_then(|()| write!(out, "{}", report::render(&report)))
    }
    .and_then(|()| out.flush())
    .context("cannot write to standard output")
}

/// `--agent` as given (`host:port` or a URL, `/metrics` added when it has no path), or the
/// configured listen address (a wildcard address is reached on loopback).
fn agent_url(given: Option<&str>, listen: std::net::SocketAddr) -> String {
    let url = match given {
        Some(u) if u.contains("://") => u.to_owned(),
        Some(hostport) => format!("http://{hostport}"),
        None => {
            let mut addr = listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let path_start = url.find("://").map_or(0, |i| i + 3).min(url.len());
    if url[path_start..].contains('/') {
        url
    } else {
        format!("{url}/metrics")
    }
}

/// `https://` cannot work: the CLI has no TLS stack.
fn plain_http(url: &str, flag: &str) -> anyhow::Result<()> {
    if url.starts_with("https://") {
        anyhow::bail!(
            "{flag} {url}: https is not supported (ws1-probe has no TLS stack); use an http:// address, e.g. through a local port-forward"
        );
    }
    if url.contains("://") && !url.starts_with("http://") {
        anyhow::bail!("{flag} {url}: give an http:// URL, e.g. http://127.0.0.1:9090");
    }
    Ok(())
}

/// GET `url` (with `query` as the `query` parameter); the status and the body.
fn get(http: &ureq::Agent, url: &str, query: Option<&str>) -> Result<(u16, String), ureq::Error> {
    let mut request = http.get(url);
    if let Some(q) = query {
        request = request.query("query", q);
    }
    let mut response = request.call()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string()?;
    Ok((status, body))
}

fn from_prometheus(
    http: &ureq::Agent,
    base: &str,
    slos: &[Slo],
    window: Option<PromDuration>,
) -> anyhow::Result<SloReport> {
    plain_http(base, "--prometheus")?;
    let base = if base.contains("://") {
        base.trim_end_matches('/').to_owned()
    } else {
        format!("http://{}", base.trim_end_matches('/'))
    };
    let endpoint = format!("{base}/api/v1/query");
    let value = |query: &str| -> anyhow::Result<Option<f64>> {
        let (status, body) = get(http, &endpoint, Some(query)).map_err(|err| {
            anyhow::anyhow!(
                "cannot reach Prometheus at {base}: {err}; check --prometheus (its base URL, e.g. http://127.0.0.1:9090)"
            )
        })?;
        match promapi::single_value(&body) {
            Ok(v) => Ok(v),
            Err(err @ promapi::PromApiError::Query { .. }) => {
                Err(anyhow::anyhow!("{err} (query: {query})"))
            }
            Err(err) => Err(anyhow::anyhow!("{endpoint} answered {status}: {err}")),
        }
    };
    let mut services = Vec::with_capacity(slos.len());
    for slo in slos {
        let w = window.unwrap_or(slo.window);
        let total = value(&promapi::total_query(slo, w))?;
        let good = value(&promapi::good_query(slo, w))?;
        let why = format!(
            "Prometheus has no server-side request series of {} in the last {w}",
            slo.service
        );
        let counts = match (total, good) {
            (Some(total), Some(good)) => Some(status::Counts { total, good }),
            // Requests but no `le` bucket at the latency: the agent runs other bounds.
            (Some(total), None) if total > 0.0 => {
                services.push(status::status(
                    slo,
                    None,
                    &format!(
                        "requests but no le bucket at {} s: the agents run with other [histogram] buckets_seconds than this config",
                        slo.latency_ns as f64 / 1e9
                    ),
                ));
                continue;
            }
            _ => None,
        };
        services.push(status::status(slo, counts, &why));
    }
    let window_seconds = window.map_or_else(
        || slos.first().map_or(0.0, |s| s.window.0 as f64 / 1000.0),
        |w| w.0 as f64 / 1000.0,
    );
    Ok(SloReport {
        source: "prometheus".to_owned(),
        url: base,
        window_seconds,
        services,
    })
}

fn from_agent(http: &ureq::Agent, url: &str, slos: &[Slo]) -> anyhow::Result<SloReport> {
    plain_http(url, "--agent")?;
    let (status, text) = get(http, url, None).map_err(|err| {
        anyhow::anyhow!(
            "cannot reach the agent at {url}: {err}; start it (`ws1-probe agent`), give its address with --agent, or use --prometheus"
        )
    })?;
    if status != 200 {
        anyhow::bail!("the agent at {url} answered {status}: check --agent (its /metrics URL)");
    }
    let counts = status::from_exposition(&text, slos)?;
    let started = status::agent_start_seconds(&text).with_context(|| {
        format!("{url} has no process_start_time_seconds: is it a ws1-probe agent?")
    })?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let services = slos
        .iter()
        .zip(counts)
        .map(|(slo, c)| status::status(slo, c, status::NO_REQUESTS_SEEN))
        .collect();
    Ok(SloReport {
        source: "agent".to_owned(),
        url: url.to_owned(),
        window_seconds: (now - started).max(0.0),
        services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls() {
        let listen: std::net::SocketAddr = "0.0.0.0:9479".parse().unwrap();
        assert_eq!(agent_url(None, listen), "http://127.0.0.1:9479/metrics");
        assert_eq!(
            agent_url(Some("10.0.0.1:9479"), listen),
            "http://10.0.0.1:9479/metrics"
        );
        assert_eq!(
            agent_url(Some("http://h:1/custom"), listen),
            "http://h:1/custom"
        );
        assert!(plain_http("https://p:9090", "--prometheus").is_err());
        assert!(plain_http("http://p:9090", "--prometheus").is_ok());
        assert!(plain_http("p:9090", "--prometheus").is_ok());
    }
}
