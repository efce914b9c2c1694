//! The operator console: every service of the registry in a browser, live,
//! and (when allowed) drains and weight overrides.
//!
//! `tonic-etcd console` serves it; [`serve`] is the same from code. Pages
//! are rendered on the server from a fresh reading of etcd (at most the
//! request timeout); when etcd does not answer, the last reading is shown
//! under a banner that says so. Changes reach open pages as Server-Sent
//! Events (`/events`) from the same watch a [`Catalog`] uses, and each page
//! then fetches its table body again. No build step and nothing from a CDN:
//! one inline stylesheet and script.
//!
//! * `/` every service: instances, zones, versions, drained ones, entries
//!   that do not decode (with the reason);
//! * `/service?name=<service>` its instances: address, id, metadata,
//!   weight, zone, lease and TTL left, the revision that registered it, the
//!   override, a health probe from the console (`grpc.health.v1`), and the
//!   service config in force; 500 per page;
//! * `/etcd` members, leader, revision, database size, alarms.
//!
//! **Writes** (drain, undrain, weight: [`overrides`](crate::overrides))
//! are off unless [`ConsoleOptions::allow_writes`], and then need a token
//! (`Authorization: Bearer <secret>`) from [`ConsoleOptions::tokens`];
//! each write is logged with the token's name.

mod page;
mod probe;

pub use probe::{probe, probe_all, Probe};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Etcd;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::catalog::{self, Listing};
use crate::overrides::{Override, OverrideStore};
use crate::schema::Schema;
use crate::{Catalog, CatalogEvent, ConfigStore, Error};
use page::{esc, esc_document, layout, query, table};

/// Instances per page of a service.
const PAGE: usize = 500;
/// Live events kept for a page that opens.
const RECENT: usize = 100;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How the console runs.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConsoleOptions {
    /// Drains and weight overrides from the page and `/api/override`.
    pub allow_writes: bool,
    /// Secret -> name: who a write is logged as. Writes need one.
    pub tokens: HashMap<String, String>,
    /// The limit on each etcd request (default 5 s).
    pub request_timeout: Option<Duration>,
}

impl ConsoleOptions {
    /// Read-only, no tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows writes with these tokens, read as `name=secret` pairs
    /// separated by commas (as in `TONIC_ETCD_CONSOLE_TOKENS`).
    pub fn with_writes(mut self, tokens: &str) -> Result<Self, Error> {
        for pair in tokens.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, secret) = pair.split_once('=').ok_or_else(|| {
                Error::InvalidConfig("console tokens are name=secret pairs".into())
            })?;
            if secret.len() < 16 {
                return Err(Error::InvalidConfig(format!(
                    "the console token of {name:?} is shorter than 16 characters"
                )));
            }
            self.tokens.insert(secret.to_owned(), name.to_owned());
        }
        if self.tokens.is_empty() {
            return Err(Error::InvalidConfig(
                "writes need at least one token (TONIC_ETCD_CONSOLE_TOKENS=name=secret)".into(),
            ));
        }
        self.allow_writes = true;
        Ok(self)
    }
}

struct Console {
    client: Etcd,
    schema: Arc<dyn Schema>,
    overrides: OverrideStore,
    configs: ConfigStore,
    timeout: Duration,
    opts: ConsoleOptions,
    /// Why writes are off, shown on every page.
    read_only_reason: Option<String>,
    last: Mutex<Option<Listing>>,
    recent: Mutex<VecDeque<serde_json::Value>>,
    events: broadcast::Sender<serde_json::Value>,
}

/// Serves the console on `listener` until `shutdown` resolves.
pub async fn serve(
    etcd: impl Into<Etcd>,
    schema: Arc<dyn Schema>,
    opts: ConsoleOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let client = etcd.into();
    let local: SocketAddr = listener.local_addr()?;
    let timeout = opts.request_timeout.unwrap_or(Duration::from_secs(5));
    let read_only_reason = match (opts.allow_writes, local.ip().is_loopback()) {
        (true, _) => None,
        (false, true) => Some("read-only: started without --allow-writes".to_owned()),
        (false, false) => Some(format!(
            "read-only: listening on {local} (not loopback) without --allow-writes"
        )),
    };
    let (events, _) = broadcast::channel(1024);
    let console = Arc::new(Console {
        overrides: OverrideStore::new(client.clone(), schema.clone()).request_timeout(timeout),
        configs: ConfigStore::new(client.clone())
            .schema(schema.clone())
            .request_timeout(timeout),
        client,
        schema,
        timeout,
        opts,
        read_only_reason,
        last: Mutex::new(None),
        recent: Mutex::new(VecDeque::new()),
        events,
    });
    let follower = tokio::spawn(follow(console.clone()));
    let app = Router::new()
        .route("/", get(services_page))
        .route("/fragment/services", get(services_rows))
        .route("/service", get(service_page))
        .route("/fragment/service", get(service_rows_fragment))
        .route("/api/health", get(health))
        .route("/etcd", get(etcd_page))
        .route("/events", get(live_events))
        .route("/api/override", post(set_override))
        .with_state(console);
    tracing::info!(%local, "console listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    follower.abort();
    served.map_err(Error::Io)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Clock time for the live list (UTC, to the millisecond).
fn clock(ms: u128) -> String {
    let secs = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

/// The next change of the overrides, if they are followed.
async fn next_override(overrides: &mut Option<Catalog>) -> Option<CatalogEvent> {
    match overrides {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// How an override change reads in the live list.
fn override_kind(event: &CatalogEvent) -> (String, &crate::Instance) {
    match event {
        CatalogEvent::Insert { instance, .. } => {
            let o = Override::from_metadata(&instance.metadata);
            let by = if o.by.is_empty() { "operator" } else { &o.by };
            let kind = match (o.drain, o.weight) {
                (true, _) => format!("drain by {by}"),
                (false, Some(w)) => format!("weight {w} by {by}"),
                (false, None) => format!("override by {by}"),
            };
            (kind, instance)
        }
        CatalogEvent::Remove { instance, .. } => ("override removed".into(), instance),
    }
}

/// Follows the registry (every service), the operators' overrides and
/// etcd's reachability, and publishes them to open pages.
async fn follow(console: Arc<Console>) {
    let built = Catalog::builder(console.client.clone())
        .schema(console.schema.clone())
        .request_timeout(console.timeout)
        .build();
    let mut catalog = match built {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "console: no live updates"),
    };
    // Drains and weights, whoever made them (the CLI, another console,
    // code): their own keys, followed as the registry is.
    let mut overrides = crate::schema::Reserved::Overrides
        .schema(&*console.schema)
        .and_then(|layout| {
            Catalog::builder(console.client.clone())
                .schema(layout)
                .request_timeout(console.timeout)
                .build()
        })
        .map_err(|e| tracing::warn!(error = %e, "console: overrides not in the live list"))
        .ok();
    let mut status = catalog.status();
    let mut was_ok = true;
    loop {
        tokio::select! {
            event = catalog.next() => {
                let Some(event) = event else { return };
                let (kind, instance) = match &event {
                    CatalogEvent::Insert { instance, .. } => ("insert", instance),
                    CatalogEvent::Remove { instance, .. } => ("remove", instance),
                };
                console.publish_change(kind, instance);
            }
            event = next_override(&mut overrides) => {
                let Some(event) = event else {
                    overrides = None;
                    continue;
                };
                let (kind, instance) = override_kind(&event);
                console.publish_change(&kind, instance);
            }
            changed = status.changed() => {
                if changed.is_err() { return; }
                let s = status.borrow_and_update().clone();
                let ok = s.last_error.is_none();
                if ok != was_ok {
                    was_ok = ok;
                    let error = s.last_error.map(|e| e.to_string()).unwrap_or_default();
                    let _ = console.events.send(serde_json::json!({"kind": "etcd", "ok": ok, "error": error}));
                }
            }
        }
    }
}

impl Console {
    /// Adds a change of `instance` (`kind`: insert, remove, drain by ...)
    /// to the live list, stamped with the time.
    fn publish_change(&self, kind: &str, instance: &crate::Instance) {
        self.publish(serde_json::json!({
            "kind": kind,
            "at": clock(now_ms()),
            "service": instance.service,
            "id": instance.id,
            "addr": instance.addr,
        }));
    }

    /// Adds `e` to the live list: kept for pages opened later, sent to
    /// those open now.
    fn publish(&self, e: serde_json::Value) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.push_front(e.clone());
            recent.truncate(RECENT);
        }
        let _ = self.events.send(e);
    }

    /// A fresh listing, or the last one with the reason etcd did not answer.
    async fn listing(&self, service: Option<&str>) -> (Listing, String) {
        match catalog::list(&self.client, &*self.schema, service, self.timeout).await {
            Ok(l) => {
                if service.is_none() {
                    *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
                }
                (l, String::new())
            }
            Err(e) => {
                let mut last = self
                    .last
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_default();
                if let Some(s) = service {
                    last.services.retain(|name, _| name == s);
                }
                (
                    last,
                    format!("etcd unreachable, showing the last reading: {e}"),
                )
            }
        }
    }

    /// The standing notice of every page: why writes are off.
    fn notice(&self) -> &str {
        self.read_only_reason.as_deref().unwrap_or("")
    }
}

#[derive(serde::Deserialize)]
struct ServiceQuery {
    name: String,
    #[serde(default)]
    page: usize,
}

async fn services_page(State(c): State<Arc<Console>>) -> Html<String> {
    let (listing, etcd) = c.listing(None).await;
    let body = format!(
        "<h2>Services</h2>{}{}",
        table(
            &["Service", "Instances", "Zones", "Versions", "Drained"],
            &services_table(&c, &listing).await,
            "/fragment/services",
            None,
        ),
        undecodable(&listing),
    );
    Html(layout(
        "Services",
        Some(""),
        c.notice(),
        &etcd,
        &body,
        &recent(&c),
    ))
}

async fn services_rows(State(c): State<Arc<Console>>) -> Html<String> {
    let (listing, _) = c.listing(None).await;
    Html(services_table(&c, &listing).await)
}

async fn services_table(c: &Console, listing: &Listing) -> String {
    let overrides = c.overrides.list(None).await.unwrap_or_default();
    let mut drained: HashMap<&str, usize> = HashMap::new();
    for ((service, _), o) in &overrides {
        if o.drain {
            *drained.entry(service.as_str()).or_default() += 1;
        }
    }
    let mut rows = String::new();
    for (service, instances) in &listing.services {
        let distinct = |key: &str| {
            let values: BTreeSet<String> = instances
                .iter()
                .filter_map(|i| i.metadata.get(key))
                .collect();
            values.into_iter().collect::<Vec<_>>().join(", ")
        };
        let n_drained = drained.get(service.as_str()).copied().unwrap_or(0);
        let _ = write!(
            rows,
            "<tr><td><a href=\"/service?name={}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            query(service),
            esc(service),
            instances.len(),
            esc(&distinct("zone")),
            esc(&distinct("version")),
            n_drained,
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">no service registered</td></tr>");
    }
    rows
}

fn undecodable(listing: &Listing) -> String {
    if listing.undecodable.is_empty() {
        return String::new();
    }
    let mut rows = String::new();
    for (key, reason) in &listing.undecodable {
        let _ = write!(
            rows,
            "<tr><td class=\"mono\">{}</td><td class=\"warn\">{}</td></tr>",
            esc(key),
            esc(&reason.to_string())
        );
    }
    format!(
        "<h3>Entries that do not decode (clients skip them)</h3>\
         <table><thead><tr><th>Key</th><th>Reason</th></tr></thead><tbody>{rows}</tbody></table>"
    )
}

fn recent(c: &Console) -> String {
    let recent = c.recent.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for e in recent.iter() {
        let field = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        let _ = write!(
            out,
            "<li>{}  {}  {}  {}  {}</li>",
            esc(&field("at")),
            esc(&field("kind")),
            esc(&field("service")),
            esc(&field("id")),
            esc(&field("addr")),
        );
    }
    out
}

/// A JSON document indented for reading (as stored, one line, it ran off
/// the page); what does not parse is shown as stored.
fn pretty_json(raw: &str) -> String {
    serde_json::from_str::<serde_json::Value>(raw)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| raw.to_owned())
}

/// The listing of the service a request names, or the answer refusing a
/// name the schema cannot hold.
async fn service_listing(c: &Console, q: &ServiceQuery) -> Result<(Listing, String), Response> {
    if let Err(e) = c.schema.validate_service(&q.name) {
        return Err((StatusCode::BAD_REQUEST, e.to_string()).into_response());
    }
    Ok(c.listing(Some(&q.name)).await)
}

async fn service_page(State(c): State<Arc<Console>>, Query(q): Query<ServiceQuery>) -> Response {
    let (listing, etcd) = match service_listing(&c, &q).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let (rows, pages) = service_rows(&c, &listing, &q.name, q.page).await;
    let config = match c.configs.get(&q.name).await {
        Ok(Some(stored)) => format!(
            "<p>Service config from etcd (revision {}){}:</p><pre class=\"mono\">{}</pre>",
            stored.revision,
            match &stored.config {
                Ok(_) => String::new(),
                Err(e) => format!(
                    ", <span class=\"warn\">refused by every Balancer: {}</span>",
                    esc(&e.to_string())
                ),
            },
            esc_document(&pretty_json(&stored.json))
        ),
        Ok(None) => {
            "<p>No service config in etcd: each client's own (from its code) applies.</p>".into()
        }
        Err(e) => format!(
            "<p class=\"warn\">service config unreadable: {}</p>",
            esc(&e.to_string())
        ),
    };
    let writes = if c.opts.allow_writes {
        "<p>Token: <input id=\"token\" type=\"password\" size=\"24\"> <span id=\"result\"></span></p>"
    } else {
        "<p><span id=\"result\"></span></p>"
    };
    let src = format!("/fragment/service?name={}&page={}", query(&q.name), q.page);
    let health = format!("/api/health?name={}&page={}", query(&q.name), q.page);
    let mut nav = String::new();
    if pages > 1 {
        for p in 0..pages {
            let _ = write!(
                nav,
                " <a href=\"/service?name={}&page={p}\">{}</a>",
                query(&q.name),
                p + 1
            );
        }
        nav = format!("<p>Pages:{nav}</p>");
    }
    let body = format!(
        "<h2>{}</h2>{writes}{nav}{}{config}",
        esc(&q.name),
        table(
            &[
                "ID",
                "Address",
                "Metadata",
                "Weight",
                "Zone",
                "Lease",
                "TTL left",
                "Registered at rev",
                "Override",
                "Health",
                "Traffic",
                ""
            ],
            &rows,
            &src,
            Some(&health),
        ),
    );
    let live = recent(&c);
    Html(layout(
        &q.name,
        Some(&q.name),
        c.notice(),
        &etcd,
        &body,
        &live,
    ))
    .into_response()
}

async fn service_rows_fragment(
    State(c): State<Arc<Console>>,
    Query(q): Query<ServiceQuery>,
) -> Response {
    let (listing, _) = match service_listing(&c, &q).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    Html(service_rows(&c, &listing, &q.name, q.page).await.0).into_response()
}

/// The rows of page `page` of `service`, and the number of pages.
async fn service_rows(
    c: &Console,
    listing: &Listing,
    service: &str,
    page: usize,
) -> (String, usize) {
    let empty = Vec::new();
    let all = listing.services.get(service).unwrap_or(&empty);
    let pages = all.len().div_ceil(PAGE).max(1);
    let shown: Vec<_> = all.iter().skip(page * PAGE).take(PAGE).collect();
    let infos: Vec<_> = shown
        .iter()
        .map(|i| listing.keys.get(&(service.to_owned(), i.id.clone())))
        .collect();
    let leases = infos.iter().flatten().map(|k| k.lease).collect();
    let ttls = catalog::lease_ttls(&c.client, leases, c.timeout).await;
    let overrides = c.overrides.list(Some(service)).await.unwrap_or_default();
    let mut rows = String::new();
    for (i, info) in shown.iter().zip(&infos) {
        let o = overrides.get(&(service.to_owned(), i.id.clone()));
        let (lease, ttl, rev) = match info {
            Some(k) if k.lease != 0 => {
                let ttl = match ttls.get(&k.lease) {
                    Some((left, granted)) if *left >= 0 => format!("{left} s of {granted} s"),
                    _ => "expired".into(),
                };
                (format!("{:x}", k.lease), ttl, k.create_revision.to_string())
            }
            Some(k) => (
                "none".into(),
                "never expires".into(),
                k.create_revision.to_string(),
            ),
            None => (String::new(), String::new(), String::new()),
        };
        let over = match o {
            Some(o) if o.drain => format!(
                "<span class=\"tag drained\">drained by {}</span>",
                esc(&o.by)
            ),
            Some(o) => format!(
                "<span class=\"tag\">weight {} by {}</span>",
                o.weight.unwrap_or(1),
                esc(&o.by)
            ),
            None => String::new(),
        };
        let actions = if c.opts.allow_writes {
            if o.is_some_and(|o| o.drain) {
                "<button data-action=\"undrain\">Undrain</button>".to_owned()
            } else {
                "<button data-action=\"drain\">Drain</button> <input size=\"3\" value=\"1\"> <button data-action=\"weight\">Set weight</button>".to_owned()
            }
        } else {
            String::new()
        };
        let _ = write!(
            rows,
            "<tr data-id=\"{id}\"><td class=\"mono\">{id}</td><td class=\"mono\">{addr}</td><td class=\"mono\">{meta}</td>\
             <td>{weight}</td><td>{zone}</td><td class=\"mono\">{lease}</td><td>{ttl}</td><td>{rev}</td><td>{over}</td>\
             <td data-probe=\"{id}\">probing…</td><td data-traffic=\"{id}\"></td><td>{actions}</td></tr>",
            id = esc(&i.id),
            addr = esc(&i.addr),
            meta = if i.metadata.is_null() { String::new() } else { esc(&i.metadata.to_string()) },
            weight = esc(&o.and_then(|o| o.weight).map_or_else(|| i.metadata.get("weight").unwrap_or_else(|| "1".into()), |w| w.to_string())),
            zone = esc(&i.metadata.get("zone").unwrap_or_default()),
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"11\">no instance registered</td></tr>");
    }
    (rows, pages)
}

/// Probes page `page` of a service: id -> {status, ms}.
async fn health(State(c): State<Arc<Console>>, Query(q): Query<ServiceQuery>) -> Response {
    let (listing, _) = match service_listing(&c, &q).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let instances: Vec<(String, String)> = listing
        .services
        .get(&q.name)
        .map(|all| {
            all.iter()
                .skip(q.page * PAGE)
                .take(PAGE)
                .map(|i| (i.id.clone(), i.addr.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for (id, p) in probe_all(instances, PROBE_TIMEOUT).await {
        let ms = format!("{:.1}", p.latency.as_secs_f64() * 1e3);
        out.insert(
            id,
            serde_json::json!({"status": p.status, "ms": ms, "traffic": p.traffic}),
        );
    }
    Json(out).into_response()
}

async fn etcd_page(State(c): State<Arc<Console>>) -> Html<String> {
    let mut client = c.client.clone();
    let t = c.timeout;
    let mut body = String::from("<h2>etcd</h2>");
    let status = tokio::time::timeout(t, client.status()).await;
    let mut banner = String::new();
    match status {
        Ok(Ok(s)) => {
            let _ = write!(
                body,
                "<table><tbody><tr><th>Version</th><td>{}</td></tr><tr><th>Leader</th><td class=\"mono\">{:x}</td></tr>\
                 <tr><th>Revision</th><td>{}</td></tr><tr><th>Raft index / applied</th><td>{} / {}</td></tr>\
                 <tr><th>Database size</th><td>{} bytes ({} in use)</td></tr></tbody></table>",
                esc(s.version()),
                s.leader(),
                s.header().map_or(0, |h| h.revision()),
                s.raft_index(),
                s.raft_applied_index(),
                s.db_size(),
                s.raft_used_db_size(),
            );
        }
        Ok(Err(e)) => banner = format!("etcd unreachable: {e}"),
        Err(_) => banner = format!("etcd unreachable: no answer in {t:?}"),
    }
    if let Ok(Ok(members)) = tokio::time::timeout(t, client.member_list()).await {
        let mut rows = String::new();
        for m in members.members() {
            let _ = write!(
                rows,
                "<tr><td class=\"mono\">{:x}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
                m.id(),
                esc(m.name()),
                esc(&m.client_urls().join(", ")),
                esc(&m.peer_urls().join(", ")),
                if m.is_learner() { "learner" } else { "voter" },
            );
        }
        let _ = write!(
            body,
            "<h3>Members</h3><table><thead><tr><th>ID</th><th>Name</th><th>Client URLs</th><th>Peer URLs</th><th>Role</th></tr></thead><tbody>{rows}</tbody></table>"
        );
    }
    if let Ok(Ok(alarms)) = tokio::time::timeout(
        t,
        client.alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        ),
    )
    .await
    {
        let list: Vec<String> = alarms
            .alarms()
            .iter()
            .map(|a| format!("{:?} on {:x}", a.alarm(), a.member_id()))
            .collect();
        let _ = write!(
            body,
            "<h3>Alarms</h3><p>{}</p>",
            if list.is_empty() {
                "none".to_owned()
            } else {
                esc(&list.join(", "))
            }
        );
    }
    Html(layout(
        "etcd",
        None,
        c.notice(),
        &banner,
        &body,
        &recent(&c),
    ))
}

async fn live_events(
    State(c): State<Arc<Console>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = BroadcastStream::new(c.events.subscribe()).filter_map(|e| {
        // A page that fell behind skips what it missed: it reloads its
        // table on the next event anyway.
        e.ok().map(|e| Ok(Event::default().data(e.to_string())))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(serde::Deserialize)]
struct OverrideRequest {
    service: String,
    id: String,
    action: String,
    weight: Option<u32>,
}

async fn set_override(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    Json(req): Json<OverrideRequest>,
) -> Response {
    if let Some(reason) = &c.read_only_reason {
        return (StatusCode::FORBIDDEN, reason.clone()).into_response();
    }
    let secret = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let Some(who) = c.opts.tokens.get(secret).cloned() else {
        tracing::warn!(service = %req.service, id = %req.id, action = %req.action,
            "console write refused: no valid token");
        return (
            StatusCode::UNAUTHORIZED,
            "a valid token is required".to_owned(),
        )
            .into_response();
    };
    let result = match req.action.as_str() {
        "drain" => {
            c.overrides
                .set(&req.service, &req.id, &Override::drain(&who))
                .await
        }
        "undrain" => c.overrides.remove(&req.service, &req.id).await.map(drop),
        "weight" => match Override::weight(req.weight.unwrap_or(0), &who) {
            Ok(o) => c.overrides.set(&req.service, &req.id, &o).await,
            Err(e) => Err(e),
        },
        other => {
            return (StatusCode::BAD_REQUEST, format!("unknown action {other:?}")).into_response()
        }
    };
    match result {
        Ok(()) => {
            // The live list learns of it from etcd, as of any other write.
            tracing::info!(%who, service = %req.service, id = %req.id, action = %req.action,
                weight = ?req.weight, "console write");
            (
                StatusCode::OK,
                format!("{} {} by {who}: done", req.action, req.id),
            )
                .into_response()
        }
        Err(e @ Error::UnknownInstance { .. }) => {
            (StatusCode::NOT_FOUND, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
