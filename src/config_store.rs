//! gRPC service configs kept in etcd, one document per service, watched
//! live by every [`Balancer`](crate::Balancer) of that service.
//!
//! # Where
//!
//! A service's config lives at
//! `<namespace prefix>_tonic-etcd/service-config/<service>` ([`config_key`]),
//! e.g. `_tonic-etcd/service-config/greeter.v1.Greeter`, or
//! `prod/_tonic-etcd/service-config/greeter.v1.Greeter` under the naming
//! schema's namespace `prod`: inside the namespace, so the namespace's
//! grant covers it, but not beside the instances: etcd's Go resolver
//! watches the *bare* prefix `<service>` (etcd-io/etcd#15022), so it would
//! read any key that starts with the service's name, even
//! `<service>-config`, as an endpoint. No service may be called
//! `_tonic-etcd`, and a [`Catalog`](crate::Catalog) leaves these keys out
//! (see [`Reserved`]).
//!
//! # What a balancer does with it
//!
//! As a gRPC resolver's config does: the etcd document, when there is one,
//! replaces the builder's [`service_config`](crate::BalancerBuilder::service_config),
//! and deleting it brings the builder's back. A document that does not parse
//! or validate is refused whole: the config in force stays, the reason is
//! logged once per revision and shown in
//! [`Balancer::service_config`](crate::Balancer::service_config). A change
//! applies to the next call. Before its first call the balancer waits for
//! the first reading (at most the etcd request timeout), so no call runs
//! under the builder's config while etcd has another one.
//! [`service_config_from_etcd(false)`](crate::BalancerBuilder::service_config_from_etcd)
//! opts out.
//!
//! The CLI writes them: `tonic-etcd config set <service> FILE`, validating
//! before writing (see [`ConfigStore::set`]).

use std::sync::Arc;
use std::time::Duration;

use crate::Etcd;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::retry::with_timeout;
use crate::schema::{NamingSchema, Reserved, Schema};
use crate::watcher::source::{Event, Source};
use crate::watcher::{next_reply, Liveness};
use crate::{Error, ServiceConfig};

/// Largest document read: gRPC service configs are a few KiB at most.
const MAX_DOCUMENT: usize = 256 * 1024;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The etcd key of `service`'s config under `schema`.
pub fn config_key(schema: &dyn Schema, service: &str) -> Result<String, Error> {
    schema.validate_service(service)?;
    Ok(format!(
        "{}{service}",
        Reserved::ServiceConfig.prefix(schema)
    ))
}

/// A service config document as etcd holds it.
#[derive(Debug)]
pub struct StoredConfig {
    /// The document as stored.
    pub json: String,
    /// The document parsed and validated, or why it is refused.
    pub config: Result<ServiceConfig, Error>,
    /// The revision it was written at.
    pub revision: i64,
}

/// Reads and writes service configs in etcd. See the [module docs](self).
#[derive(Clone)]
pub struct ConfigStore {
    client: Etcd,
    schema: Arc<dyn Schema>,
    timeout: Duration,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("schema", &self.schema)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ConfigStore {
    /// A store for services under the default schema (etcd naming without
    /// namespace).
    pub fn new(etcd: impl Into<Etcd>) -> Self {
        Self {
            client: etcd.into(),
            schema: Arc::new(NamingSchema::new()),
            timeout: crate::watcher::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The key layout whose namespace the configs belong to.
    #[must_use]
    pub fn schema(mut self, schema: impl Schema) -> Self {
        self.schema = Arc::new(schema);
        self
    }

    /// The limit on each etcd request (default 5 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = crate::time::cap(timeout);
        self
    }

    /// The key of `service`'s config.
    pub fn key(&self, service: &str) -> Result<String, Error> {
        config_key(&*self.schema, service)
    }

    /// `service`'s config as stored, `None` when there is none.
    pub async fn get(&self, service: &str) -> Result<Option<StoredConfig>, Error> {
        let (entry, _) = read(&self.client, &self.key(service)?, self.timeout).await?;
        Ok(entry.map(|(value, revision)| {
            let (json, config) = parse(&value);
            StoredConfig {
                json,
                config,
                revision,
            }
        }))
    }

    /// Validates `json` as a service config and stores it as given for
    /// `service`; every balancer of the service applies it to its next
    /// call. A document that does not validate is refused here, before
    /// anything is written. Returns the revision written.
    pub async fn set(&self, service: &str, json: &str) -> Result<i64, Error> {
        ServiceConfig::from_json(json)?;
        let key = self.key(service)?;
        let kv = self.client.kv_client();
        let resp = with_timeout("put service config", self.timeout, || {
            let mut kv = kv.clone();
            let (key, json) = (key.clone(), json.to_owned());
            async move { kv.put(key, json, None).await }
        })
        .await?;
        Ok(resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Deletes `service`'s config: balancers go back to their builder's.
    /// Whether there was one.
    pub async fn remove(&self, service: &str) -> Result<bool, Error> {
        let key = self.key(service)?;
        let kv = self.client.kv_client();
        let resp = with_timeout("delete service config", self.timeout, || {
            let mut kv = kv.clone();
            let key = key.clone();
            async move { kv.delete(key, None).await }
        })
        .await?;
        Ok(resp.deleted() > 0)
    }
}

/// The document's text and what it says.
fn parse(value: &[u8]) -> (String, Result<ServiceConfig, Error>) {
    let json = String::from_utf8_lossy(value).into_owned();
    let config = if value.len() > MAX_DOCUMENT {
        Err(Error::InvalidServiceConfig {
            field: "(document)".into(),
            reason: format!("{} bytes, above the limit of {MAX_DOCUMENT}", value.len()),
        })
    } else if std::str::from_utf8(value).is_err() {
        Err(Error::InvalidServiceConfig {
            field: "(document)".into(),
            reason: "not UTF-8".into(),
        })
    } else {
        ServiceConfig::from_json(&json)
    };
    (json, config)
}

/// Reads `key` (linearizable): its value and mod revision, if present, and
/// the revision etcd answered at.
async fn read<S: Source>(
    source: &S,
    key: &str,
    timeout: Duration,
) -> Result<(Option<(Vec<u8>, i64)>, i64), Error> {
    let from = key.as_bytes().to_vec();
    let mut end = from.clone();
    end.push(0);
    let page = with_timeout("get service config", timeout, || {
        source.page(from.clone(), end.clone(), 1, 0)
    })
    .await?;
    let entry = page
        .entries
        .into_iter()
        .next()
        .map(|e| (e.value, e.mod_revision));
    Ok((entry, page.header.revision))
}

/// Where the service config in force came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The builder's (`BalancerBuilder::service_config`, else empty): etcd
    /// holds none, or is not asked.
    Builder,
    /// The document in etcd, written at `revision`.
    Etcd {
        /// The key it was read from.
        key: String,
        /// Its mod revision.
        revision: i64,
    },
}

/// A document in etcd that was refused: the config in force stayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedConfig {
    /// Its mod revision.
    pub revision: i64,
    /// Why it was refused.
    pub reason: String,
}

/// The service config a balancer applies now, and where it stands with
/// etcd. From [`Balancer::service_config`](crate::Balancer::service_config).
#[derive(Debug, Clone)]
pub struct ServiceConfigStatus {
    /// The config in force.
    pub config: Arc<ServiceConfig>,
    /// Where it came from.
    pub source: ConfigSource,
    /// The latest document in etcd, when it was refused (cleared by a valid
    /// one or a delete).
    pub rejected: Option<RejectedConfig>,
    /// Whether etcd has been read at least once (false when opted out).
    pub synced: bool,
    /// The last etcd failure, until the watch recovers.
    pub last_error: Option<Arc<Error>>,
    /// Fields of the document in force that do nothing here (misspelled,
    /// or gRPC's but unused), each with its fix; see
    /// [`unknown_fields`](crate::service_config::unknown_fields).
    pub warnings: Vec<crate::service_config::UnknownField>,
}

impl ServiceConfigStatus {
    /// The builder's config, before etcd was read.
    pub(crate) fn builder(config: Arc<ServiceConfig>) -> Self {
        Self {
            config,
            source: ConfigSource::Builder,
            rejected: None,
            synced: false,
            last_error: None,
            warnings: Vec::new(),
        }
    }

    /// Whether the first reading is over, read or failed: calls need not
    /// wait for it any longer.
    pub(crate) fn settled(&self) -> bool {
        self.synced || self.last_error.is_some()
    }
}

/// What the watch of one service's config needs.
#[derive(Debug, Clone)]
pub(crate) struct WatchConfig {
    pub(crate) key: String,
    /// The builder's config, in force while etcd holds none.
    pub(crate) default: Arc<ServiceConfig>,
    pub(crate) request_timeout: Duration,
    /// Quiet time after which the watch asks for progress.
    pub(crate) idle: Duration,
}

/// Keeps `status` equal to what etcd holds at `cfg.key`, until every
/// receiver is gone. Reads the key, then watches it from the next revision;
/// after any failure reads it again (one key: cheaper than tracking
/// compaction and regressions), with back-off and jitter.
pub(crate) async fn watch<S: Source>(
    source: S,
    cfg: WatchConfig,
    status: watch::Sender<ServiceConfigStatus>,
) {
    crate::metrics::service_config_watched(&cfg.key);
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut refusals = crate::backoff::Refusals::default();
    // Whether a refused watch has had its stream reopened with a fresh
    // token since the last failure that was not a refusal.
    let mut reauthenticated = false;
    while !status.is_closed() {
        let mut read_ok = false;
        let error = match read(&source, &cfg.key, cfg.request_timeout).await {
            Ok((entry, revision)) => {
                read_ok = true;
                refusals.clear();
                apply(&cfg, &status, entry);
                status.send_if_modified(|s| {
                    let changed = !s.synced || s.last_error.is_some();
                    s.synced = true;
                    s.last_error = None;
                    changed
                });
                session(&source, &cfg, &status, revision, &mut backoff).await
            }
            Err(e) => e,
        };
        if !error.is_refused() {
            reauthenticated = false;
        } else if read_ok && !std::mem::replace(&mut reauthenticated, true) {
            // The key was just read, so the watch stream's token is likely
            // the one refused (etcd 3.4 says "permission denied" for both).
            tracing::info!(key = %cfg.key, %error,
                "etcd refused a watch of a key this user reads; refreshing the token and reopening the stream");
            source.reauthenticate().await;
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        let error = error.naming_grant("read", &cfg.key);
        let delay = if error.is_refused() {
            // Optional: the builder's config serves meanwhile.
            refusals.refused(&cfg.key, &error, "the service config in force")
        } else {
            let delay = backoff.next_delay();
            tracing::warn!(key = %cfg.key, %error, retry_in = ?delay,
                "service config watch failed; keeping the config in force");
            delay
        };
        status.send_modify(|s| s.last_error = Some(Arc::new(error)));
        tokio::time::sleep(delay).await;
    }
}

/// Watches from `revision + 1` until the watch fails.
async fn session<S: Source>(
    source: &S,
    cfg: &WatchConfig,
    status: &watch::Sender<ServiceConfigStatus>,
    revision: i64,
    backoff: &mut Backoff,
) -> Error {
    // A prefix watch (the only kind `Source` has): keys that merely start
    // with this one (`svc2` for `svc`) are passed over below.
    let watched = with_timeout("watch service config", cfg.request_timeout, || {
        source.watch(cfg.key.clone(), revision + 1)
    });
    let mut stream = match watched.await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut liveness = Liveness::default();
    loop {
        let next = next_reply(
            &mut stream,
            source,
            &cfg.key,
            &mut liveness,
            cfg.idle,
            cfg.request_timeout,
        );
        let resp = match next.await {
            Ok(r) => r,
            Err(e) => return e,
        };
        if resp.canceled {
            return Error::Etcd {
                op: "watch service config",
                source: etcd_client::Error::WatchError(format!(
                    "canceled by etcd (compacted at {}): {}",
                    resp.compact_revision, resp.cancel_reason
                )),
            };
        }
        if resp.created {
            continue;
        }
        backoff.reset();
        let last = resp.events.into_iter().rev().find_map(|event| match event {
            Event::Put(kv) if kv.key == cfg.key.as_bytes() => {
                Some(Some((kv.value, kv.mod_revision)))
            }
            Event::Delete(kv) if kv.key == cfg.key.as_bytes() => Some(None),
            _ => None,
        });
        if let Some(entry) = last {
            apply(cfg, status, entry);
        }
    }
}

/// Applies the document etcd holds now (`None`: none).
fn apply(
    cfg: &WatchConfig,
    status: &watch::Sender<ServiceConfigStatus>,
    entry: Option<(Vec<u8>, i64)>,
) {
    status.send_if_modified(|s| {
        let Some((value, revision)) = entry else {
            let was_etcd = s.source != ConfigSource::Builder;
            if was_etcd {
                tracing::info!(key = %cfg.key, "service config removed from etcd; the builder's is in force");
            }
            s.config = cfg.default.clone();
            s.source = ConfigSource::Builder;
            s.warnings.clear();
            crate::metrics::service_config(&cfg.key, 0, false, 0);
            return was_etcd | s.rejected.take().is_some();
        };
        let seen = matches!(&s.source, ConfigSource::Etcd { revision: r, .. } if *r == revision)
            || s.rejected.as_ref().is_some_and(|r| r.revision == revision);
        if seen {
            return false; // read again after a reconnect
        }
        match parse(&value).1 {
            Ok(config) => {
                tracing::info!(key = %cfg.key, revision, "service config from etcd in force");
                // Once per revision, as the refusals below.
                let warnings = serde_json::from_slice(&value)
                    .map(|v| crate::service_config::unknown_fields(&v))
                    .unwrap_or_default();
                for w in &warnings {
                    tracing::warn!(key = %cfg.key, revision, field = %w.path, hint = %w.hint,
                        "a field of the service config in etcd has no effect");
                }
                crate::metrics::service_config(&cfg.key, revision, false, warnings.len());
                s.warnings = warnings;
                s.config = Arc::new(config);
                s.source = ConfigSource::Etcd {
                    key: cfg.key.clone(),
                    revision,
                };
                s.rejected = None;
            }
            Err(error) => {
                tracing::warn!(key = %cfg.key, revision, %error,
                    "service config in etcd refused; the config in force stays");
                let in_force = match &s.source {
                    ConfigSource::Etcd { revision, .. } => *revision,
                    ConfigSource::Builder => 0,
                };
                crate::metrics::service_config(&cfg.key, in_force, true, s.warnings.len());
                crate::metrics::service_config_refused(&cfg.key);
                s.rejected = Some(RejectedConfig {
                    revision,
                    reason: error.to_string(),
                });
            }
        }
        true
    });
}
