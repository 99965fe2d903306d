//! `ws1-probe slo`: one row per service with an SLO (objective, requests, attainment, error
//! budget left, burn rate), as a table or JSON.

use serde::Serialize;

use crate::slo::status::SloStatus;

/// What `ws1-probe slo` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SloReport {
    /// `prometheus` or `agent`.
    pub source: String,
    /// The Prometheus base URL or the agent's metrics URL.
    pub url: String,
    /// The window the numbers cover: `--window`, or the agent's uptime.
    pub window_seconds: f64,
    pub services: Vec<SloStatus>,
}

/// `99% within 5ms`.
pub fn objective(s: &SloStatus) -> String {
    let ns = (s.latency_seconds * 1e9).round() as u64;
    let latency = match ns {
        n if n >= 1_000_000_000 && n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        n => crate::units::format_ns(n),
    };
    format!("{} within {latency}", percent(s.target))
}

/// A fraction as a percentage with as many decimals as a target like 99.95 % needs.
fn percent(v: f64) -> String {
    let p = v * 100.0;
    let text = format!("{p:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// The table, with a note under it for each service without data.
pub fn render(r: &SloReport) -> String {
    let rows: Vec<Vec<String>> = r
        .services
        .iter()
        .map(|s| {
            let or_none = |v: Option<String>| v.unwrap_or_else(|| "no data".to_owned());
            vec![
                s.service.clone(),
                objective(s),
                s.requests
                    .map_or_else(|| "no data".to_owned(), |n| format!("{n:.0}")),
                or_none(s.attainment.map(|a| format!("{:.3}%", a * 100.0))),
                or_none(s.error_budget_left.map(|b| format!("{:.1}%", b * 100.0))),
                or_none(s.burn_rate.map(|b| format!("{b:.2}x"))),
                match s.meets_objective {
                    Some(true) => "ok".to_owned(),
                    Some(false) => "BELOW OBJECTIVE".to_owned(),
                    None => "no data".to_owned(),
                },
            ]
        })
        .collect();
    let mut out = super::table(
        &[
            "SERVICE",
            "OBJECTIVE",
            "REQUESTS",
            "ATTAINMENT",
            "BUDGET LEFT",
            "BURN RATE",
            "STATUS",
        ],
        &rows,
    );
    for s in &r.services {
        if let Some(note) = &s.note {
            out.push_str(&format!("{}: {note}\n", s.service));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::{
        DEFAULT_WINDOW, Slo,
        status::{Counts, status},
    };

    #[test]
    fn table_shows_no_data_and_below_objective() {
        let slo = |service: &str, target| Slo {
            service: service.to_owned(),
            latency_ns: 5_000_000,
            target,
            window: DEFAULT_WINDOW,
        };
        let report = SloReport {
            source: "prometheus".to_owned(),
            url: "http://127.0.0.1:9090".to_owned(),
            window_seconds: 2_592_000.0,
            services: vec![
                status(
                    &slo("slow", 0.99),
                    Some(Counts {
                        total: 200.0,
                        good: 0.0,
                    }),
                    "",
                ),
                status(
                    &slo("fast", 0.999),
                    Some(Counts {
                        total: 1000.0,
                        good: 1000.0,
                    }),
                    "",
                ),
                status(&slo("idle", 0.9995), None, "no series in the window"),
            ],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{text}");
        assert!(
            lines[1].contains("99% within 5ms")
                && lines[1].contains("0.000%")
                && lines[1].contains("-9900.0%")
                && lines[1].contains("100.00x")
                && lines[1].ends_with("BELOW OBJECTIVE"),
            "{text}"
        );
        assert!(
            lines[2].contains("99.9% within 5ms")
                && lines[2].contains("100.000%")
                && lines[2].ends_with("ok"),
            "{text}"
        );
        assert!(
            lines[3].contains("99.95% within 5ms") && lines[3].ends_with("no data"),
            "{text}"
        );
        assert_eq!(lines[4], "idle: no series in the window");
    }
}
