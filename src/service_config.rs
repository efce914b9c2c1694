//! gRPC's service config, the parts a client balancer uses: per-method
//! `timeout`, `waitForReady`, `retryPolicy` and `hedgingPolicy`,
//! `retryThrottling` (gRFC A6), and `loadBalancingConfig`, whose first
//! policy this crate knows is used, as in gRPC ([`LoadBalancing`]: the
//! cost-weighted pick, or ring hash as gRFC A42/A76 with bounded load).
//!
//! Parsed from and written to the standard JSON, and validated whole, as
//! A6 says: a config with one invalid field is refused with an error that
//! names the field and the value, never half applied. As in grpc-go (whose
//! JSON decoding ignores the case of field names), `MaxAttempts` reads as
//! `maxAttempts`; unknown fields are ignored (and named, with the field
//! meant, by [`unknown_fields`]); status codes are names
//! (`"UNAVAILABLE"`) or numbers (`14`); durations are proto3 JSON
//! (`"0.25s"`, `".1s"`, `"2s"`).
//!
//! ```
//! let config = tonic_etcd::ServiceConfig::from_json(r#"{
//!   "methodConfig": [{
//!     "name": [{"service": "inventory.v1.Inventory", "method": "Get"}],
//!     "timeout": "0.5s",
//!     "retryPolicy": {
//!       "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
//!       "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
//!     }
//!   }]
//! }"#)?;
//! let get = config.method("/inventory.v1.Inventory/Get").expect("configured");
//! assert_eq!(get.timeout, Some(std::time::Duration::from_millis(500)));
//! # Ok::<(), tonic_etcd::Error>(())
//! ```
//!
//! A method's config is found as gRPC finds it: the entry naming the
//! service and method, else the one naming the service, else the default
//! (a name with neither).
//!
//! The [`Balancer`](crate::Balancer) applies all of it (see its module
//! docs, *Retries* and *Ring hash*).

pub(crate) mod lint;

use std::time::Duration;

use serde_json::{Map, Value};

pub use lint::{unknown_fields, UnknownField};
use tonic::Code;

use crate::Error;

/// A validated service config. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    /// Per-method settings, in the order given.
    pub method_configs: Vec<MethodConfig>,
    /// Throttling of retries and hedges (A6).
    pub retry_throttling: Option<RetryThrottling>,
    /// `loadBalancingConfig` as given (a JSON array).
    pub load_balancing_config: Option<Value>,
    /// The policy `loadBalancingConfig` selects (its first entry this crate
    /// knows, as in gRPC); the cost-weighted pick without one.
    pub load_balancing: LoadBalancing,
    /// Under ring hash, the header hashed (`requestHashHeader`); without
    /// one (or when a request lacks it) each call hashes at random.
    pub hash_header: HashHeader,
    /// Connecting to a subset of the instances only (gRFC A68's
    /// `random_subsetting_experimental`, or
    /// `tonic_etcd_coordinated_subsetting`), with `load_balancing` as the
    /// child policy within the subset.
    pub subsetting: Option<Subsetting>,
}

/// Each client connects to `size` of the instances only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subsetting {
    /// How the subset is chosen.
    pub scheme: SubsetScheme,
    /// `subsetSize`: instances per client.
    pub size: u32,
}

/// How a client's subset is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubsetScheme {
    /// gRFC A68 (`random_subsetting_experimental`): the instances whose
    /// addresses hash lowest with a seed of the client's own.
    Random,
    /// `tonic_etcd_coordinated_subsetting`: clients register in etcd and
    /// take deterministic subsets by their rank among each other (the SRE
    /// book's deterministic subsetting), so every instance gets the same
    /// number of clients; random while etcd cannot tell.
    Coordinated,
}

/// How a balancer picks an endpoint, from `loadBalancingConfig`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub enum LoadBalancing {
    /// The [`Balancer`](crate::Balancer)'s own cost-weighted pick (see its
    /// module docs). `tonic_etcd_cost_weighted` names it; gRPC's
    /// `round_robin`, `least_request_experimental` and `pick_first` select
    /// it too, so that a config shared with Go clients is not refused: it
    /// spreads calls at least as well as they do.
    #[default]
    CostWeighted,
    /// gRPC's weighted round robin (gRFC A58): endpoints weighted by what
    /// their servers report of their own load (ORCA, gRFC A51), each
    /// getting calls in proportion to `qps / (utilization + error rate ×
    /// penalty)`. `weighted_round_robin`: from each response's report, or
    /// with `enableOobLoadReport` from one stream per connection.
    WeightedRoundRobin(WeightedRoundRobinConfig),
    /// Consistent hashing of a request header (gRFC A42/A76), with optional
    /// bounded load. `ring_hash_experimental` (or `ring_hash`).
    RingHash(RingHashConfig),
}

/// `weighted_round_robin`'s settings (gRFC A58, with its defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedRoundRobinConfig {
    /// `enableOobLoadReport`: weights from the servers' out-of-band stream
    /// instead of each response's trailer (default false).
    pub enable_oob_load_report: bool,
    /// `oobReportingPeriod`: how often the out-of-band stream reports
    /// (default 10 s).
    pub oob_reporting_period: Duration,
    /// `blackoutPeriod`: how long an endpoint must have reported before its
    /// weight counts (default 10 s).
    pub blackout_period: Duration,
    /// `weightExpirationPeriod`: how long a weight counts without a new
    /// report (default 3 min).
    pub weight_expiration_period: Duration,
    /// `weightUpdatePeriod`: how often the weights are taken anew (default
    /// 1 s, at least 100 ms).
    pub weight_update_period: Duration,
    /// `errorUtilizationPenalty`: how much errors count as utilization
    /// (default 1, at least 0).
    pub error_utilization_penalty: f64,
}

impl Default for WeightedRoundRobinConfig {
    fn default() -> Self {
        Self {
            enable_oob_load_report: false,
            oob_reporting_period: Duration::from_secs(10),
            blackout_period: Duration::from_secs(10),
            weight_expiration_period: Duration::from_secs(180),
            weight_update_period: Duration::from_secs(1),
            error_utilization_penalty: 1.0,
        }
    }
}

/// `ring_hash_experimental`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHashConfig {
    /// `minRingSize`: the fewest ring entries (default 1,024).
    pub min_ring_size: u32,
    /// `maxRingSize`: the most ring entries (default 4,096; at most
    /// 8,388,608).
    pub max_ring_size: u32,
    /// `hashBalanceFactor` (beyond A42, as Envoy's `hash_balance_factor`):
    /// with `Some(c)`, an endpoint with more calls in flight than
    /// `c` % of the average (+1) is passed over. At least 100.
    pub hash_balance_factor: Option<u32>,
}

/// The request header whose value is hashed under ring hash (A76's
/// `requestHashHeader`), kept apart from [`RingHashConfig`] so that the
/// latter stays `Copy`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HashHeader(pub Option<http::HeaderName>);

impl RingHashConfig {
    /// A42's defaults.
    pub const DEFAULT: Self = Self {
        min_ring_size: 1_024,
        max_ring_size: 4_096,
        hash_balance_factor: None,
    };
    /// A42's cap on either size.
    pub const MAX_RING_SIZE: u32 = 8_388_608;
}

/// Settings for the methods it names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MethodConfig {
    /// The methods these settings are for.
    pub names: Vec<MethodName>,
    /// The deadline of a call that sets none, and a cap on those that do.
    pub timeout: Option<Duration>,
    /// With no endpoint in rotation, wait for one (until the deadline)
    /// instead of failing fast.
    pub wait_for_ready: Option<bool>,
    /// A retry or a hedging policy (at most one).
    pub policy: Option<Policy>,
}

/// Which methods a [`MethodConfig`] is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MethodName {
    /// The fully qualified service (`inventory.v1.Inventory`); `None`: every
    /// service (then `method` is `None` too).
    pub service: Option<String>,
    /// The method (`Get`); `None`: every method of the service.
    pub method: Option<String>,
}

/// What is done when an attempt fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// Retry after a back-off.
    Retry(RetryPolicy),
    /// Send further attempts after a delay, without waiting for failures.
    Hedging(HedgingPolicy),
}

/// gRFC A6's `retryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: at least 2. gRPC treats more
    /// than 5 as 5 unless the client raises its cap.
    pub max_attempts: u32,
    /// The first back-off (above zero).
    pub initial_backoff: Duration,
    /// The largest back-off (above zero).
    pub max_backoff: Duration,
    /// Growth of the back-off per attempt (above zero).
    pub backoff_multiplier: f64,
    /// Codes that are retried (not empty).
    pub retryable_status_codes: Vec<Code>,
}

/// gRFC A6's `hedgingPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    /// Attempts in all, the first included: at least 2 (more than 5 are
    /// treated as 5, as for retries).
    pub max_attempts: u32,
    /// Between one attempt and the next (0: all at once).
    pub hedging_delay: Duration,
    /// Codes after which the other attempts go on; any other code ends the
    /// call.
    pub non_fatal_status_codes: Vec<Code>,
}

/// gRFC A6's `retryThrottling`: tokens start at `max_tokens`, a failure
/// takes one, a success gives back `token_ratio`; retries and hedges stop
/// while the tokens are at or below half of `max_tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryThrottling {
    /// Above 0, at most 1,000.
    pub max_tokens: f64,
    /// Above 0; up to 3 decimal places count.
    pub token_ratio: f64,
}

impl ServiceConfig {
    /// Parses and validates a service config in gRPC's JSON form.
    pub fn from_json(json: &str) -> Result<Self, Error> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| invalid("", format!("not JSON: {e}")))?;
        Self::from_value(&value)
    }

    /// Parses and validates a service config already read as JSON.
    pub fn from_value(value: &Value) -> Result<Self, Error> {
        let obj = object(value, "")?;
        let mut config = ServiceConfig::default();
        if let Some(list) = field(obj, "methodConfig") {
            let list = array(list, "methodConfig")?;
            let mut seen = std::collections::HashSet::new();
            for (i, mc) in list.iter().enumerate() {
                let at = format!("methodConfig[{i}]");
                let mc = method_config(mc, &at)?;
                for (k, name) in mc.names.iter().enumerate() {
                    if !seen.insert(name.clone()) {
                        return Err(invalid(
                            &format!("{at}.name[{k}]"),
                            format!("{} is named by an earlier methodConfig too", show(name)),
                        ));
                    }
                }
                config.method_configs.push(mc);
            }
        }
        if let Some(t) = field(obj, "retryThrottling") {
            config.retry_throttling = Some(throttling(t, "retryThrottling")?);
        }
        if let Some(lb) = field(obj, "loadBalancingConfig") {
            let chosen = load_balancing(lb, "loadBalancingConfig", true)?;
            config.load_balancing = chosen.policy;
            config.hash_header = chosen.header;
            config.subsetting = chosen.subsetting;
            config.load_balancing_config = Some(lb.clone());
        }
        Ok(config)
    }

    /// The config in gRPC's JSON form (fields as gRPC names them).
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The config as a JSON value.
    pub fn to_value(&self) -> Value {
        let mut obj = Map::new();
        if !self.method_configs.is_empty() {
            let list = self.method_configs.iter().map(MethodConfig::to_value);
            obj.insert("methodConfig".into(), Value::Array(list.collect()));
        }
        if let Some(t) = &self.retry_throttling {
            obj.insert(
                "retryThrottling".into(),
                serde_json::json!({"maxTokens": t.max_tokens, "tokenRatio": t.token_ratio}),
            );
        }
        if let Some(lb) = &self.load_balancing_config {
            obj.insert("loadBalancingConfig".into(), lb.clone());
        }
        Value::Object(obj)
    }

    /// The settings for the method at `path` (`/pkg.Service/Method`): the
    /// entry naming it, else its service's, else the default.
    pub fn method(&self, path: &str) -> Option<&MethodConfig> {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let find = |f: &dyn Fn(&MethodName) -> bool| {
            self.method_configs.iter().find(|mc| mc.names.iter().any(f))
        };
        find(&|n| n.service.as_deref() == Some(service) && n.method.as_deref() == Some(method))
            .or_else(|| find(&|n| n.service.as_deref() == Some(service) && n.method.is_none()))
            .or_else(|| find(&|n| n.service.is_none()))
    }
}

impl std::str::FromStr for ServiceConfig {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_json(s)
    }
}

impl MethodConfig {
    fn to_value(&self) -> Value {
        let mut obj = Map::new();
        let names = self.names.iter().map(|n| {
            let mut o = Map::new();
            if let Some(s) = &n.service {
                o.insert("service".into(), s.clone().into());
            }
            if let Some(m) = &n.method {
                o.insert("method".into(), m.clone().into());
            }
            Value::Object(o)
        });
        obj.insert("name".into(), Value::Array(names.collect()));
        if let Some(t) = self.timeout {
            obj.insert("timeout".into(), duration_json(t).into());
        }
        if let Some(w) = self.wait_for_ready {
            obj.insert("waitForReady".into(), w.into());
        }
        match &self.policy {
            Some(Policy::Retry(r)) => {
                obj.insert(
                    "retryPolicy".into(),
                    serde_json::json!({
                        "maxAttempts": r.max_attempts,
                        "initialBackoff": duration_json(r.initial_backoff),
                        "maxBackoff": duration_json(r.max_backoff),
                        "backoffMultiplier": r.backoff_multiplier,
                        "retryableStatusCodes": codes_json(&r.retryable_status_codes),
                    }),
                );
            }
            Some(Policy::Hedging(h)) => {
                obj.insert(
                    "hedgingPolicy".into(),
                    serde_json::json!({
                        "maxAttempts": h.max_attempts,
                        "hedgingDelay": duration_json(h.hedging_delay),
                        "nonFatalStatusCodes": codes_json(&h.non_fatal_status_codes),
                    }),
                );
            }
            None => {}
        }
        Value::Object(obj)
    }
}

fn method_config(value: &Value, at: &str) -> Result<MethodConfig, Error> {
    let obj = object(value, at)?;
    let mut mc = MethodConfig::default();
    let names_at = format!("{at}.name");
    let names = field(obj, "name").ok_or_else(|| invalid(&names_at, "is required".into()))?;
    for (k, n) in array(names, &names_at)?.iter().enumerate() {
        let n_at = format!("{names_at}[{k}]");
        let o = object(n, &n_at)?;
        let service = opt_string(o, "service", &n_at)?.filter(|s| !s.is_empty());
        let method = opt_string(o, "method", &n_at)?.filter(|s| !s.is_empty());
        if service.is_none() && method.is_some() {
            return Err(invalid(
                &format!("{n_at}.method"),
                format!(
                    "{:?} names a method without a service",
                    method.unwrap_or_default()
                ),
            ));
        }
        mc.names.push(MethodName { service, method });
    }
    if mc.names.is_empty() {
        return Err(invalid(&names_at, "must name at least one method".into()));
    }
    if let Some(t) = field(obj, "timeout") {
        mc.timeout = Some(duration(t, &format!("{at}.timeout"))?);
    }
    if let Some(w) = field(obj, "waitForReady") {
        mc.wait_for_ready = Some(w.as_bool().ok_or_else(|| {
            invalid(
                &format!("{at}.waitForReady"),
                format!("{w} is not true or false"),
            )
        })?);
    }
    let retry = field(obj, "retryPolicy");
    let hedging = field(obj, "hedgingPolicy");
    mc.policy = match (retry, hedging) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                at,
                "sets both retryPolicy and hedgingPolicy; at most one may be set".into(),
            ))
        }
        (Some(r), None) => Some(Policy::Retry(retry_policy(
            r,
            &format!("{at}.retryPolicy"),
        )?)),
        (None, Some(h)) => Some(Policy::Hedging(hedging_policy(
            h,
            &format!("{at}.hedgingPolicy"),
        )?)),
        (None, None) => None,
    };
    Ok(mc)
}

fn retry_policy(value: &Value, at: &str) -> Result<RetryPolicy, Error> {
    let obj = object(value, at)?;
    let policy = RetryPolicy {
        max_attempts: max_attempts(obj, at)?,
        initial_backoff: positive_duration(obj, "initialBackoff", at)?,
        max_backoff: positive_duration(obj, "maxBackoff", at)?,
        backoff_multiplier: {
            let f_at = format!("{at}.backoffMultiplier");
            let v = field(obj, "backoffMultiplier")
                .ok_or_else(|| invalid(&f_at, "is required".into()))?;
            match v.as_f64() {
                Some(m) if m > 0.0 && m.is_finite() => m,
                _ => return Err(invalid(&f_at, format!("{v} is not a number above 0"))),
            }
        },
        retryable_status_codes: codes(obj, "retryableStatusCodes", at, true)?,
    };
    Ok(policy)
}

/// What `loadBalancingConfig` selects.
struct Chosen {
    policy: LoadBalancing,
    header: HashHeader,
    subsetting: Option<Subsetting>,
}

/// The names [`load_balancing`] knows, for its error message.
const KNOWN_POLICIES: &str = "random_subsetting_experimental, tonic_etcd_coordinated_subsetting, \
     ring_hash_experimental, tonic_etcd_cost_weighted, round_robin, weighted_round_robin, \
     least_request_experimental, pick_first";

/// The first policy of `loadBalancingConfig` this crate knows (a
/// subsetting policy only at the top: `outer`).
fn load_balancing(value: &Value, at: &str, outer: bool) -> Result<Chosen, Error> {
    let list = array(value, at)?;
    let mut names = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let e_at = format!("{at}[{i}]");
        let obj = object(entry, &e_at)?;
        let mut fields = obj.iter();
        let (Some((name, config)), None) = (fields.next(), fields.next()) else {
            return Err(invalid(
                &e_at,
                format!(
                    "{} must have exactly one field, the policy's name",
                    brief(entry)
                ),
            ));
        };
        let p_at = format!("{e_at}.{name}");
        let plain = |policy| Chosen {
            policy,
            header: HashHeader::default(),
            subsetting: None,
        };
        match name.as_str() {
            "random_subsetting_experimental" | "tonic_etcd_coordinated_subsetting" if outer => {
                let scheme = if name == "random_subsetting_experimental" {
                    SubsetScheme::Random
                } else {
                    SubsetScheme::Coordinated
                };
                return subsetting(config, &p_at, scheme);
            }
            "ring_hash_experimental" | "ring_hash" => {
                let (policy, header) = ring_hash(config, &p_at)?;
                return Ok(Chosen {
                    policy,
                    header,
                    subsetting: None,
                });
            }
            "weighted_round_robin" => {
                return Ok(plain(weighted_round_robin(config, &p_at)?));
            }
            "tonic_etcd_cost_weighted"
            | "round_robin"
            | "least_request_experimental"
            | "pick_first" => {
                object(config, &p_at)?;
                return Ok(plain(LoadBalancing::CostWeighted));
            }
            other => names.push(other.to_owned()),
        }
    }
    Err(invalid(
        at,
        format!("names no policy this client knows ({names:?}; known: {KNOWN_POLICIES})"),
    ))
}

fn subsetting(value: &Value, at: &str, scheme: SubsetScheme) -> Result<Chosen, Error> {
    let obj = object(value, at)?;
    let s_at = format!("{at}.subsetSize");
    let size = field(obj, "subsetSize").ok_or_else(|| invalid(&s_at, "is required".into()))?;
    let size = size
        .as_u64()
        .filter(|n| *n >= 1)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(&s_at, format!("{size} is not a whole number of at least 1")))?;
    let c_at = format!("{at}.childPolicy");
    let child = field(obj, "childPolicy").ok_or_else(|| invalid(&c_at, "is required".into()))?;
    let child = load_balancing(child, &c_at, false)?;
    Ok(Chosen {
        subsetting: Some(Subsetting { scheme, size }),
        ..child
    })
}

fn weighted_round_robin(value: &Value, at: &str) -> Result<LoadBalancing, Error> {
    let obj = object(value, at)?;
    let mut c = WeightedRoundRobinConfig::default();
    if let Some(v) = field(obj, "enableOobLoadReport") {
        c.enable_oob_load_report = v.as_bool().ok_or_else(|| {
            invalid(
                &format!("{at}.enableOobLoadReport"),
                format!("{v} is not true or false"),
            )
        })?;
    }
    for (name, slot) in [
        ("oobReportingPeriod", &mut c.oob_reporting_period),
        ("blackoutPeriod", &mut c.blackout_period),
        ("weightExpirationPeriod", &mut c.weight_expiration_period),
        ("weightUpdatePeriod", &mut c.weight_update_period),
    ] {
        if let Some(v) = field(obj, name) {
            *slot = duration(v, &format!("{at}.{name}"))?;
        }
    }
    // As grpc-go: shorter update periods are raised to 100 ms.
    c.weight_update_period = c.weight_update_period.max(Duration::from_millis(100));
    if let Some(v) = field(obj, "errorUtilizationPenalty") {
        c.error_utilization_penalty = v
            .as_f64()
            .filter(|p| *p >= 0.0 && p.is_finite())
            .ok_or_else(|| {
                invalid(
                    &format!("{at}.errorUtilizationPenalty"),
                    format!("{v} is not a number of at least 0"),
                )
            })?;
    }
    Ok(LoadBalancing::WeightedRoundRobin(c))
}

fn ring_hash(value: &Value, at: &str) -> Result<(LoadBalancing, HashHeader), Error> {
    let obj = object(value, at)?;
    let size = |name: &str, default: u32| -> Result<u32, Error> {
        let Some(v) = field(obj, name) else {
            return Ok(default);
        };
        v.as_u64()
            .filter(|n| (1..=u64::from(RingHashConfig::MAX_RING_SIZE)).contains(n))
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                invalid(
                    &format!("{at}.{name}"),
                    format!("{v} is not a whole number from 1 to 8388608"),
                )
            })
    };
    let min_ring_size = size("minRingSize", RingHashConfig::DEFAULT.min_ring_size)?;
    let max_ring_size = size("maxRingSize", RingHashConfig::DEFAULT.max_ring_size)?;
    if min_ring_size > max_ring_size {
        return Err(invalid(
            &format!("{at}.minRingSize"),
            format!("{min_ring_size} is above maxRingSize {max_ring_size}"),
        ));
    }
    let hash_balance_factor = match field(obj, "hashBalanceFactor") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n >= 100)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    invalid(
                        &format!("{at}.hashBalanceFactor"),
                        format!("{v} is not a whole percentage of at least 100"),
                    )
                })?,
        ),
    };
    let header = match opt_string(obj, "requestHashHeader", at)? {
        None => None,
        Some(h) if h.is_empty() => None,
        Some(h) => {
            let h_at = format!("{at}.requestHashHeader");
            let name = http::HeaderName::try_from(h.to_ascii_lowercase())
                .map_err(|_| invalid(&h_at, format!("{h:?} is not a header name")))?;
            if name.as_str().ends_with("-bin") {
                return Err(invalid(
                    &h_at,
                    format!("{h:?} is a binary header, which A76 does not hash"),
                ));
            }
            Some(name)
        }
    };
    Ok((
        LoadBalancing::RingHash(RingHashConfig {
            min_ring_size,
            max_ring_size,
            hash_balance_factor,
        }),
        HashHeader(header),
    ))
}

fn hedging_policy(value: &Value, at: &str) -> Result<HedgingPolicy, Error> {
    let obj = object(value, at)?;
    Ok(HedgingPolicy {
        max_attempts: max_attempts(obj, at)?,
        hedging_delay: match field(obj, "hedgingDelay") {
            Some(d) => duration(d, &format!("{at}.hedgingDelay"))?,
            None => Duration::ZERO,
        },
        non_fatal_status_codes: codes(obj, "nonFatalStatusCodes", at, false)?,
    })
}

fn throttling(value: &Value, at: &str) -> Result<RetryThrottling, Error> {
    let obj = object(value, at)?;
    let number = |name: &str| -> Result<f64, Error> {
        let f_at = format!("{at}.{name}");
        let v = field(obj, name).ok_or_else(|| invalid(&f_at, "is required".into()))?;
        match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(invalid(&f_at, format!("{v} is not a number above 0"))),
        }
    };
    let max_tokens = number("maxTokens")?;
    if max_tokens > 1000.0 {
        return Err(invalid(
            &format!("{at}.maxTokens"),
            format!("{max_tokens} is above the maximum of 1000"),
        ));
    }
    // A6: up to 3 decimal places are supported.
    let token_ratio = (number("tokenRatio")? * 1000.0).trunc() / 1000.0;
    if token_ratio <= 0.0 {
        return Err(invalid(
            &format!("{at}.tokenRatio"),
            "is 0 to three decimal places".into(),
        ));
    }
    Ok(RetryThrottling {
        max_tokens,
        token_ratio,
    })
}

fn max_attempts(obj: &Map<String, Value>, at: &str) -> Result<u32, Error> {
    let f_at = format!("{at}.maxAttempts");
    let v = field(obj, "maxAttempts").ok_or_else(|| invalid(&f_at, "is required".into()))?;
    match v.as_u64() {
        Some(n) if n >= 2 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => Err(invalid(
            &f_at,
            format!("{v} is not an integer of at least 2"),
        )),
    }
}

fn positive_duration(obj: &Map<String, Value>, name: &str, at: &str) -> Result<Duration, Error> {
    let f_at = format!("{at}.{name}");
    let v = field(obj, name).ok_or_else(|| invalid(&f_at, "is required".into()))?;
    let d = duration(v, &f_at)?;
    if d.is_zero() {
        return Err(invalid(&f_at, format!("{v} is not above zero")));
    }
    Ok(d)
}

fn codes(
    obj: &Map<String, Value>,
    name: &str,
    at: &str,
    required: bool,
) -> Result<Vec<Code>, Error> {
    let f_at = format!("{at}.{name}");
    let Some(v) = field(obj, name) else {
        return if required {
            Err(invalid(&f_at, "is required".into()))
        } else {
            Ok(Vec::new())
        };
    };
    let list = array(v, &f_at)?;
    if required && list.is_empty() {
        return Err(invalid(&f_at, "must not be empty".into()));
    }
    let mut out = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let code = code(c).ok_or_else(|| {
            invalid(
                &format!("{f_at}[{i}]"),
                format!("{c} is not a gRPC status code"),
            )
        })?;
        if code == Code::Ok {
            return Err(invalid(
                &format!("{f_at}[{i}]"),
                "OK is not a failure".into(),
            ));
        }
        if !out.contains(&code) {
            out.push(code);
        }
    }
    Ok(out)
}

/// The gRPC status code names, by number.
pub(crate) const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A status code given by name (any case) or number.
fn code(value: &Value) -> Option<Code> {
    let n = match value {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => CODE_NAMES
            .iter()
            .position(|name| name.eq_ignore_ascii_case(s.trim()))?
            as u64,
        _ => return None,
    };
    (n < CODE_NAMES.len() as u64).then(|| Code::from(n as i32))
}

fn codes_json(codes: &[Code]) -> Vec<Value> {
    codes
        .iter()
        .map(|c| Value::from(CODE_NAMES[(*c as usize).min(16)]))
        .collect()
}

/// A proto3 JSON duration: decimal seconds with an `s`, up to nine
/// fractional digits (`"1.5s"`, `".1s"`, `"3s"`), not negative.
fn duration(value: &Value, at: &str) -> Result<Duration, Error> {
    let bad = || invalid(at, format!("{value} is not a duration such as \"0.25s\""));
    let s = value.as_str().ok_or_else(bad)?;
    let digits = s.strip_suffix('s').ok_or_else(bad)?;
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !all_digits(whole) || !all_digits(frac) {
        return Err(bad());
    }
    if frac.len() > 9 || whole.len() > 12 {
        return Err(bad());
    }
    let secs: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let nanos: u32 = format!("{frac:0<9}").parse().map_err(|_| bad())?;
    Ok(Duration::new(secs, nanos))
}

fn duration_json(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        return format!("{}s", d.as_secs());
    }
    let frac = format!("{:09}", d.subsec_nanos());
    format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
}

/// `name` in `obj`, its case ignored as Go's JSON decoder does.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name)
        .or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn object<'a>(value: &'a Value, at: &str) -> Result<&'a Map<String, Value>, Error> {
    value
        .as_object()
        .ok_or_else(|| invalid(at, format!("{} is not a JSON object", brief(value))))
}

fn array<'a>(value: &'a Value, at: &str) -> Result<&'a Vec<Value>, Error> {
    value
        .as_array()
        .ok_or_else(|| invalid(at, format!("{} is not a JSON array", brief(value))))
}

fn opt_string(obj: &Map<String, Value>, name: &str, at: &str) -> Result<Option<String>, Error> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(invalid(
            &format!("{at}.{name}"),
            format!("{v} is not a string"),
        )),
    }
}

/// A value for an error message, cut short.
fn brief(value: &Value) -> String {
    let mut s = value.to_string();
    if s.len() > 60 {
        let mut cut = 57;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn show(name: &MethodName) -> String {
    match (&name.service, &name.method) {
        (None, _) => "the default (no service)".into(),
        (Some(s), None) => format!("service {s:?}"),
        (Some(s), Some(m)) => format!("method {s}/{m}"),
    }
}

fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidServiceConfig {
        field: if field.is_empty() {
            "(the document)".into()
        } else {
            field.to_owned()
        },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        ServiceConfig::from_json(json).unwrap_err().to_string()
    }

    const FULL: &str = r#"{
      "methodConfig": [
        {"name": [{"service": "inv.Inventory", "method": "Get"}], "timeout": "0.5s",
         "retryPolicy": {"maxAttempts": 3, "initialBackoff": ".05s", "maxBackoff": "1s",
                         "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 4]}},
        {"name": [{"service": "inv.Inventory"}], "waitForReady": true,
         "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.01s"}},
        {"name": [{}], "timeout": "2s"}
      ],
      "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
      "loadBalancingConfig": [{"round_robin": {}}]
    }"#;

    #[test]
    fn parses_every_part_and_finds_methods_as_grpc_does() {
        let c = ServiceConfig::from_json(FULL).unwrap();
        let get = c.method("/inv.Inventory/Get").unwrap();
        assert_eq!(get.timeout, Some(Duration::from_millis(500)));
        let Some(Policy::Retry(r)) = &get.policy else {
            panic!("{get:?}")
        };
        assert_eq!(r.max_attempts, 3);
        assert_eq!(r.initial_backoff, Duration::from_millis(50));
        assert_eq!(
            r.retryable_status_codes,
            vec![Code::Unavailable, Code::DeadlineExceeded]
        );
        let put = c.method("/inv.Inventory/Put").unwrap();
        assert_eq!(put.wait_for_ready, Some(true), "the service's entry");
        assert!(
            matches!(put.policy, Some(Policy::Hedging(ref h)) if h.hedging_delay == Duration::from_millis(10))
        );
        let other = c.method("/other.Svc/Any").unwrap();
        assert_eq!(other.timeout, Some(Duration::from_secs(2)), "the default");
        assert_eq!(
            c.retry_throttling,
            Some(RetryThrottling {
                max_tokens: 10.0,
                token_ratio: 0.1
            })
        );
        assert!(c.load_balancing_config.is_some());
    }

    #[test]
    fn writes_what_it_reads() {
        let c = ServiceConfig::from_json(FULL).unwrap();
        let again = ServiceConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(c, again);
        assert!(
            c.to_json().contains(r#""initialBackoff":"0.05s""#),
            "{}",
            c.to_json()
        );
        assert!(c
            .to_json()
            .contains(r#""retryableStatusCodes":["UNAVAILABLE","DEADLINE_EXCEEDED"]"#));
    }

    #[test]
    fn field_names_ignore_case_as_in_go() {
        let c = ServiceConfig::from_json(
            r#"{"methodConfig":[{"name":[{"service":"s"}],"retryPolicy":{"MaxAttempts":4,
            "InitialBackoff":".01s","MaxBackoff":".01s","BackoffMultiplier":1.0,
            "RetryableStatusCodes":["unavailable"]}}]}"#,
        )
        .unwrap();
        assert!(
            matches!(c.method_configs[0].policy, Some(Policy::Retry(ref r)) if r.max_attempts == 4)
        );
    }

    #[test]
    fn every_invalid_field_is_named_with_its_value() {
        let policy = |p: &str| {
            err(&format!(
                r#"{{"methodConfig":[{{"name":[{{"service":"s"}}],"retryPolicy":{p}}}]}}"#
            ))
        };
        let ok = r#""initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]"#;
        for (p, want) in [
            (format!(r#"{{"maxAttempts":1,{ok}}}"#), "methodConfig[0].retryPolicy.maxAttempts: 1 is not an integer of at least 2"),
            (format!(r#"{{"maxAttempts":2.5,{ok}}}"#), "maxAttempts: 2.5 is not"),
            (r#"{"maxAttempts":2,"initialBackoff":"0s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#.into(), "initialBackoff: \"0s\" is not above zero"),
            (r#"{"maxAttempts":2,"initialBackoff":"1","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#.into(), "initialBackoff: \"1\" is not a duration"),
            (r#"{"maxAttempts":2,"initialBackoff":"-1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}"#.into(), "initialBackoff: \"-1s\" is not a duration"),
            (r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":0,"retryableStatusCodes":["UNAVAILABLE"]}"#.into(), "backoffMultiplier: 0 is not a number above 0"),
            (r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":[]}"#.into(), "retryableStatusCodes: must not be empty"),
            (r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["NOPE"]}"#.into(), "retryableStatusCodes[0]: \"NOPE\" is not a gRPC status code"),
            (r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":[17]}"#.into(), "17 is not a gRPC status code"),
            (r#"{"maxAttempts":2,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2}"#.into(), "retryableStatusCodes: is required"),
        ] {
            let got = policy(&p);
            assert!(got.contains(want), "{p}\n  got:  {got}\n  want: {want}");
        }
        for (json, want) in [
            ("[", "(the document): not JSON"),
            ("[]", "(the document): [] is not a JSON object"),
            (
                r#"{"methodConfig":{}}"#,
                "methodConfig: {} is not a JSON array",
            ),
            (
                r#"{"methodConfig":[{"timeout":"1s"}]}"#,
                "methodConfig[0].name: is required",
            ),
            (
                r#"{"methodConfig":[{"name":[{"method":"M"}]}]}"#,
                "methodConfig[0].name[0].method: \"M\" names a method without a service",
            ),
            (
                r#"{"methodConfig":[{"name":[{"service":"s"}]},{"name":[{"service":"s"}]}]}"#,
                "methodConfig[1].name[0]: service \"s\" is named by an earlier methodConfig too",
            ),
            (
                r#"{"methodConfig":[{"name":[{"service":"s"}],"timeout":"1.0000000001s"}]}"#,
                "timeout: \"1.0000000001s\" is not a duration",
            ),
            (
                r#"{"methodConfig":[{"name":[{"service":"s"}],"waitForReady":"yes"}]}"#,
                "waitForReady: \"yes\" is not true or false",
            ),
            (
                r#"{"methodConfig":[{"name":[{"service":"s"}],"retryPolicy":{},"hedgingPolicy":{}}]}"#,
                "methodConfig[0]: sets both retryPolicy and hedgingPolicy",
            ),
            (
                r#"{"methodConfig":[{"name":[{"service":"s"}],"hedgingPolicy":{"maxAttempts":1}}]}"#,
                "hedgingPolicy.maxAttempts: 1 is not",
            ),
            (
                r#"{"retryThrottling":{"maxTokens":0,"tokenRatio":0.1}}"#,
                "retryThrottling.maxTokens: 0 is not a number above 0",
            ),
            (
                r#"{"retryThrottling":{"maxTokens":1001,"tokenRatio":0.1}}"#,
                "maxTokens: 1001 is above the maximum of 1000",
            ),
            (
                r#"{"retryThrottling":{"maxTokens":10,"tokenRatio":0.0001}}"#,
                "tokenRatio: is 0 to three decimal places",
            ),
            (
                r#"{"loadBalancingConfig":{}}"#,
                "loadBalancingConfig: {} is not a JSON array",
            ),
            (
                r#"{"loadBalancingConfig":[{"grpclb":{}},{"xds":{}}]}"#,
                r#"loadBalancingConfig: names no policy this client knows (["grpclb", "xds"]"#,
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash":{},"round_robin":{}}]}"#,
                "loadBalancingConfig[0]: ",
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"minRingSize":9000}}]}"#,
                "loadBalancingConfig[0].ring_hash_experimental.minRingSize: 9000 is above maxRingSize 4096",
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"maxRingSize":0}}]}"#,
                "maxRingSize: 0 is not a whole number from 1 to 8388608",
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"x-id-bin"}}]}"#,
                r#"requestHashHeader: "x-id-bin" is a binary header"#,
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"requestHashHeader":"a b"}}]}"#,
                r#"requestHashHeader: "a b" is not a header name"#,
            ),
            (
                r#"{"loadBalancingConfig":[{"ring_hash_experimental":{"hashBalanceFactor":99}}]}"#,
                "hashBalanceFactor: 99 is not a whole percentage of at least 100",
            ),
            (
                r#"{"loadBalancingConfig":[{"random_subsetting_experimental":{"childPolicy":[]}}]}"#,
                "loadBalancingConfig[0].random_subsetting_experimental.subsetSize: is required",
            ),
            (
                r#"{"loadBalancingConfig":[{"random_subsetting_experimental":{"subsetSize":0,"childPolicy":[]}}]}"#,
                "subsetSize: 0 is not a whole number of at least 1",
            ),
            (
                r#"{"loadBalancingConfig":[{"tonic_etcd_coordinated_subsetting":{"subsetSize":3}}]}"#,
                "tonic_etcd_coordinated_subsetting.childPolicy: is required",
            ),
            (
                r#"{"loadBalancingConfig":[{"random_subsetting_experimental":{"subsetSize":3,
                   "childPolicy":[{"random_subsetting_experimental":{"subsetSize":2,"childPolicy":[]}}]}}]}"#,
                "childPolicy: names no policy this client knows ([\"random_subsetting_experimental\"]",
            ),
        ] {
            let got = err(json);
            assert!(got.contains(want), "{json}\n  got:  {got}\n  want: {want}");
        }
    }

    #[test]
    fn load_balancing_takes_the_first_policy_it_knows() {
        let c = ServiceConfig::from_json(
            r#"{"loadBalancingConfig":[{"grpclb":{}},
                {"ring_hash_experimental":{"maxRingSize":2048,"requestHashHeader":"X-Key",
                 "hashBalanceFactor":125}},{"round_robin":{}}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.load_balancing,
            LoadBalancing::RingHash(RingHashConfig {
                min_ring_size: 1_024,
                max_ring_size: 2_048,
                hash_balance_factor: Some(125),
            })
        );
        assert_eq!(c.hash_header.0.as_ref().map(|h| h.as_str()), Some("x-key"));
        let c =
            ServiceConfig::from_json(r#"{"loadBalancingConfig":[{"round_robin":{}}]}"#).unwrap();
        assert_eq!(c.load_balancing, LoadBalancing::CostWeighted);
        assert_eq!(
            ServiceConfig::from_json("{}").unwrap().load_balancing,
            LoadBalancing::CostWeighted
        );
        let c = ServiceConfig::from_json(
            r#"{"loadBalancingConfig":[{"tonic_etcd_coordinated_subsetting":{"subsetSize":10,
                "childPolicy":[{"ring_hash_experimental":{"requestHashHeader":"x-key"}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            c.subsetting,
            Some(Subsetting {
                scheme: SubsetScheme::Coordinated,
                size: 10
            })
        );
        assert_eq!(
            c.load_balancing,
            LoadBalancing::RingHash(RingHashConfig::DEFAULT)
        );
        assert!(c.hash_header.0.is_some());
    }

    #[test]
    fn durations_follow_proto3_json() {
        let d = |s: &str| duration(&Value::from(s), "t");
        assert_eq!(d("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(d(".1s").unwrap(), Duration::from_millis(100));
        assert_eq!(d("0.000000001s").unwrap(), Duration::from_nanos(1));
        assert_eq!(d("3.5s").unwrap(), Duration::from_millis(3500));
        for bad in ["", "s", ".s", "1", "1ms", "-1s", "1.2.3s", " 1s", "1e3s"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
        for x in [
            Duration::from_millis(250),
            Duration::from_secs(2),
            Duration::from_nanos(1),
        ] {
            assert_eq!(d(&duration_json(x)).unwrap(), x);
        }
    }

    #[test]
    fn the_most_specific_name_wins_whatever_the_order() {
        let c = ServiceConfig::from_json(
            r#"{"methodConfig":[
              {"name":[{}],"timeout":"3s"},
              {"name":[{"service":"s"}],"timeout":"2s"},
              {"name":[{"service":"s","method":"M"}],"timeout":"1s"}]}"#,
        )
        .unwrap();
        let t = |p| c.method(p).and_then(|m| m.timeout).map(|d| d.as_secs());
        assert_eq!(t("/s/M"), Some(1));
        assert_eq!(t("/s/N"), Some(2));
        assert_eq!(t("/x/M"), Some(3));
        assert!(ServiceConfig::default().method("/s/M").is_none());
    }
}
