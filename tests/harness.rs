//! The real-etcd harness works end to end: single node restarts keep data,
//! wipes lose it, and a 3-member cluster survives losing a member.

use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use tonic_etcd::testing::{Etcd, EtcdCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_lease_watch_restart_and_wipe() {
    let t0 = Instant::now();
    let etcd = Etcd::start();
    eprintln!("etcd started in {:?}", t0.elapsed());
    let mut client = etcd.client().await;

    let lease = client.lease_grant(30, None).await.unwrap().id();
    let mut watch = client
        .watch("harness/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    client
        .put("harness/a", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let event = loop {
        let resp = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("watch event within 5 s")
            .unwrap()
            .expect("watch stream open");
        if let Some(e) = resp.events().first() {
            break e.clone();
        }
    };
    assert_eq!(event.event_type(), EventType::Put);
    assert_eq!(event.kv().unwrap().key(), b"harness/a");
    assert_eq!(event.kv().unwrap().lease(), lease);

    let t0 = Instant::now();
    etcd.restart();
    eprintln!("etcd restarted in {:?}", t0.elapsed());
    // The old watch stream dies with the connection; unary calls reconnect.
    let resp = get_with_retry(&mut client, "harness/a").await;
    assert_eq!(resp.kvs().len(), 1, "the leased key survives a restart");
    assert_eq!(resp.kvs()[0].lease(), lease);

    etcd.wipe_and_restart();
    let resp = get_with_retry(&mut client, "harness/a").await;
    assert!(resp.kvs().is_empty(), "a wiped etcd has no keys");
}

async fn get_with_retry(client: &mut etcd_client::Client, key: &str) -> etcd_client::GetResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get(key, None).await {
            Ok(r) => return r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("get after restart: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("etcd did not come back: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_survives_a_killed_member() {
    let t0 = Instant::now();
    let cluster = EtcdCluster::start();
    eprintln!("3-member cluster started in {:?}", t0.elapsed());
    assert_eq!(cluster.len(), 3);
    let mut c0 = cluster.member_client(0).await;
    c0.put("cluster/k", "before", None).await.unwrap();

    cluster.kill_member(0);
    // Members 1 and 2 still form a quorum: both read and write.
    let mut c1 = cluster.member_client(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c1.put("cluster/k", "after", None).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("put during re-election: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the surviving quorum refused a write: {e}"),
        }
    }
    let mut c2 = cluster.member_client(2).await;
    let got = c2.get("cluster/k", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"after");

    cluster.restart_member(0);
    // The restarted member catches up with what it missed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = c0
            .get("cluster/k", Some(GetOptions::new().with_serializable()))
            .await;
        if let Ok(r) = &got {
            if r.kvs().first().map(|kv| kv.value()) == Some(b"after".as_slice()) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "member 0 did not catch up: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
