//! A `metrics` recorder that counts: every counter the crate increments,
//! by name and labels, readable as totals. Gauges and histograms go nowhere.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

/// Counter totals by name and labels.
#[derive(Default, Clone)]
pub struct Counted {
    counters: Arc<Mutex<HashMap<Key, Arc<AtomicU64>>>>,
}

impl Counted {
    /// A recorder installed as the process's global one (before any
    /// Balancer, so that their counters register here).
    pub fn install() -> Self {
        let counted = Self::default();
        metrics::set_global_recorder(counted.clone()).expect("the only recorder");
        counted
    }

    /// The sum of counter `name` over its series, or over those with the
    /// label `label` when given.
    pub fn total(&self, name: &str, label: Option<(&str, &str)>) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters
            .iter()
            .filter(|(k, _)| k.name() == name)
            .filter(|(k, _)| {
                label.is_none_or(|(l, v)| k.labels().any(|x| x.key() == l && x.value() == v))
            })
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
}

impl metrics::Recorder for Counted {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        Counter::from_arc(counters.entry(key.clone()).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}
