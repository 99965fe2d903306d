//! Where a service stands against its SLO: attainment, error budget left and burn rate, from
//! two numbers, the requests in a window and those within the SLO's latency. The numbers come
//! from Prometheus (`promapi.rs`) or from one scrape of the agent (`from_exposition`, the
//! cumulative histograms since the agent started). Pure; `ws1-probe slo` does the I/O.

use serde::Serialize;

use super::Slo;

/// The server-side request histogram the SLI reads.
pub const REQUESTS: &str = "ws1_probe_request_duration_seconds";

/// Requests in the window and how many of them completed within the SLO's latency.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counts {
    pub total: f64,
    pub good: f64,
}

/// One service's row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SloStatus {
    pub service: String,
    pub latency_seconds: f64,
    pub target: f64,
    /// Requests in the window; `None`: no data.
    pub requests: Option<f64>,
    /// Share of requests within the latency; `None`: no data (never taken as 100 %).
    pub attainment: Option<f64>,
    /// 1 untouched, 0 spent, below 0 overspent.
    pub error_budget_left: Option<f64>,
    /// How many times faster than "exactly on budget" slow requests arrived over the window.
    pub burn_rate: Option<f64>,
    /// `true` when attainment is at or above the target.
    pub meets_objective: Option<bool>,
    /// Why there is no data, when there is none.
    pub note: Option<String>,
}

/// The row of `slo` for `counts` (`None` or no requests: no data, with `why`).
pub fn status(slo: &Slo, counts: Option<Counts>, why: &str) -> SloStatus {
    let mut row = SloStatus {
        service: slo.service.clone(),
        latency_seconds: slo.latency_ns as f64 / 1e9,
        target: slo.target,
        requests: None,
        attainment: None,
        error_budget_left: None,
        burn_rate: None,
        meets_objective: None,
        note: None,
    };
    let Some(c) = counts.filter(|c| c.total.is_finite() && c.good.is_finite()) else {
        row.note = Some(why.to_owned());
        return row;
    };
    row.requests = Some(c.total);
    if c.total <= 0.0 {
        row.note = Some("no requests in the window".to_owned());
        return row;
    }
    // Extrapolated increases of two series can disagree by a fraction of a request.
    let attainment = (c.good / c.total).clamp(0.0, 1.0);
    // Rounded to 1e-9: 1 - 0.99 is 0.010000000000000009 in binary, which would print a burn
    // of 99.99999999999991.
    let burn = ((1.0 - attainment) / slo.budget() * 1e9).round() / 1e9;
    row.attainment = Some(attainment);
    row.burn_rate = Some(burn);
    row.error_budget_left = Some(1.0 - burn);
    row.meets_objective = Some(attainment >= slo.target);
    row
}

/// Why a scrape gives no counts for a service.
pub const NO_REQUESTS_SEEN: &str =
    "the agent has seen no server-side request of this service since it started";

/// Counts per SLO from the agent's text exposition: its server-side request histograms,
/// cumulative since the agent started, summed over ports (and remote addresses). `None` for a
/// service without a histogram; an error when the histogram lacks the SLO's `le` bound (the
/// agent runs with other `[histogram]` bounds than the config given here).
pub fn from_exposition(text: &str, slos: &[Slo]) -> Result<Vec<Option<Counts>>, StatusError> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map_err(|e| StatusError::Exposition(e.to_string()))?;
    let mut out = vec![None::<Counts>; slos.len()];
    for sample in &scrape.samples {
        if sample.metric != REQUESTS || sample.labels.get("side") != Some("server") {
            continue;
        }
        let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
            continue;
        };
        let Some(service) = sample.labels.get("service") else {
            continue;
        };
        for (slo, slot) in slos.iter().zip(out.iter_mut()) {
            if slo.service != service {
                continue;
            }
            let total = buckets.iter().map(|b| b.count).fold(0.0_f64, f64::max);
            let good = buckets
                .iter()
                .find(|b| (b.less_than * 1e9).round() as u64 == slo.latency_ns)
                .map(|b| b.count)
                .ok_or_else(|| StatusError::NoBucket {
                    service: slo.service.clone(),
                    latency_seconds: slo.latency_ns as f64 / 1e9,
                })?;
            let c = slot.get_or_insert(Counts {
                total: 0.0,
                good: 0.0,
            });
            c.total += total;
            c.good += good;
        }
    }
    Ok(out)
}

/// The agent's start (`process_start_time_seconds` of its own process collector), in seconds
/// since the epoch.
pub fn agent_start_seconds(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("process_start_time_seconds "))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read the agent's metrics: {0}")]
    Exposition(String),
    #[error(
        "the agent's request histogram of {service} has no bucket at the SLO latency {latency_seconds} s: run the agent with the same [histogram] buckets_seconds as this config"
    )]
    NoBucket {
        service: String,
        latency_seconds: f64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::DEFAULT_WINDOW;

    fn slo(service: &str, latency_ns: u64, target: f64) -> Slo {
        Slo {
            service: service.to_owned(),
            latency_ns,
            target,
            window: DEFAULT_WINDOW,
        }
    }

    #[test]
    fn attainment_budget_and_burn_from_counts() {
        let s = slo("api", 5_000_000, 0.99);
        // 985 of 1000 within: 1.5 % slow against a 1 % budget.
        let r = status(
            &s,
            Some(Counts {
                total: 1000.0,
                good: 985.0,
            }),
            "",
        );
        assert_eq!(r.requests, Some(1000.0));
        assert!((r.attainment.unwrap() - 0.985).abs() < 1e-12);
        assert!((r.burn_rate.unwrap() - 1.5).abs() < 1e-9);
        assert!((r.error_budget_left.unwrap() + 0.5).abs() < 1e-9);
        assert_eq!(r.meets_objective, Some(false));
        // 995 of 1000: half the budget spent.
        let r = status(
            &s,
            Some(Counts {
                total: 1000.0,
                good: 995.0,
            }),
            "",
        );
        assert!((r.error_budget_left.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(r.meets_objective, Some(true));
        // Exactly at the target meets it; an extrapolated good above total is all good.
        let r = status(
            &s,
            Some(Counts {
                total: 100.0,
                good: 99.0,
            }),
            "",
        );
        assert_eq!(r.meets_objective, Some(true));
        let r = status(
            &s,
            Some(Counts {
                total: 100.0,
                good: 100.4,
            }),
            "",
        );
        assert_eq!(r.attainment, Some(1.0));
        assert_eq!(r.burn_rate, Some(0.0));
    }

    #[test]
    fn no_data_is_not_full_attainment() {
        let s = slo("api", 5_000_000, 0.99);
        let r = status(&s, None, "no series");
        assert_eq!(r.attainment, None);
        assert_eq!(r.meets_objective, None);
        assert_eq!(r.note.as_deref(), Some("no series"));
        let r = status(
            &s,
            Some(Counts {
                total: 0.0,
                good: 0.0,
            }),
            "no series",
        );
        assert_eq!(r.requests, Some(0.0));
        assert_eq!(r.attainment, None);
        assert_eq!(r.note.as_deref(), Some("no requests in the window"));
        let r = status(
            &s,
            Some(Counts {
                total: f64::NAN,
                good: 1.0,
            }),
            "nan",
        );
        assert_eq!(r.attainment, None);
    }

    const SCRAPE: &str = r#"# HELP ws1_probe_request_duration_seconds Request latency.
# TYPE ws1_probe_request_duration_seconds histogram
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="80",le="0.001"} 5
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="80",le="0.005"} 90
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="80",le="+Inf"} 100
ws1_probe_request_duration_seconds_sum{service="api",side="server",port="80"} 0.4
ws1_probe_request_duration_seconds_count{service="api",side="server",port="80"} 100
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="81",le="0.001"} 1
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="81",le="0.005"} 10
ws1_probe_request_duration_seconds_bucket{service="api",side="server",port="81",le="+Inf"} 10
ws1_probe_request_duration_seconds_sum{service="api",side="server",port="81"} 0.01
ws1_probe_request_duration_seconds_count{service="api",side="server",port="81"} 10
ws1_probe_request_duration_seconds_bucket{service="api",side="client",port="5432",le="0.001"} 0
ws1_probe_request_duration_seconds_bucket{service="api",side="client",port="5432",le="0.005"} 0
ws1_probe_request_duration_seconds_bucket{service="api",side="client",port="5432",le="+Inf"} 7
ws1_probe_request_duration_seconds_sum{service="api",side="client",port="5432"} 1
ws1_probe_request_duration_seconds_count{service="api",side="client",port="5432"} 7
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1765000000
"#;

    #[test]
    fn counts_from_the_agents_histograms_sum_server_ports_only() {
        let slos = [slo("api", 5_000_000, 0.99), slo("idle", 5_000_000, 0.99)];
        let c = from_exposition(SCRAPE, &slos).unwrap();
        assert_eq!(
            c[0],
            Some(Counts {
                total: 110.0,
                good: 100.0
            })
        );
        assert_eq!(c[1], None);
        assert_eq!(agent_start_seconds(SCRAPE), Some(1_765_000_000.0));
        // A latency that is not one of the agent's bounds is an error, not a guess.
        let err = from_exposition(SCRAPE, &[slo("api", 10_000_000, 0.99)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("no bucket at the SLO latency 0.01 s")
        );
    }
}
