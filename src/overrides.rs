//! Operator overrides: take an instance out of traffic (drain) or change
//! its weight without touching its process, as Nacos' console does.
//!
//! An override lives at
//! `<namespace prefix>_tonic-etcd/overrides/<service>/<instance id>`
//! ([`Reserved::Overrides`]):
//!
//! * **not under the instance's key**, so the registering process's key
//!   check never undoes it, and etcd's Go resolver (which watches the bare
//!   service prefix) never takes it for an endpoint;
//! * **bound to the instance's lease**, so it ends with the registration
//!   (deregistration, a SIGKILLed process's lease expiring). A lease lost
//!   and granted anew is a new registration too: the override goes with
//!   the old lease, and the operator sets it again if it still applies;
//! * written with a guard on the instance key's lease, so an override is
//!   never bound to a lease the instance has just given up.
//!
//! Every [`Balancer`](crate::Balancer) watches its service's overrides
//! (the same watch machinery as its instances) and applies them live: a
//! drained endpoint stays connected and finishes its calls in flight but
//! gets no new ones ([`EndpointState::Drained`](crate::balancer::EndpointState));
//! a weight override replaces the weight from metadata. In the Balancer's
//! view an override shows in the instance's metadata: [`DRAINED_BY`] holds
//! who drained it, and the weight key holds the overriding weight.
//!
//! [`OverrideStore`] reads and writes them; the CLI (`tonic-etcd drain`,
//! `undrain`, `weight`) and the console use it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Etcd;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio_stream::Stream;
use tower::discover::Change;

use crate::retry::with_timeout;
use crate::schema::{Reserved, Schema};
use crate::{Discover, Error, Instance, Metadata};

/// The metadata key that marks a drained instance in a Balancer's view; its
/// value says who drained it.
pub const DRAINED_BY: &str = "tonic-etcd.drained-by";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of the guarded write when the instance re-registers under it.
const WRITE_TRIES: usize = 3;

/// What an operator set for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Override {
    /// No new calls: the instance finishes what it has in flight.
    pub drain: bool,
    /// Replaces the weight from the instance's metadata.
    pub weight: Option<u32>,
    /// Who set it (the console's token name, or `cli:<user>`).
    pub by: String,
    /// When it was set, in seconds since the Unix epoch.
    pub at_unix: u64,
}

impl Override {
    /// A drain by `by`, now.
    pub fn drain(by: impl Into<String>) -> Self {
        Self {
            drain: true,
            by: by.into(),
            at_unix: now_unix(),
            ..Self::default()
        }
    }

    /// A weight override by `by`, now. Weights are 1 to 10,000, as in
    /// metadata.
    pub fn weight(weight: u32, by: impl Into<String>) -> Result<Self, Error> {
        if !(1..=10_000).contains(&weight) {
            return Err(Error::InvalidConfig(format!(
                "weight {weight} is out of range: 1 to 10000"
            )));
        }
        Ok(Self {
            weight: Some(weight),
            by: by.into(),
            at_unix: now_unix(),
            ..Self::default()
        })
    }

    /// As stored: the naming schema's JSON, its metadata the fields.
    fn to_metadata(&self) -> Metadata {
        let mut m = Metadata::new()
            .with("drain", self.drain.to_string())
            .with("by", self.by.clone())
            .with("at", self.at_unix.to_string());
        if let Some(w) = self.weight {
            m.insert("weight", w.to_string());
        }
        m
    }

    /// Reads an override back; fields that do not parse are left out (with
    /// a warning), so a hand-edited value never disturbs the rest.
    pub(crate) fn from_metadata(m: &Metadata) -> Self {
        let weight = m.get("weight").and_then(|w| match w.parse::<u32>() {
            Ok(w) if (1..=10_000).contains(&w) => Some(w),
            _ => {
                tracing::warn!(value = %w, "override weight is not 1 to 10000; ignored");
                None
            }
        });
        Self {
            drain: m.get("drain").as_deref() == Some("true"),
            weight,
            by: m.get("by").unwrap_or_default(),
            at_unix: m.get("at").and_then(|a| a.parse().ok()).unwrap_or(0),
        }
    }

    /// Whether it changes anything.
    pub fn is_empty(&self) -> bool {
        !self.drain && self.weight.is_none()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The instance of `service` whose id is `id`, else the one instance whose
/// address it is: operators copy what `list` shows, and the address is the
/// column they see first.
fn find<'a>(instances: &'a [Instance], service: &str, id: &str) -> Result<&'a Instance, Error> {
    match instances.iter().find(|i| i.id == id) {
        Some(i) => Ok(i),
        None => at_addr(instances, service, id)?.ok_or_else(|| unknown(service, id)),
    }
}

fn unknown(service: &str, id: &str) -> Error {
    Error::UnknownInstance {
        service: service.to_owned(),
        id: id.to_owned(),
    }
}

/// The one entry of `service` at `addr` (`None`: none); several are an
/// error that names their ids, for the operator to choose.
fn at_addr<'a>(
    entries: &'a [Instance],
    service: &str,
    addr: &str,
) -> Result<Option<&'a Instance>, Error> {
    let found: Vec<&Instance> = entries.iter().filter(|i| i.addr == addr).collect();
    match found[..] {
        [] => Ok(None),
        [only] => Ok(Some(only)),
        _ => {
            let ids: Vec<&str> = found.iter().map(|i| i.id.as_str()).collect();
            Err(Error::InvalidConfig(format!(
                "{addr} is the address of {} instances of {service} ({}): name one by its id",
                ids.len(),
                ids.join(", ")
            )))
        }
    }
}

/// Reads and writes overrides.
#[derive(Clone)]
pub struct OverrideStore {
    client: Etcd,
    schema: Arc<dyn Schema>,
    timeout: Duration,
}

impl std::fmt::Debug for OverrideStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverrideStore")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl OverrideStore {
    /// Overrides of instances registered with `schema`.
    pub fn new(etcd: impl Into<Etcd>, schema: impl Schema) -> Self {
        Self {
            client: etcd.into(),
            schema: Arc::new(schema),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The limit on each etcd request (default 5 s).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = crate::time::cap(timeout);
        self
    }

    /// The registered instance of `service` that `id` names (its id, or
    /// the address of exactly one instance), as etcd lists it now.
    pub async fn find(&self, service: &str, id: &str) -> Result<Instance, Error> {
        self.schema.validate_service(service)?;
        let listing =
            crate::catalog::list(&self.client, &*self.schema, Some(service), self.timeout).await?;
        let instances = listing.services.get(service).map_or(&[][..], Vec::as_slice);
        find(instances, service, id).cloned()
    }

    /// Sets the override of instance `id` of `service` (or of the one
    /// instance with that address), bound to its lease. Fails with
    /// [`Error::UnknownInstance`] when no such instance is registered, and
    /// names the ids when several share the address. An empty override
    /// removes it.
    pub async fn set(&self, service: &str, id: &str, o: &Override) -> Result<(), Error> {
        if o.is_empty() {
            return self.remove(service, id).await.map(drop);
        }
        self.schema.validate_service(service)?;
        let layout = Reserved::Overrides.schema(&*self.schema)?;
        for _ in 0..WRITE_TRIES {
            let listing =
                crate::catalog::list(&self.client, &*self.schema, Some(service), self.timeout)
                    .await?;
            let instances = listing.services.get(service).map_or(&[][..], Vec::as_slice);
            let instance = find(instances, service, id)?;
            let key = (service.to_owned(), instance.id.clone());
            let Some(info) = listing.keys.get(&key).cloned() else {
                return Err(unknown(service, id));
            };
            let stored = Instance {
                service: service.to_owned(),
                id: instance.id.clone(),
                addr: instance.addr.clone(),
                metadata: o.to_metadata(),
            };
            let encoded = layout.encode(&stored)?;
            let opts = (info.lease != 0).then(|| PutOptions::new().with_lease(info.lease));
            // Only while the instance still holds that lease.
            let txn = Txn::new()
                .when([Compare::lease(
                    info.key.as_str(),
                    CompareOp::Equal,
                    info.lease,
                )])
                .and_then([TxnOp::put(encoded.key.clone(), encoded.value.clone(), opts)]);
            let resp = with_timeout("put override", self.timeout, || {
                let (mut c, txn) = (self.client.clone(), txn.clone());
                async move { c.txn(txn).await }
            })
            .await?;
            if resp.succeeded() {
                return Ok(());
            }
        }
        Err(Error::InvalidConfig(format!(
            "instance {id} of {service} kept re-registering while the override was written; try again"
        )))
    }

    /// Removes the override of instance `id` of `service` (or of the one
    /// instance with that address); true when there was one.
    pub async fn remove(&self, service: &str, id: &str) -> Result<bool, Error> {
        if self.delete(&self.key(service, id)?).await? {
            return Ok(true);
        }
        // Not an id: the one override for this address (an override stores
        // its instance's address, so this works after the instance left).
        let layout = Reserved::Overrides.schema(&*self.schema)?;
        let listing =
            crate::catalog::list(&self.client, &layout, Some(service), self.timeout).await?;
        let overrides = listing.services.get(service).map_or(&[][..], Vec::as_slice);
        match at_addr(overrides, service, id)? {
            Some(o) => self.delete(&self.key(service, &o.id)?).await,
            None => Ok(false),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, Error> {
        let resp = with_timeout("delete override", self.timeout, || {
            let mut c = self.client.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok(resp.deleted() > 0)
    }

    /// Every override of `service` (or of every service, without one), by
    /// service and instance id.
    pub async fn list(
        &self,
        service: Option<&str>,
    ) -> Result<BTreeMap<(String, String), Override>, Error> {
        if let Some(service) = service {
            self.schema.validate_service(service)?;
        }
        let layout = Reserved::Overrides.schema(&*self.schema)?;
        let listing = crate::catalog::list(&self.client, &layout, service, self.timeout).await?;
        let mut out = BTreeMap::new();
        for (svc, instances) in listing.services {
            for i in instances {
                out.insert(
                    (svc.clone(), i.id.clone()),
                    Override::from_metadata(&i.metadata),
                );
            }
        }
        Ok(out)
    }

    fn key(&self, service: &str, id: &str) -> Result<String, Error> {
        self.schema.validate_service(service)?;
        let probe = Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            addr: "override.invalid:1".into(),
            metadata: Metadata::new(),
        };
        Ok(Reserved::Overrides
            .schema(&*self.schema)?
            .encode(&probe)?
            .key)
    }
}

/// A service's instances with their overrides applied: what a Balancer
/// consumes. An override change re-announces the instances it concerns
/// (an `Insert` of a known key only updates it, without redialling).
pub(crate) struct WithOverrides<D> {
    inner: D,
    overrides: Option<Discover>,
    weight_key: String,
    /// Instance key -> the instance as registered.
    registered: HashMap<String, Instance>,
    /// Instance id -> its override.
    by_id: HashMap<String, Override>,
    /// Override key -> instance id.
    override_ids: HashMap<String, String>,
    pending: VecDeque<Change<String, Instance>>,
}

impl<D> WithOverrides<D> {
    /// Applies `service`'s overrides (watched through `client`) to `inner`.
    /// Without a valid scope (a service the schema refuses: `inner` fails
    /// on its own) the instances pass unchanged.
    pub(crate) fn new(
        inner: D,
        client: Etcd,
        schema: &dyn Schema,
        service: &str,
        weight_key: String,
        request_timeout: Duration,
    ) -> Self {
        let layout = schema
            .validate_service(service)
            .and_then(|()| Reserved::Overrides.schema(schema));
        let overrides = layout.ok().and_then(|layout| {
            Discover::builder(client, service)
                .schema(layout)
                .request_timeout(request_timeout)
                .build()
                .map_err(|e| tracing::warn!(error = %e, "overrides not watched"))
                .ok()
        });
        Self {
            inner,
            overrides,
            weight_key,
            registered: HashMap::new(),
            by_id: HashMap::new(),
            override_ids: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn merged(&self, mut instance: Instance) -> Instance {
        if let Some(o) = self.by_id.get(&instance.id) {
            if o.drain {
                let by = if o.by.is_empty() { "operator" } else { &o.by };
                instance.metadata.insert(DRAINED_BY, by);
            }
            if let Some(w) = o.weight {
                instance
                    .metadata
                    .insert(self.weight_key.clone(), w.to_string());
            }
        }
        instance
    }

    fn override_changed(&mut self, change: Change<String, Instance>) {
        let id = match change {
            Change::Insert(key, stored) => {
                let o = Override::from_metadata(&stored.metadata);
                tracing::info!(id = %stored.id, drain = o.drain, weight = ?o.weight, by = %o.by,
                    "operator override");
                self.override_ids.insert(key, stored.id.clone());
                self.by_id.insert(stored.id.clone(), o);
                stored.id
            }
            Change::Remove(key) => {
                let Some(id) = self.override_ids.remove(&key) else {
                    return;
                };
                tracing::info!(%id, "operator override removed");
                self.by_id.remove(&id);
                id
            }
        };
        let affected: Vec<(String, Instance)> = self
            .registered
            .iter()
            .filter(|(_, i)| i.id == id)
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        for (key, instance) in affected {
            let merged = self.merged(instance);
            self.pending.push_back(Change::Insert(key, merged));
        }
    }
}

impl<D, E> Stream for WithOverrides<D>
where
    D: Stream<Item = Result<Change<String, Instance>, E>> + Unpin,
{
    type Item = Result<Change<String, Instance>, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            if let Some(overrides) = this.overrides.as_mut() {
                match Pin::new(overrides).poll_next(cx) {
                    Poll::Ready(Some(Ok(change))) => {
                        this.override_changed(change);
                        continue;
                    }
                    // A Discover never ends nor fails; if it did, the
                    // overrides known so far stay.
                    Poll::Ready(_) => this.overrides = None,
                    Poll::Pending => {}
                }
            }
            return match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(Change::Insert(key, instance)))) => {
                    this.registered.insert(key.clone(), instance.clone());
                    let merged = this.merged(instance);
                    Poll::Ready(Some(Ok(Change::Insert(key, merged))))
                }
                Poll::Ready(Some(Ok(Change::Remove(key)))) => {
                    this.registered.remove(&key);
                    Poll::Ready(Some(Ok(Change::Remove(key))))
                }
                other => other,
            };
        }
    }
}

/// Whether `instance` (as a Balancer sees it) is drained.
pub(crate) fn is_drained(instance: &Instance) -> bool {
    instance.metadata.get(DRAINED_BY).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_survives_its_stored_form_and_bad_fields_are_dropped() {
        let o = Override::weight(7, "alice").unwrap();
        assert_eq!(Override::from_metadata(&o.to_metadata()), o);
        let d = Override::drain("bob");
        assert_eq!(Override::from_metadata(&d.to_metadata()), d);
        let hand_edited = Metadata::new().with("drain", "true").with("weight", "lots");
        let read = Override::from_metadata(&hand_edited);
        assert!(read.drain);
        assert_eq!(read.weight, None);
        assert!(Override::weight(0, "x").is_err());
        assert!(Override::weight(10_001, "x").is_err());
    }
}
