//! Service configs in etcd, watched live by the Balancer, against real etcd
//! and a real tonic server: a document applies to the next call, a broken
//! one is refused and the last good one stays, deleting it brings the
//! builder's back, the first call already runs under it, and the opt-out
//! ignores it.

#[path = "common/backend.rs"]
mod backend;
mod common;

use std::time::Duration;

use backend::Backend;
use common::{eventually, unique};
use tonic::Code;
use tonic_etcd::balancer::OutlierDetection;
use tonic_etcd::config_store::ConfigSource;
use tonic_etcd::testing::greeter::{Greeter, GreeterClient, HelloRequest};
use tonic_etcd::testing::shared;
use tonic_etcd::{Balancer, BalancerBuilder, ConfigStore, Metadata, NamingSchema, Registration};

const LIMIT: Duration = Duration::from_secs(10);

/// Retries UNAVAILABLE up to three attempts for every greeter method.
const RETRY: &str = r#"{"methodConfig":[{"name":[{"service":"greeter.v1.Greeter"}],
  "retryPolicy":{"maxAttempts":3,"initialBackoff":"0.001s","maxBackoff":"0.001s",
  "backoffMultiplier":1,"retryableStatusCodes":["UNAVAILABLE"]}}]}"#;

struct Setup {
    backend: Backend,
    _reg: Registration,
    svc: String,
    client: tonic_etcd::Etcd,
}

async fn setup() -> Setup {
    let client = shared().client().await;
    let svc = unique("config");
    let backend = Backend::start_with("127.0.0.1:0", Greeter::new("g0"), false);
    let reg = common::register_with(&client, &svc, &backend.addr, Metadata::new()).await;
    Setup {
        backend,
        _reg: reg,
        svc,
        client,
    }
}

impl Setup {
    async fn balancer(
        &self,
        configure: impl FnOnce(BalancerBuilder) -> BalancerBuilder,
    ) -> Balancer {
        let builder = Balancer::builder(self.client.clone(), &self.svc)
            .outlier_detection(OutlierDetection::disabled());
        let balancer = configure(builder).build().unwrap();
        balancer.wait_for_ready(1, LIMIT).await.unwrap();
        balancer
    }

    fn store(&self) -> ConfigStore {
        ConfigStore::new(self.client.clone())
    }

    /// Whether a call that fails once with UNAVAILABLE is retried.
    async fn retried(&self, balancer: &Balancer) -> bool {
        self.backend.fail.fail_next(1, Code::Unavailable);
        let mut request = tonic::Request::new(HelloRequest { name: "c".into() });
        request.set_timeout(LIMIT);
        match GreeterClient::new(balancer.clone())
            .say_hello(request)
            .await
        {
            Ok(_) => true,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                false
            }
        }
    }
}

/// Waits until `balancer`'s config status satisfies `check`.
async fn until(
    balancer: &Balancer,
    what: &str,
    check: impl Fn(&tonic_etcd::ServiceConfigStatus) -> bool,
) {
    eventually(LIMIT, what, || async {
        check(&balancer.service_config()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_in_etcd_applies_live_and_a_broken_one_is_refused() {
    let s = setup().await;
    let b = s.balancer(|b| b).await;
    until(&b, "etcd read", |c| c.synced).await;
    assert_eq!(b.service_config().source, ConfigSource::Builder);
    assert!(!s.retried(&b).await, "no policy yet");

    let written = s.store().set(&s.svc, RETRY).await.unwrap();
    until(
        &b,
        "the etcd config in force",
        |c| matches!(c.source, ConfigSource::Etcd { revision, .. } if revision == written),
    )
    .await;
    assert!(s.retried(&b).await, "the policy from etcd retries");

    // Not JSON, then JSON that does not validate: each refused whole, the
    // last good config stays in force.
    let key = s.store().key(&s.svc).unwrap();
    let mut raw = s.client.clone();
    raw.put(key.as_str(), r#"{"methodConfig": ["#, None)
        .await
        .unwrap();
    until(&b, "the broken document refused", |c| {
        c.rejected
            .as_ref()
            .is_some_and(|r| r.reason.contains("JSON"))
    })
    .await;
    assert!(
        matches!(b.service_config().source, ConfigSource::Etcd { revision, .. } if revision == written)
    );
    assert!(s.retried(&b).await, "the last good policy still retries");
    raw.put(
        key.as_str(),
        RETRY.replace("\"maxAttempts\":3", "\"maxAttempts\":1"),
        None,
    )
    .await
    .unwrap();
    until(&b, "the invalid document refused", |c| {
        c.rejected
            .as_ref()
            .is_some_and(|r| r.reason.contains("maxAttempts"))
    })
    .await;
    assert!(s.retried(&b).await, "the last good policy still retries");

    // Deleted: the builder's config (none) is in force again.
    assert!(s.store().remove(&s.svc).await.unwrap());
    until(&b, "back to the builder's", |c| {
        c.source == ConfigSource::Builder && c.rejected.is_none()
    })
    .await;
    assert!(!s.retried(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_already_runs_under_the_etcd_config() {
    let s = setup().await;
    s.store().set(&s.svc, RETRY).await.unwrap();
    // No wait for the config: the balancer holds its endpoints back until
    // the config is read.
    let b = s.balancer(|b| b).await;
    assert!(
        matches!(b.service_config().source, ConfigSource::Etcd { .. }),
        "{:?}",
        b.service_config()
    );
    assert!(s.retried(&b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_config_replaces_the_builders_and_can_be_ignored() {
    let s = setup().await;
    s.store().set(&s.svc, RETRY).await.unwrap();
    let none = tonic_etcd::ServiceConfig::from_json("{}").unwrap();
    let b = s
        .balancer(|b| {
            b.service_config(none.clone())
                .service_config_from_etcd(false)
        })
        .await;
    let status = b.service_config();
    assert_eq!(status.source, ConfigSource::Builder);
    assert!(!status.synced, "etcd is not asked");
    assert!(
        !s.retried(&b).await,
        "the builder's config, without a policy"
    );

    let retry = tonic_etcd::ServiceConfig::from_json(RETRY).unwrap();
    let b = s.balancer(|b| b.service_config(retry)).await;
    s.store()
        .set(&s.svc, r#"{"methodConfig":[{"name":[{}],"timeout":"5s"}]}"#)
        .await
        .unwrap();
    until(&b, "etcd's replaces the builder's", |c| {
        c.config.method_configs[0].policy.is_none()
    })
    .await;
    assert!(!s.retried(&b).await);
}

#[tokio::test]
async fn set_validates_before_writing_and_keys_stay_out_of_the_registry() {
    let s = setup().await;
    let store = s.store();
    let err = store
        .set(
            &s.svc,
            r#"{"methodConfig":[{"name":[{}],"timeout":"soon"}]}"#,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(
        store.get(&s.svc).await.unwrap().is_none(),
        "nothing written"
    );

    store.set(&s.svc, RETRY).await.unwrap();
    let stored = store.get(&s.svc).await.unwrap().unwrap();
    assert_eq!(stored.json, RETRY);
    assert!(stored.config.is_ok());
    // Not where etcd's Go resolver (prefix `<service>`) or a registry
    // listing would take it for an instance.
    let key = store.key(&s.svc).unwrap();
    assert!(!key.starts_with(&s.svc), "{key}");
    let listing = tonic_etcd::catalog::list(&s.client, &NamingSchema::new(), None, LIMIT)
        .await
        .unwrap();
    assert!(
        listing
            .services
            .keys()
            .all(|svc| !svc.starts_with("_tonic-etcd")),
        "{:?}",
        listing.services.keys().collect::<Vec<_>>()
    );
    assert!(listing.services.contains_key(&s.svc));
}
