//! Host mode's `service` labels: which command names get a label of their own, and exported
//! counters that never go backwards while names come and go.
//!
//! In host mode every command name is a service id, far more than a Prometheus label should
//! carry. [`SlotPolicy`] gives `limit` label slots to the busiest command names over a sliding
//! window (activity = syscalls + network events, from per-update deltas); kernel threads share
//! the pinned label `kernel`; a name whose processes are gone and that did nothing since the
//! previous update gives its slot back at once (one-shot commands never hold one); a name idle
//! for `idle_retire` retires; a name that becomes busy takes a free slot at the next update, or
//! the slot of a holder it out-runs twice over once that holder has had its slot for a window.
//!
//! [`Accumulator`] keeps what Prometheus sees monotonic. Collectors export per-id series (the
//! `service` label holds the id); each update adds every series' increase since the previous
//! update to the exported series of the id's label at that moment. So what was once attributed
//! to a label stays there, `other` only grows, and a promoted name's series start at its
//! promotion. When a label retires its series stop being exported (Prometheus marks them stale);
//! their totals are kept (for the last [`RETIRED_KEPT`] retired labels), so a name that comes
//! back continues where it stopped instead of starting again at 0.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use prometheus::proto::{self, Metric, MetricFamily, MetricType};

use crate::metrics::label_pair;

/// Label slots for command names (configured services and `kernel` do not use one).
pub const DEFAULT_LIMIT: usize = 20;
/// The sliding window activity is ranked over, and the least time a holder keeps its slot.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// How long a label may see no activity before it retires (`--label-idle-retire`).
pub const DEFAULT_IDLE_RETIRE: Duration = Duration::from_secs(300);
/// The label every kernel thread is exported under.
pub const KERNEL_LABEL: &str = "kernel";
/// The label of every id without a slot.
pub const OTHER_LABEL: &str = "other";
/// Retired labels whose totals are kept, so they continue if the name comes back.
pub const RETIRED_KEPT: usize = 64;
/// Gauges that are ratios of two exported series with the same labels: (ratio, numerator,
/// denominator; a histogram counts its observations). Summing ratios of the ids a label
/// covers would be wrong, so they are computed again from the label's totals.
const RATIOS: &[(&str, &str, &str)] = &[
    (
        "ws1_probe_connection_reuse_ratio",
        "ws1_probe_connection_requests_reused_total",
        "ws1_probe_request_duration_seconds",
    ),
    (
        "ws1_probe_connections_per_request",
        "ws1_probe_tcp_connections_total",
        "ws1_probe_request_duration_seconds",
    ),
    (
        "ws1_probe_profile_truncated_stack_ratio",
        "ws1_probe_profile_truncated_samples_total",
        "ws1_probe_profile_samples_total",
    ),
];

/// Gauges that are limits, not amounts: ids folded into one label keep the smallest
/// (`true`) or the largest (`false`) value instead of the sum.
const LIMITS: &[(&str, bool)] = &[
    ("ws1_probe_service_fd_limit", true),
    ("ws1_probe_service_memory_limit_bytes", false),
];

/// A newcomer takes a holder's slot only when its window activity is this many times larger.
const DISPLACE_FACTOR: u64 = 2;

/// Settings of the host-mode label policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LabelOptions {
    pub limit: usize,
    pub window: Duration,
    pub idle_retire: Duration,
}

impl Default for LabelOptions {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            window: DEFAULT_WINDOW,
            idle_retire: DEFAULT_IDLE_RETIRE,
        }
    }
}

#[derive(Clone, Debug)]
struct Activity {
    /// Cumulative activity last read (the kernel's counters).
    last_total: u64,
    /// Increases within the window, oldest first.
    recent: VecDeque<(Instant, u64)>,
    /// The last update that saw an increase.
    last_active: Instant,
    /// Increase seen by the latest update.
    delta: u64,
}

impl Activity {
    fn in_window(&self) -> u64 {
        self.recent.iter().map(|(_, n)| n).sum()
    }
}

/// Which ids hold a label slot. Pure: time and the kernel's counts are inputs.
#[derive(Clone, Debug)]
pub struct SlotPolicy {
    opts: LabelOptions,
    pinned: BTreeSet<u32>,
    activity: HashMap<u32, Activity>,
    /// id → when it got its slot.
    holders: HashMap<u32, Instant>,
}

/// What an update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub promoted: Vec<u32>,
    pub retired: Vec<u32>,
}

impl SlotPolicy {
    /// `pinned` ids (configured services, `kernel`) always keep their label and use no slot.
    pub fn new(opts: LabelOptions, pinned: impl IntoIterator<Item = u32>) -> Self {
        Self {
            opts,
            pinned: pinned.into_iter().collect(),
            activity: HashMap::new(),
            holders: HashMap::new(),
        }
    }

    /// New settings (a configuration reload); slots are kept and judged by them from the next
    /// update on.
    pub fn set_options(&mut self, opts: LabelOptions) {
        self.opts = opts;
    }

    /// Whether `id` is exported under its own name.
    pub fn keeps(&self, id: u32) -> bool {
        self.pinned.contains(&id) || self.holders.contains_key(&id)
    }

    /// Ids holding a slot.
    pub fn holders(&self) -> impl Iterator<Item = u32> + '_ {
        self.holders.keys().copied()
    }

    /// Activity of `id` over the window.
    pub fn window_activity(&self, id: u32) -> u64 {
        self.activity.get(&id).map_or(0, Activity::in_window)
    }

    /// Folds in the cumulative activity per id (`totals`, as read now; a total below the last
    /// one means the kernel entries were recreated, and counts whole) and the ids that have
    /// live processes, then retires and promotes.
    pub fn update(
        &mut self,
        now: Instant,
        totals: &BTreeMap<u32, u64>,
        live: &BTreeSet<u32>,
    ) -> Changes {
        let horizon = now.checked_sub(self.opts.window);
        for a in self.activity.values_mut() {
            a.delta = 0;
        }
        for (id, total) in totals {
            let a = self.activity.entry(*id).or_insert_with(|| Activity {
                last_total: 0,
                recent: VecDeque::new(),
                last_active: now,
                delta: 0,
            });
            let delta = if *total >= a.last_total {
                total - a.last_total
            } else {
                *total
            };
            a.last_total = *total;
            a.delta = delta;
            if delta > 0 {
                a.recent.push_back((now, delta));
                a.last_active = now;
            }
        }
        for a in self.activity.values_mut() {
            while a
                .recent
                .front()
                .is_some_and(|(t, _)| horizon.is_some_and(|h| *t <= h))
            {
                a.recent.pop_front();
            }
        }
        // Forget ids with nothing left to remember: no entry in the kernel, nothing in the
        // window, no slot.
        let holders = &self.holders;
        self.activity.retain(|id, a| {
            totals.contains_key(id) || !a.recent.is_empty() || holders.contains_key(id)
        });

        let mut changes = Changes::default();
        let activity = &self.activity;
        let opts = self.opts;
        self.holders.retain(|id, _| {
            let (delta, last_active) = activity
                .get(id)
                .map_or((0, None), |a| (a.delta, Some(a.last_active)));
            let gone = !live.contains(id) && delta == 0;
            let idle =
                last_active.is_none_or(|t| now.saturating_duration_since(t) >= opts.idle_retire);
            if gone || idle {
                changes.retired.push(*id);
                false
            } else {
                true
            }
        });

        let mut candidates: Vec<(u32, u64)> = self
            .activity
            .iter()
            .filter(|(id, a)| {
                **id != 0
                    && !self.pinned.contains(id)
                    && !self.holders.contains_key(id)
                    && !changes.retired.contains(id)
                    && live.contains(id)
                    // An idle name is no candidate, even with activity left in the window.
                    && now.saturating_duration_since(a.last_active) < self.opts.idle_retire
            })
            .map(|(id, a)| (*id, a.in_window()))
            .filter(|(_, n)| *n > 0)
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (id, n) in candidates {
            if self.holders.len() < self.opts.limit {
                self.holders.insert(id, now);
                changes.promoted.push(id);
                continue;
            }
            // The weakest holder that has had its slot for a window.
            let weakest = self
                .holders
                .iter()
                .filter(|(_, since)| now.saturating_duration_since(**since) >= self.opts.window)
                .map(|(h, _)| (*h, self.window_activity(*h)))
                .min_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
            match weakest {
                Some((h, hn)) if n > hn.saturating_mul(DISPLACE_FACTOR) => {
                    self.holders.remove(&h);
                    changes.retired.push(h);
                    self.holders.insert(id, now);
                    changes.promoted.push(id);
                }
                // Candidates come busiest first: if this one cannot displace, none can.
                _ => break,
            }
        }
        changes.promoted.sort_unstable();
        changes.retired.sort_unstable();
        changes
    }

    /// Ids whose kernel entries may be reclaimed: seen by the latest update, with no live
    /// process, no increase since the previous update and no slot.
    pub fn reclaimable(&self, live: &BTreeSet<u32>) -> BTreeSet<u32> {
        self.activity
            .iter()
            .filter(|(id, a)| {
                a.delta == 0
                    && a.last_total > 0
                    && !live.contains(id)
                    && !self.holders.contains_key(id)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// After the kernel entries behind part of an id's activity were deleted: `remaining` is
    /// what its total is made of now, so the next update sees no increase.
    pub fn rebase(&mut self, id: u32, remaining: u64) {
        if let Some(a) = self.activity.get_mut(&id) {
            a.last_total = remaining;
        }
    }
}

/// The policy and the accumulation together: what the probe keeps in host mode.
#[derive(Clone, Debug)]
pub struct HostLabels {
    pub policy: SlotPolicy,
    acc: Accumulator,
    updated: Option<Instant>,
    /// `"0"`, `"1"`, …: the per-id `service` values collectors export (see [`HostLabels::ids`]).
    ids: Vec<String>,
}

impl HostLabels {
    pub fn new(opts: LabelOptions, pinned: impl IntoIterator<Item = u32>) -> Self {
        Self {
            policy: SlotPolicy::new(opts, pinned),
            acc: Accumulator::default(),
            updated: None,
            ids: Vec::new(),
        }
    }

    /// Makes [`HostLabels::ids`] cover ids below `n`.
    pub fn grow_ids(&mut self, n: usize) {
        while self.ids.len() < n {
            self.ids.push(self.ids.len().to_string());
        }
    }

    /// The per-id label values, for the collectors' label function.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// When the last update ran (`None` before the first scrape).
    pub fn updated(&self) -> Option<Instant> {
        self.updated
    }

    /// One update: ranks ids by `activity` (cumulative per id), retires and promotes, and
    /// turns the per-id `families` into exported ones. `name` is an id's command name. Returns
    /// the families and the ids whose kernel entries may now be reclaimed.
    pub fn export<'a>(
        &mut self,
        now: Instant,
        families: Vec<MetricFamily>,
        activity: &BTreeMap<u32, u64>,
        live: &BTreeSet<u32>,
        name: impl Fn(u32) -> &'a str,
    ) -> (Vec<MetricFamily>, BTreeSet<u32>) {
        let changes = self.policy.update(now, activity, live);
        for id in &changes.retired {
            tracing::debug!("label {} retires", name(*id));
            self.acc.retire(name(*id));
        }
        for id in &changes.promoted {
            tracing::debug!("label {} gets a slot", name(*id));
            self.acc.restore(name(*id));
        }
        let policy = &self.policy;
        let families = self.acc.apply(families, |id| {
            if policy.keeps(id) {
                name(id).to_owned()
            } else {
                OTHER_LABEL.to_owned()
            }
        });
        self.updated = Some(now);
        (families, self.policy.reclaimable(live))
    }
}

/// A series' value, as far as accumulation is concerned.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Counter(f64),
    Histogram {
        count: u64,
        sum: f64,
        /// (upper bound, cumulative count)
        buckets: Vec<(f64, u64)>,
    },
}

impl Value {
    fn of(m: &Metric, kind: MetricType) -> Option<Self> {
        match kind {
            MetricType::COUNTER => Some(Self::Counter(m.get_counter().get_value())),
            MetricType::HISTOGRAM => {
                let h = m.get_histogram();
                Some(Self::Histogram {
                    count: h.get_sample_count(),
                    sum: h.get_sample_sum(),
                    buckets: h
                        .get_bucket()
                        .iter()
                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                        .collect(),
                })
            }
            _ => None,
        }
    }

    /// `self - prev`, or `self` when it is not an increase of `prev` (a recreated entry).
    fn increase_over(&self, prev: &Value) -> Value {
        match (self, prev) {
            (Self::Counter(now), Self::Counter(before)) if now >= before => {
                Self::Counter(now - before)
            }
            (
                Self::Histogram {
                    count,
                    sum,
                    buckets,
                },
                Self::Histogram {
                    count: c0,
                    sum: s0,
                    buckets: b0,
                },
            ) if count >= c0
                && buckets.len() == b0.len()
                && buckets
                    .iter()
                    .zip(b0)
                    .all(|((ub, n), (ub0, n0))| ub == ub0 && n >= n0) =>
            {
                Self::Histogram {
                    count: count - c0,
                    sum: (sum - s0).max(0.0),
                    buckets: buckets
                        .iter()
                        .zip(b0)
                        .map(|((ub, n), (_, n0))| (*ub, n - n0))
                        .collect(),
                }
            }
            _ => self.clone(),
        }
    }

    /// A counter's value, a histogram's observation count.
    fn observations(&self) -> f64 {
        match self {
            Self::Counter(v) => *v,
            Self::Histogram { count, .. } => *count as f64,
        }
    }

    fn add(&mut self, other: &Value) {
        match (self, other) {
            (Self::Counter(a), Self::Counter(b)) => *a += b,
            (
                Self::Histogram {
                    count,
                    sum,
                    buckets,
                },
                Self::Histogram {
                    count: c,
                    sum: s,
                    buckets: b,
                },
            ) => {
                *count += c;
                *sum += s;
                if buckets.len() == b.len() {
                    for ((_, n), (_, m)) in buckets.iter_mut().zip(b) {
                        *n += m;
                    }
                } else if buckets.is_empty() {
                    buckets.clone_from(b);
                }
            }
            _ => {}
        }
    }

    fn to_metric(&self, labels: &[(String, String)]) -> Metric {
        let mut m = Metric::default();
        m.set_label(labels.iter().map(|(k, v)| label_pair(k, v)).collect());
        match self {
            Self::Counter(v) => {
                let mut c = proto::Counter::default();
                c.set_value(*v);
                m.set_counter(c);
            }
            Self::Histogram {
                count,
                sum,
                buckets,
            } => {
                let mut h = proto::Histogram::default();
                h.set_sample_count(*count);
                h.set_sample_sum(*sum);
                h.set_bucket(
                    buckets
                        .iter()
                        .map(|(ub, n)| {
                            let mut b = proto::Bucket::default();
                            b.set_upper_bound(*ub);
                            b.set_cumulative_count(*n);
                            b
                        })
                        .collect(),
                );
                m.set_histogram(h);
            }
        }
        m
    }
}

/// A series: its family and its labels in exposition order.
type SeriesKey = (String, Vec<(String, String)>);

/// Exported totals per label, so labels can retire and come back without losing their past.
#[derive(Clone, Debug, Default)]
pub struct Accumulator {
    /// Raw (per-id) series → value at the previous update.
    prev: HashMap<SeriesKey, Value>,
    /// Exported label → its series' totals.
    totals: BTreeMap<String, BTreeMap<SeriesKey, Value>>,
    /// Retired labels' totals, oldest first.
    retired: VecDeque<(String, BTreeMap<SeriesKey, Value>)>,
    /// Family name → (help, type), for families whose series are all accumulated.
    meta: BTreeMap<String, (String, MetricType)>,
}

impl Accumulator {
    /// Turns per-id families (the `service` label holds the id in decimal) into exported ones:
    /// counters and histograms are accumulated per exported label, gauges summed per label,
    /// series without a `service` label passed through. `label` names an id's exported label.
    pub fn apply(
        &mut self,
        families: Vec<MetricFamily>,
        label: impl Fn(u32) -> String,
    ) -> Vec<MetricFamily> {
        let mut out = Vec::with_capacity(families.len());
        let mut seen: HashMap<SeriesKey, Value> = HashMap::with_capacity(self.prev.len());
        let mut gauges: BTreeMap<String, BTreeMap<Vec<(String, String)>, f64>> = BTreeMap::new();
        for mut family in families {
            let name = family.name().to_owned();
            let kind = family.get_field_type();
            let mut kept = Vec::new();
            for m in family.take_metric() {
                let labels: Vec<(String, String)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_owned(), l.value().to_owned()))
                    .collect();
                let Some(pos) = labels.iter().position(|(k, _)| k == "service") else {
                    kept.push(m);
                    continue;
                };
                let Some(id) = labels.get(pos).and_then(|(_, v)| v.parse::<u32>().ok()) else {
                    kept.push(m);
                    continue;
                };
                let mut exported = labels.clone();
                let to = label(id);
                if let Some(slot) = exported.get_mut(pos) {
                    slot.1.clone_from(&to);
                }
                self.meta
                    .entry(name.clone())
                    .or_insert_with(|| (family.help().to_owned(), kind));
                if kind == MetricType::GAUGE {
                    let v = m.get_gauge().get_value();
                    let slot = gauges.entry(name.clone()).or_default().entry(exported);
                    match LIMITS.iter().find(|(n, _)| *n == name) {
                        Some((_, smallest)) => {
                            let g = slot.or_insert(v);
                            *g = if *smallest { g.min(v) } else { g.max(v) };
                        }
                        None => *slot.or_insert(0.0) += v,
                    }
                    continue;
                }
                let Some(value) = Value::of(&m, kind) else {
                    kept.push(m);
                    continue;
                };
                let key = (name.clone(), labels);
                let increase = match self.prev.get(&key) {
                    Some(prev) => value.increase_over(prev),
                    None => value.clone(),
                };
                let total = self
                    .totals
                    .entry(to)
                    .or_default()
                    .entry((name.clone(), exported))
                    .or_insert_with(|| match &increase {
                        Value::Counter(_) => Value::Counter(0.0),
                        Value::Histogram { .. } => Value::Histogram {
                            count: 0,
                            sum: 0.0,
                            buckets: Vec::new(),
                        },
                    });
                total.add(&increase);
                seen.insert(key, value);
            }
            family.set_metric(kept);
            out.push(family);
        }
        // Raw series that vanished (their kernel entries were deleted) start again from zero.
        self.prev = seen;
        for (ratio, num, den) in RATIOS {
            let Some(g) = gauges.get_mut(*ratio) else {
                continue;
            };
            g.clear();
            for series in self.totals.values() {
                for ((family, labels), v) in series {
                    if family != num {
                        continue;
                    }
                    let key = ((*den).to_owned(), labels.clone());
                    let (Value::Counter(n), Some(d)) =
                        (v, series.get(&key).map(Value::observations))
                    else {
                        continue;
                    };
                    if d > 0.0 {
                        g.insert(labels.clone(), n / d);
                    }
                }
            }
        }

        let mut accumulated: BTreeMap<&str, Vec<Metric>> = BTreeMap::new();
        for series in self.totals.values() {
            for ((family, labels), value) in series {
                accumulated
                    .entry(family)
                    .or_default()
                    .push(value.to_metric(labels));
            }
        }
        for (family, series) in &gauges {
            for (labels, v) in series {
                let mut m = Metric::default();
                m.set_label(labels.iter().map(|(k, v)| label_pair(k, v)).collect());
                let mut g = proto::Gauge::default();
                g.set_value(*v);
                m.set_gauge(g);
                accumulated.entry(family).or_default().push(m);
            }
        }
        for (family, mut metrics) in accumulated {
            match out.iter_mut().find(|f| f.name() == family) {
                Some(f) => {
                    let mut all = f.take_metric();
                    all.append(&mut metrics);
                    f.set_metric(all);
                }
                None => {
                    if let Some((help, kind)) = self.meta.get(family) {
                        out.push(crate::metrics::family(family, help, *kind, metrics));
                    }
                }
            }
        }
        out
    }

    /// Stops exporting `label`'s series, keeping their totals in case it comes back.
    pub fn retire(&mut self, label: &str) {
        if let Some(series) = self.totals.remove(label) {
            self.retired.retain(|(l, _)| l != label);
            self.retired.push_back((label.to_owned(), series));
            while self.retired.len() > RETIRED_KEPT {
                self.retired.pop_front();
            }
        }
    }

    /// Exports `label` again, with its totals from before it retired.
    pub fn restore(&mut self, label: &str) {
        if let Some((l, series)) = self
            .retired
            .iter()
            .position(|(l, _)| l == label)
            .and_then(|i| self.retired.remove(i))
        {
            self.totals.insert(l, series);
        }
    }

    /// Exported labels.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.totals.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{counter, encode, family, gauge};

    fn ids(v: &[u32]) -> BTreeSet<u32> {
        v.iter().copied().collect()
    }

    fn opts(limit: usize) -> LabelOptions {
        LabelOptions {
            limit,
            window: Duration::from_secs(60),
            idle_retire: Duration::from_secs(300),
        }
    }

    #[test]
    fn busiest_live_names_take_free_slots() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(opts(2), [1]);
        let c = p.update(
            t0,
            &[(0, 500), (1, 1), (2, 10), (3, 30), (4, 20), (5, 99)].into(),
            &ids(&[0, 1, 2, 3, 4]),
        );
        assert_eq!(c.promoted, vec![3, 4], "two busiest; 5 is gone, 0 is other");
        assert!(p.keeps(1), "pinned");
        assert!(!p.keeps(2) && !p.keeps(0) && !p.keeps(5));
    }

    #[test]
    fn one_shot_commands_do_not_hold_slots() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(opts(1), []);
        // A short-lived command is live and busy at one update...
        p.update(t0, &[(7, 100)].into(), &ids(&[7]));
        assert!(p.keeps(7));
        // ...and gone, with nothing new, at the next: its slot is free at once.
        let c = p.update(t0 + Duration::from_secs(5), &[(7, 100)].into(), &ids(&[]));
        assert_eq!(c.retired, vec![7]);
        assert_eq!(p.reclaimable(&ids(&[])), ids(&[7]));
        // A name that was busy while gone (it exited after the last read) keeps it one update.
        p.update(t0 + Duration::from_secs(6), &[(8, 5)].into(), &ids(&[8]));
        let c = p.update(t0 + Duration::from_secs(7), &[(8, 9)].into(), &ids(&[]));
        assert!(c.retired.is_empty() && p.keeps(8));
        assert!(!p.reclaimable(&ids(&[])).contains(&8));
        p.update(t0 + Duration::from_secs(8), &[(8, 9)].into(), &ids(&[]));
        assert!(!p.keeps(8));
    }

    #[test]
    fn idle_labels_retire_after_the_configured_time() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(opts(5), []);
        p.update(t0, &[(3, 10)].into(), &ids(&[3]));
        p.update(t0 + Duration::from_secs(299), &[(3, 10)].into(), &ids(&[3]));
        assert!(p.keeps(3), "idle 299 s");
        let c = p.update(t0 + Duration::from_secs(300), &[(3, 10)].into(), &ids(&[3]));
        assert_eq!(c.retired, vec![3]);
        // Busy again: back at once (there is a free slot).
        let c = p.update(t0 + Duration::from_secs(301), &[(3, 11)].into(), &ids(&[3]));
        assert_eq!(c.promoted, vec![3]);
    }

    #[test]
    fn an_idle_name_is_not_promoted_again_by_its_old_activity() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(
            LabelOptions {
                idle_retire: Duration::from_secs(2),
                ..opts(5)
            },
            [],
        );
        p.update(t0, &[(3, 10)].into(), &ids(&[3]));
        let c = p.update(t0 + Duration::from_secs(2), &[(3, 10)].into(), &ids(&[3]));
        assert_eq!(c.retired, vec![3]);
        assert!(c.promoted.is_empty() && !p.keeps(3));
        p.update(t0 + Duration::from_secs(3), &[(3, 10)].into(), &ids(&[3]));
        assert!(!p.keeps(3), "still idle");
        let c = p.update(t0 + Duration::from_secs(4), &[(3, 11)].into(), &ids(&[3]));
        assert_eq!(c.promoted, vec![3], "busy again");
    }

    #[test]
    fn a_newly_busy_name_displaces_a_quiet_holder_within_a_window() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(opts(2), []);
        let live = ids(&[1, 2, 9]);
        // Slots taken by two daemons that stay a little active.
        p.update(t0, &[(1, 10), (2, 20)].into(), &live);
        let mut totals: BTreeMap<u32, u64> = [(1, 10), (2, 20), (9, 0)].into();
        let mut promoted_at = None;
        for s in 1..=90u64 {
            let now = t0 + Duration::from_secs(s);
            *totals.entry(1).or_default() += 1;
            *totals.entry(2).or_default() += 2;
            *totals.entry(9).or_default() += 1_000;
            let c = p.update(now, &totals, &live);
            if c.promoted.contains(&9) {
                promoted_at = Some(s);
                assert_eq!(c.retired, vec![1], "the quieter holder");
                break;
            }
        }
        assert_eq!(promoted_at, Some(60), "once the holders had a window");
        assert!(p.keeps(9) && p.keeps(2) && !p.keeps(1));
    }

    #[test]
    fn recreated_kernel_entries_count_whole() {
        let t0 = Instant::now();
        let mut p = SlotPolicy::new(opts(1), []);
        p.update(t0, &[(4, 100)].into(), &ids(&[4]));
        p.update(t0 + Duration::from_secs(1), &[(4, 30)].into(), &ids(&[4]));
        assert_eq!(p.window_activity(4), 130);
        p.rebase(4, 10);
        p.update(t0 + Duration::from_secs(2), &[(4, 10)].into(), &ids(&[4]));
        assert_eq!(p.window_activity(4), 130, "no increase after rebase");
    }

    fn one(name: &str, service: &str, v: f64) -> MetricFamily {
        family(
            name,
            "h",
            MetricType::COUNTER,
            vec![counter(&[("service", service), ("x", "y")], v)],
        )
    }

    fn value(fams: &[MetricFamily], service: &str) -> Option<f64> {
        let text = encode(fams);
        text.lines()
            .find(|l| l.starts_with(&format!("c_total{{service=\"{service}\",")))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
    }

    #[test]
    fn counters_never_go_backwards_across_promotion_and_retirement() {
        let mut acc = Accumulator::default();
        let names = |keep: bool| {
            move |id: u32| {
                if keep && id == 5 {
                    "five".to_owned()
                } else {
                    "other".to_owned()
                }
            }
        };
        // Id 5 counted under other first.
        let f = acc.apply(vec![one("c_total", "5", 10.0)], names(false));
        assert_eq!(value(&f, "other"), Some(10.0));
        // Promoted: its later increase goes to its own label; other keeps what it had.
        let f = acc.apply(vec![one("c_total", "5", 15.0)], names(true));
        assert_eq!(value(&f, "other"), Some(10.0));
        assert_eq!(value(&f, "five"), Some(5.0));
        // Retired: the series stops; later counts go to other.
        acc.retire("five");
        let f = acc.apply(vec![one("c_total", "5", 18.0)], names(false));
        assert_eq!(value(&f, "five"), None);
        assert_eq!(value(&f, "other"), Some(13.0));
        // The kernel entry is reclaimed (gone from the read) and recreated from zero.
        let f = acc.apply(vec![], names(false));
        assert_eq!(
            value(&f, "other"),
            Some(13.0),
            "kept when the raw series vanished"
        );
        // Back: continues where it stopped.
        acc.restore("five");
        let f = acc.apply(vec![one("c_total", "5", 4.0)], names(true));
        assert_eq!(value(&f, "five"), Some(9.0));
        assert_eq!(value(&f, "other"), Some(13.0));
    }

    #[test]
    fn ratios_are_computed_from_the_labels_totals() {
        let mut acc = Accumulator::default();
        let fams = |id: &str, samples: f64, truncated: f64| {
            vec![
                family(
                    "ws1_probe_profile_samples_total",
                    "h",
                    MetricType::COUNTER,
                    vec![counter(&[("service", id)], samples)],
                ),
                family(
                    "ws1_probe_profile_truncated_samples_total",
                    "h",
                    MetricType::COUNTER,
                    vec![counter(&[("service", id)], truncated)],
                ),
                family(
                    "ws1_probe_profile_truncated_stack_ratio",
                    "h",
                    MetricType::GAUGE,
                    vec![gauge(&[("service", id)], truncated / samples)],
                ),
            ]
        };
        let mut all = fams("1", 10.0, 10.0);
        for (i, f) in fams("2", 30.0, 0.0).into_iter().enumerate() {
            all[i].mut_metric().extend(f.get_metric().iter().cloned());
        }
        let text = encode(&acc.apply(all, |_| "other".to_owned()));
        assert!(
            text.contains("ws1_probe_profile_truncated_stack_ratio{service=\"other\"} 0.25"),
            "{text}"
        );
    }

    #[test]
    fn profile_ratios_stay_per_runtime_when_ids_fold() {
        use crate::profile::{runtime::Runtime, windows::Totals};
        let t = |samples, truncated| Totals { samples, truncated };
        // Ids 1 and 2 fold into `other`; each runtime keeps its own series and ratio.
        let totals = std::collections::BTreeMap::from([
            ((1, Runtime::Go), t(10, 10)),
            ((2, Runtime::Go), t(30, 0)),
            ((2, Runtime::Native), t(20, 5)),
        ]);
        let ids = ["0", "1", "2"];
        let fams = crate::metrics::profile::families(&totals, 0, |id| ids[id as usize]);
        let text = encode(&Accumulator::default().apply(fams, |_| "other".to_owned()));
        for line in [
            "ws1_probe_profile_samples_total{service=\"other\",runtime=\"go\"} 40",
            "ws1_probe_profile_truncated_samples_total{service=\"other\",runtime=\"go\"} 10",
            "ws1_probe_profile_truncated_stack_ratio{service=\"other\",runtime=\"go\"} 0.25",
            "ws1_probe_profile_truncated_stack_ratio{service=\"other\",runtime=\"native\"} 0.25",
            "ws1_probe_profile_samples_total{service=\"other\",runtime=\"native\"} 20",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn histograms_accumulate_and_gauges_sum() {
        use crate::{histogram::Histogram, metrics::histogram};
        let bounds = [1_000u64, 1_000_000];
        let mut h = Histogram::default();
        h.observe(&bounds, 500);
        let mut acc = Accumulator::default();
        let fams = |h: &Histogram| {
            vec![
                family(
                    "d_seconds",
                    "h",
                    MetricType::HISTOGRAM,
                    vec![histogram(&[("service", "3")], h, &bounds)],
                ),
                family(
                    "g",
                    "h",
                    MetricType::GAUGE,
                    vec![
                        gauge(&[("service", "3")], 2.0),
                        gauge(&[("service", "4")], 3.0),
                    ],
                ),
                family("up", "h", MetricType::GAUGE, vec![gauge(&[], 1.0)]),
            ]
        };
        acc.apply(fams(&h), |_| "other".to_owned());
        h.observe(&bounds, 5_000);
        let text = encode(&acc.apply(fams(&h), |_| "other".to_owned()));
        for line in [
            "d_seconds_bucket{service=\"other\",le=\"0.000001\"} 1",
            "d_seconds_bucket{service=\"other\",le=\"0.001\"} 2",
            "d_seconds_count{service=\"other\"} 2",
            "g{service=\"other\"} 5",
            "up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn limits_fold_to_the_smallest_or_largest() {
        let mut acc = Accumulator::default();
        let fams = vec![
            family(
                "ws1_probe_service_fd_limit",
                "h",
                MetricType::GAUGE,
                vec![
                    gauge(&[("service", "3")], 1024.0),
                    gauge(&[("service", "4")], 512.0),
                ],
            ),
            family(
                "ws1_probe_service_memory_limit_bytes",
                "h",
                MetricType::GAUGE,
                vec![
                    gauge(&[("service", "3")], 100.0),
                    gauge(&[("service", "4")], 300.0),
                ],
            ),
        ];
        let text = encode(&acc.apply(fams, |_| "other".to_owned()));
        for line in [
            "ws1_probe_service_fd_limit{service=\"other\"} 512",
            "ws1_probe_service_memory_limit_bytes{service=\"other\"} 300",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
