//! What `bench net` prints: each load's figures, the goal's verdicts, and the statistics
//! behind them.

use super::{Figures, GOAL_LOSS_PCT, Outcome, SAMPLES, SHARES, loads::cpus};

/// A distribution-free 95 % confidence interval of the median of `v` (order statistics): the
/// k-th smallest and k-th largest values, for the largest k with P(Binomial(n, ½) < k) ≤ 2.5 %.
/// `None` when there are too few values for one (fewer than 6).
pub(super) fn median_ci(v: &[f64]) -> Option<(f64, f64)> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    // cdf = P(X ≤ i) for X ~ Binomial(n, ½), built term by term.
    let mut term = 0.5f64.powi(n as i32);
    let mut cdf = term;
    let mut k = 0;
    for i in 0..n / 2 {
        // P(X < i + 1) = P(X ≤ i).
        if cdf > 0.025 {
            break;
        }
        k = i + 1;
        term *= (n - i) as f64 / (i + 1) as f64;
        cdf += term;
    }
    (k > 0).then(|| (v[k - 1], v[n - k]))
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The goal's verdicts per load, for both ends observed and for the server only.
///
/// From the throughput rounds: PASS or MISS when the median's 95 % interval is on one side of
/// the goal. From the hooks' CPU share: the time inside the hooks is a lower bound of the loss
/// (their after-effects on caches and branch predictors fall in other frames), so it can show
/// a MISS but never a PASS; a share below the goal only says the hooks themselves fit in it.
pub(super) fn verdicts(outcomes: &[(&str, Outcome)]) {
    for (name, o) in outcomes {
        for b in o.configs.iter().filter(|c| c.key == "b" || c.key == "s") {
            let verdict = match median_ci(&b.losses) {
                Some((_, hi)) if hi <= GOAL_LOSS_PCT => "PASS",
                Some((lo, _)) if lo > GOAL_LOSS_PCT => "MISS",
                Some(_) => {
                    "UNDECIDED (the 95 % interval of the median spans the goal: more rounds or a quieter machine)"
                }
                None => "UNDECIDED (too few rounds)",
            };
            println!(
                "goal: ≤ {GOAL_LOSS_PCT} % throughput loss, {name}, {}: {verdict} (median {:.2} %)",
                b.label, b.loss
            );
        }
        for (&samples, (key, what)) in o.shares.iter().zip(SHARES) {
            if key == "c" {
                continue;
            }
            let (p, half) = share_interval(samples);
            let verdict = if p - half > GOAL_LOSS_PCT {
                "MISS (the hooks alone take more)"
            } else if p + half <= GOAL_LOSS_PCT {
                "the hooks alone take less (not a PASS: their after-effects are not counted)"
            } else {
                "UNDECIDED (the 95 % interval spans the goal)"
            };
            println!(
                "goal: ≤ {GOAL_LOSS_PCT} % throughput loss, {name}, {what}, lower bound from the hooks' CPU share {p:.2} % ± {half:.2}: {verdict}"
            );
        }
    }
}

/// The hooks' share of the samples in percent, and the half-width of its 95 % interval
/// (1.96 binomial standard errors), from (samples in the hooks, all samples).
fn share_interval((hooks, all): (u64, u64)) -> (f64, f64) {
    let n = all.max(1) as f64;
    let p = hooks as f64 / n;
    (p * 100.0, 1.96 * (p * (1.0 - p) / n).sqrt() * 100.0)
}

pub(super) fn report(o: &Outcome) {
    println!(
        "{}; {SAMPLES} samples per block, {} rounds",
        o.describe, o.rounds
    );
    let cpus = cpus() as f64;
    println!(
        "  (a) {:<40} {:>9.0} req/s   {:>6.2} µs of CPU per request",
        "no agent",
        o.base_rate,
        cpus / o.base_rate * 1e6
    );
    for Figures {
        key,
        label,
        rate,
        loss,
        added,
        losses,
    } in &o.configs
    {
        let ci = median_ci(losses).map_or(String::new(), |(lo, hi)| {
            format!(" (95 % interval {lo:.2} to {hi:.2})")
        });
        println!(
            "  ({key}) {label:<40} {rate:>9.0} req/s   {loss:>6.2} % fewer requests{ci}   {added:>+6.2} µs per request"
        );
        let each: Vec<String> = losses.iter().map(|l| format!("{l:.2}")).collect();
        println!("      loss per round, %: {}", each.join(" "));
    }
    let ((net, runs), _) = o.observed;
    println!(
        "  kernel time per request, both ends observed: network programs {net:.0} ns in {runs:.1} runs"
    );
    let (net, runs) = o.unobserved;
    println!(
        "  kernel time per request, load not observed (what every other process pays): {net:.0} ns in {runs:.1} runs"
    );
    for (&(hooks, all), (_, observed)) in o.shares.iter().zip(SHARES) {
        let (p, half) = share_interval((hooks, all));
        println!(
            "  CPU share of the hooks in the load's samples ({observed}): {p:.2} % ± {half:.2} ({hooks} of {all} samples at 499 Hz)"
        );
    }
    // One line per block would drown the figures: the first, then any that do not match.
    let matching = o.sanity.iter().filter(|l| l.ends_with(": match")).count();
    println!(
        "  sanity (b): {matching} of {} blocks match",
        o.sanity.len()
    );
    let shown = o.sanity.iter().enumerate();
    for (_, line) in shown.filter(|(i, l)| *i == 0 || !l.ends_with(": match")) {
        println!("    {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_intervals_are_order_statistics() {
        // n = 15: P(X ≤ 3) = 1.8 % ≤ 2.5 % < P(X ≤ 4) = 5.9 %, so the 4th smallest and the 4th
        // largest.
        let v: Vec<f64> = (1..=15).map(f64::from).collect();
        assert_eq!(median_ci(&v), Some((4.0, 12.0)));
        // n = 6: P(X ≤ 0) = 1.6 %: the extremes; order of the input does not matter.
        assert_eq!(median_ci(&[6.0, 1.0, 5.0, 2.0, 4.0, 3.0]), Some((1.0, 6.0)));
        // n = 5: even the extremes cover the median with only 93.8 %.
        assert_eq!(median_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]), None);
    }

    #[test]
    fn share_intervals_are_binomial() {
        // 100 of 10,000 samples: 1 %, ± 1.96 × √(0.01 × 0.99 / 10,000) = 0.195 %.
        let (p, half) = share_interval((100, 10_000));
        assert!((p - 1.0).abs() < 1e-9, "{p}");
        assert!((half - 0.195).abs() < 1e-3, "{half}");
        // No samples at all: no share, no division by zero.
        assert_eq!(share_interval((0, 0)), (0.0, 0.0));
    }
}
