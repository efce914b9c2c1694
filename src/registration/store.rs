//! The etcd operations a registration makes, behind one small trait.
//!
//! The worker's timing (keep-alive interval, silence detection, back-off,
//! start-up deadline, cancellation) is the hard part of registration and is
//! tested on tokio's paused clock against an in-memory [`Store`]; the
//! integration tests run the same worker against real etcd through the
//! [`Client`] implementation below. Limits and retries are the worker's
//! (through [`crate::retry`]), so a store call may hang forever like a
//! partitioned etcd does.

use std::future::Future;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::schema::Encoded;

pub(super) type EtcdResult<T> = Result<T, etcd_client::Error>;

/// What registration needs from etcd.
pub(super) trait Store: Clone + Send + Sync + 'static {
    /// One keep-alive stream for one lease.
    type KeepAlive: KeepAlive;

    /// Grants a lease of `ttl` seconds.
    fn grant(&self, ttl: i64) -> impl Future<Output = EtcdResult<i64>> + Send;

    /// Writes every entry under `lease` atomically; returns, per key that
    /// existed, the lease it was held by.
    fn put(
        &self,
        entries: &[Encoded],
        lease: i64,
    ) -> impl Future<Output = EtcdResult<Vec<(String, i64)>>> + Send;

    /// Opens a keep-alive stream; opening it renews the lease once.
    fn attach(&self, lease: i64) -> impl Future<Output = EtcdResult<Self::KeepAlive>> + Send;

    /// Whether every entry holds its value under `lease`. Must cost etcd no
    /// write (see [`Client`]'s implementation).
    fn intact(
        &self,
        entries: &[Encoded],
        lease: i64,
    ) -> impl Future<Output = EtcdResult<bool>> + Send;

    /// Writes every entry under `lease` unless all are intact; true when it
    /// wrote.
    fn restore(
        &self,
        entries: &[Encoded],
        lease: i64,
    ) -> impl Future<Output = EtcdResult<bool>> + Send;

    /// Deletes `keys` (keys dropped from a shared lease's set).
    fn delete(&self, keys: &[String]) -> impl Future<Output = EtcdResult<()>> + Send;

    /// Revokes `lease`, deleting its keys.
    fn revoke(&self, lease: i64) -> impl Future<Output = EtcdResult<()>> + Send;

    /// Whether etcd has a leader and is more than a few entries behind in
    /// applying what it committed: a write that is slow to answer is then
    /// queued, not dropped. Costs etcd no proposal.
    fn behind(&self) -> impl Future<Output = EtcdResult<bool>> + Send;
}

/// A lease's keep-alive stream.
pub(super) trait KeepAlive: Send + 'static {
    /// Asks etcd to renew the lease.
    fn send(&mut self) -> impl Future<Output = EtcdResult<()>> + Send;

    /// The next answer: the lease's remaining TTL (0 when it is gone), or
    /// `None` when the stream ended. Cancel-safe.
    fn next(&mut self) -> impl Future<Output = EtcdResult<Option<i64>>> + Send;
}

/// Entries per transaction: two compares each, within etcd's default
/// limit of 128 operations. A server's registration fits in one (the
/// builder refuses more); a process's shared lease may hold more keys, and
/// its writes and checks go in several transactions (one key does not need
/// another's to be atomic).
const TXN_ENTRIES: usize = super::MAX_SERVICES;

fn compares(entries: &[Encoded], lease: i64) -> Vec<Compare> {
    entries
        .iter()
        .flat_map(|e| {
            [
                Compare::value(e.key.as_str(), CompareOp::Equal, e.value.clone()),
                Compare::lease(e.key.as_str(), CompareOp::Equal, lease),
            ]
        })
        .collect()
}

fn put_ops(entries: &[Encoded], opts: &PutOptions) -> Vec<TxnOp> {
    entries
        .iter()
        .map(|e| TxnOp::put(e.key.as_str(), e.value.clone(), Some(opts.clone())))
        .collect()
}

impl Store for Client {
    type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

    async fn grant(&self, ttl: i64) -> EtcdResult<i64> {
        Ok(self.clone().lease_grant(ttl, None).await?.id())
    }

    async fn put(&self, entries: &[Encoded], lease: i64) -> EtcdResult<Vec<(String, i64)>> {
        let opts = PutOptions::new().with_lease(lease).with_prev_key();
        let mut previous = Vec::new();
        if let [only] = entries {
            // One key needs no transaction: a plain put is atomic and cheaper.
            let resp = Client::put(
                &mut self.clone(),
                only.key.clone(),
                only.value.clone(),
                Some(opts),
            )
            .await?;
            previous.push(resp.prev_key().cloned());
        } else {
            for chunk in entries.chunks(TXN_ENTRIES) {
                let txn = Txn::new().and_then(put_ops(chunk, &opts));
                let resp = self.clone().txn(txn).await?;
                previous.extend(resp.op_responses().into_iter().map(|op| match op {
                    TxnOpResponse::Put(put) => put.prev_key().cloned(),
                    _ => None,
                }));
            }
        }
        Ok(previous
            .into_iter()
            .flatten()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
            .collect())
    }

    async fn attach(&self, lease: i64) -> EtcdResult<Self::KeepAlive> {
        self.clone().lease_keep_alive(lease).await
    }

    /// A transaction of compares with no operation in either branch: etcd
    /// serves it on its read path (`isTxnReadonly` holds only when every op
    /// is a range), so a healthy registration costs etcd no Raft proposal and
    /// no WAL write between keep-alives, which are not proposals either.
    async fn intact(&self, entries: &[Encoded], lease: i64) -> EtcdResult<bool> {
        for chunk in entries.chunks(TXN_ENTRIES) {
            let check = Txn::new().when(compares(chunk, lease));
            if !self.clone().txn(check).await?.succeeded() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Guarded by the same compares, so a concurrent repair by another
    /// attempt writes nothing twice.
    async fn restore(&self, entries: &[Encoded], lease: i64) -> EtcdResult<bool> {
        let mut wrote = false;
        for chunk in entries.chunks(TXN_ENTRIES) {
            let puts = put_ops(chunk, &PutOptions::new().with_lease(lease));
            let txn = Txn::new().when(compares(chunk, lease)).or_else(puts);
            wrote |= !self.clone().txn(txn).await?.succeeded();
        }
        Ok(wrote)
    }

    async fn delete(&self, keys: &[String]) -> EtcdResult<()> {
        for chunk in keys.chunks(2 * TXN_ENTRIES) {
            let deletes = chunk.iter().map(|k| TxnOp::delete(k.as_str(), None));
            self.clone()
                .txn(Txn::new().and_then(deletes.collect::<Vec<_>>()))
                .await?;
        }
        Ok(())
    }

    async fn revoke(&self, lease: i64) -> EtcdResult<()> {
        self.clone().lease_revoke(lease).await.map(drop)
    }

    /// From the member's status (`raftIndex` - `raftAppliedIndex`, etcd 3.4
    /// and later; an etcd without the field reads as not behind).
    async fn behind(&self) -> EtcdResult<bool> {
        let status = self.clone().status().await?;
        let backlog = status
            .raft_index()
            .saturating_sub(status.raft_applied_index());
        Ok(status.leader() != 0 && status.raft_applied_index() != 0 && backlog > BEHIND)
    }
}

/// Entries committed but not applied beyond which etcd counts as behind:
/// it applies a few thousand a second, and an idle one is within a handful.
const BEHIND: u64 = 100;

impl KeepAlive for (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream) {
    async fn send(&mut self) -> EtcdResult<()> {
        self.0.keep_alive().await
    }

    async fn next(&mut self) -> EtcdResult<Option<i64>> {
        Ok(self.1.message().await?.map(|r| r.ttl()))
    }
}
