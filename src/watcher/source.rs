//! What a view reads from etcd, behind one small trait.
//!
//! The watch task's timing (idle progress requests, silence, back-off,
//! compaction, revision regressions) is tested on tokio's paused clock
//! against an in-memory [`Source`]; the integration tests run the same task
//! against real etcd through the `Etcd` implementation below. Limits
//! and retries are the task's, so a source call may hang forever like a
//! partitioned etcd does.

use std::future::Future;
use std::time::Duration;

use etcd_client::{EventType, GetOptions};

use super::multiplex::{ReadGate, SharedWatch};
use crate::Etcd;

pub(super) type EtcdResult<T> = Result<T, etcd_client::Error>;

/// tonic's default 4 MiB decode limit is below what etcd sends when a watch
/// catches up on a backlog or a page holds large values; the limit on what
/// etcd accepts (`--max-request-bytes`) bounds each entry anyway.
pub(crate) const MAX_DECODE: usize = 256 << 20;

/// A key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) mod_revision: i64,
    /// When the key was created (its registration, for an instance).
    pub(crate) create_revision: i64,
    /// The lease it is bound to (0: none).
    pub(crate) lease: i64,
}

/// The revision a response was served at, and the cluster that served it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) revision: i64,
    pub(crate) cluster_id: u64,
}

/// One page of a range read.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) header: Header,
    pub(crate) entries: Vec<Entry>,
    pub(crate) more: bool,
}

/// One event of a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Put(Entry),
    Delete(Entry),
}

/// One response of a watch stream.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reply {
    pub(crate) header: Option<Header>,
    pub(crate) created: bool,
    pub(crate) canceled: bool,
    /// Above zero when the start revision was compacted.
    pub(crate) compact_revision: i64,
    pub(crate) cancel_reason: String,
    /// Empty in a progress notification.
    pub(crate) events: Vec<Event>,
}

/// What a view needs from etcd.
pub(crate) trait Source: Clone + Send + Sync + 'static {
    /// One watch stream.
    type Watch: WatchStream;

    /// At most `limit` keys of `[from, end)` in key order, at `revision`
    /// (0: the current one), linearizable.
    fn page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: i64,
    ) -> impl Future<Output = EtcdResult<Page>> + Send;

    /// Watches every key under `prefix` from `start_revision`, with progress
    /// notifications and without fragments.
    fn watch(
        &self,
        prefix: String,
        start_revision: i64,
    ) -> impl Future<Output = EtcdResult<Self::Watch>> + Send;

    /// Where the liveness reads of this source's watches meet, when they
    /// share a connection (see `watcher::check_alive`).
    fn read_gate(&self) -> Option<&ReadGate> {
        None
    }

    /// Gets a fresh token for this source's watches (see
    /// `Multiplexer::reauthenticate`).
    fn reauthenticate(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// An open watch.
pub(crate) trait WatchStream: Send + 'static {
    /// The next response, or `None` when the stream ended. Cancel-safe.
    fn next(&mut self) -> impl Future<Output = EtcdResult<Option<Reply>>> + Send;

    /// Asks etcd for a progress notification.
    fn request_progress(&mut self) -> impl Future<Output = EtcdResult<()>> + Send;

    /// Whether the stream under this watch received anything within `age`
    /// (for another watch, when it is shared): then it is alive without
    /// asking.
    fn heard_within(&self, _age: Duration) -> bool {
        false
    }
}

fn header(h: Option<&etcd_client::ResponseHeader>) -> Header {
    h.map_or_else(Header::default, |h| Header {
        revision: h.revision(),
        cluster_id: h.cluster_id(),
    })
}

impl Source for Etcd {
    /// On the client's one shared stream (`multiplex.rs`).
    type Watch = SharedWatch;

    async fn page(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: i64,
    ) -> EtcdResult<Page> {
        // No sort option: etcd returns keys in order anyway, and any sort
        // makes it read the whole rest of the range for every page (it
        // applies the limit only after sorting).
        let mut opts = GetOptions::new().with_range(end).with_limit(limit);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut kv = self
            .client()
            .kv_client()
            .max_decoding_message_size(MAX_DECODE);
        let mut resp = kv.get(from, Some(opts)).await?;
        let entries = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let (mod_revision, create_revision, lease) =
                    (kv.mod_revision(), kv.create_revision(), kv.lease());
                // Moves the bytes out: no copy of a large listing.
                let (key, value) = kv.into_key_value();
                Entry {
                    key,
                    value,
                    mod_revision,
                    create_revision,
                    lease,
                }
            })
            .collect();
        Ok(Page {
            header: header(resp.header()),
            entries,
            more: resp.more(),
        })
    }

    /// On the client's one stream, shared with its other watches.
    async fn watch(&self, prefix: String, start_revision: i64) -> EtcdResult<Self::Watch> {
        Ok(self.watches().watch(prefix.into_bytes(), start_revision))
    }

    fn read_gate(&self) -> Option<&ReadGate> {
        Some(self.watches().reads())
    }

    async fn reauthenticate(&self) {
        self.watches().reauthenticate().await;
    }
}

/// A watch response as the views read it.
pub(crate) fn reply(resp: etcd_client::WatchResponse) -> Reply {
    let events = resp
        .events()
        .iter()
        .filter_map(|e| {
            let kv = e.kv()?;
            let entry = Entry {
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
                lease: kv.lease(),
            };
            Some(match e.event_type() {
                EventType::Put => Event::Put(entry),
                EventType::Delete => Event::Delete(entry),
            })
        })
        .collect();
    Reply {
        header: resp.header().map(|h| header(Some(h))),
        created: resp.created(),
        canceled: resp.canceled(),
        compact_revision: resp.compact_revision(),
        cancel_reason: resp.cancel_reason().to_owned(),
        events,
    }
}
