//! The PromQL `ws1-probe slo` asks Prometheus' HTTP API (`/api/v1/query`) and the reading of
//! its JSON answers.
//!
//! The queries read the raw request histogram, not the recording rules: `increase()` over the
//! window of the `le` bucket and of the count gives the share of good *requests* (traffic
//! weighted, which is what the objective says), for any `--window`, and from the first day the
//! agent was scraped, whether or not the rules are loaded. The recorded
//! `service:ws1_probe_slo_errors:ratio_window` is the mean of 5-minute ratios (unweighted, as
//! Sloth records it, cheap for dashboards) and exists only for the configured window and only
//! since the rules were loaded. Two range reads per service over 30 days are cheap for a CLI.

use serde::Deserialize;

use super::{PromDuration, Slo, rules::le_matcher, status::REQUESTS};

/// Requests of `slo`'s service over `window`, all agents (instances) and ports together.
pub fn total_query(slo: &Slo, window: PromDuration) -> String {
    format!(
        "sum(increase({REQUESTS}_count{{side=\"server\",service=\"{}\"}}[{window}]))",
        escape(&slo.service)
    )
}

/// Requests of `slo`'s service over `window` that completed within its latency.
pub fn good_query(slo: &Slo, window: PromDuration) -> String {
    format!(
        "sum(increase({REQUESTS}_bucket{{side=\"server\",service=\"{}\",{}}}[{window}]))",
        escape(&slo.service),
        le_matcher(slo.latency_ns)
    )
}

/// A label value inside PromQL double quotes.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorSample {
    value: (f64, String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromApiError {
    #[error("Prometheus refused the query: {message}")]
    Query { message: String },
    #[error("not a Prometheus API answer ({reason}); check that the URL is Prometheus' base URL")]
    Malformed { reason: String },
}

/// The one value of an instant query whose result is a vector of at most one sample (a
/// `sum(...)`); `None` for an empty vector (no series: no data). NaN and infinities come back
/// as they are (Prometheus writes them as strings).
pub fn single_value(body: &str) -> Result<Option<f64>, PromApiError> {
    let answer: Answer = serde_json::from_str(body).map_err(|e| PromApiError::Malformed {
        reason: e.to_string(),
    })?;
    if answer.status != "success" {
        return Err(PromApiError::Query {
            message: answer.error.unwrap_or_else(|| answer.status.clone()),
        });
    }
    let value = |s: &str| {
        s.parse::<f64>().map_err(|_| PromApiError::Malformed {
            reason: format!("sample value {s:?} is not a number"),
        })
    };
    let malformed = |reason: String| PromApiError::Malformed { reason };
    let data = answer
        .data
        .ok_or_else(|| malformed("no data in the answer".to_owned()))?;
    match data.result_type.as_str() {
        "vector" => {
            let samples: Vec<VectorSample> =
                serde_json::from_value(data.result).map_err(|e| malformed(e.to_string()))?;
            match samples.as_slice() {
                [] => Ok(None),
                [one] => value(&one.value.1).map(Some),
                more => Err(malformed(format!(
                    "{} series where one was expected",
                    more.len()
                ))),
            }
        }
        "scalar" => {
            let (_, v): (f64, String) =
                serde_json::from_value(data.result).map_err(|e| malformed(e.to_string()))?;
            value(&v).map(Some)
        }
        other => Err(malformed(format!(
            "the result is a {other}, not an instant vector"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slo::DEFAULT_WINDOW;

    fn slo() -> Slo {
        Slo {
            service: "trading-engine".to_owned(),
            latency_ns: 5_000_000,
            target: 0.99,
            window: DEFAULT_WINDOW,
        }
    }

    #[test]
    fn queries_read_the_raw_histogram_over_the_window() {
        assert_eq!(
            total_query(&slo(), PromDuration::hours(24)),
            "sum(increase(ws1_probe_request_duration_seconds_count{side=\"server\",service=\"trading-engine\"}[1d]))"
        );
        assert_eq!(
            good_query(&slo(), DEFAULT_WINDOW),
            "sum(increase(ws1_probe_request_duration_seconds_bucket{side=\"server\",service=\"trading-engine\",le=\"0.005\"}[30d]))"
        );
        let mut odd = slo();
        odd.service = "a\"b".to_owned();
        assert!(total_query(&odd, DEFAULT_WINDOW).contains("service=\"a\\\"b\""));
    }

    #[test]
    fn answers_parse_to_one_value_or_no_data() {
        let one = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1765000000.123,"1234.5"]}]}}"#;
        assert_eq!(single_value(one), Ok(Some(1234.5)));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(single_value(empty), Ok(None));
        let nan = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert!(single_value(nan).unwrap().unwrap().is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert_eq!(single_value(scalar), Ok(Some(2.0)));
        let err = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:7: parse error"}"#;
        assert_eq!(
            single_value(err),
            Err(PromApiError::Query {
                message: "invalid parameter \"query\": 1:7: parse error".to_owned()
            })
        );
        assert!(matches!(
            single_value("<html>Grafana</html>"),
            Err(PromApiError::Malformed { .. })
        ));
        let two = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1,"1"]},{"metric":{"a":"2"},"value":[1,"2"]}]}}"#;
        assert!(matches!(
            single_value(two),
            Err(PromApiError::Malformed { .. })
        ));
    }
}
