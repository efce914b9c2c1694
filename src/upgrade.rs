//! Moving keys written by an earlier layout: `tonic-etcd upgrade-keys`.
//!
//! Before 0.2 this crate kept a namespace's service configs and overrides
//! outside the namespace, at `_tonic-etcd/<kind>/<namespace prefix>…`, so
//! a role on the namespace's prefix did not cover them. They now live at
//! `<namespace prefix>_tonic-etcd/<kind>/…` ([`Reserved`]). Without a
//! namespace the two are the same key and nothing moves.
//!
//! An upgrade copies first and removes later, so that clients of both
//! versions read a config during a rolling upgrade:
//!
//! 1. [`plan`] lists what would move; [`apply`] copies each key to its new
//!    place, with its value and lease, unless something is already there
//!    (a newer client's write wins);
//! 2. once every client runs the new version, [`apply`] with `remove_old`
//!    deletes the old keys whose copy exists, each only if it has not
//!    changed since it was read.
//!
//! Client keys of coordinated subsetting are not moved: they live as long
//! as their client's lease, and a restarted client writes its own in the
//! new place. An override whose instance is no longer registered under the
//! same lease is left behind (it is dead; its lease takes it away).

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::retry::with_timeout;
use crate::schema::{Reserved, Schema};
use crate::watcher::source::Entry;
use crate::{Error, Etcd};

/// One key of the old layout and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Move {
    /// What it is.
    pub kind: Reserved,
    /// Its key in the old layout.
    pub from: String,
    /// Its key in the new layout.
    pub to: String,
    /// The lease it is bound to (0: none); the copy is bound to the same.
    pub lease: i64,
    /// What happened to it (or would, for a plan).
    pub outcome: Outcome,
    mod_revision: i64,
    value: Vec<u8>,
}

/// What [`apply`] did with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not done yet (a plan).
    Planned,
    /// Copied to its new key.
    Copied,
    /// The new key already existed: left as it is.
    Exists,
    /// Its lease ended before the copy: nothing to move.
    Expired,
    /// An override whose instance is gone: left to its lease.
    Stale,
    /// The old key was removed (its copy exists).
    Removed,
    /// The old key changed since it was read: left, run again.
    Changed,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Planned => "to copy",
            Self::Copied => "copied",
            Self::Exists => "new key exists, left as is",
            Self::Expired => "lease ended, nothing to move",
            Self::Stale => "instance gone, left to its lease",
            Self::Removed => "old key removed",
            Self::Changed => "old key changed meanwhile, run again",
        })
    }
}

/// The keys of `schema`'s namespace that are still in the old layout.
/// Empty without a namespace (the layouts agree there).
pub async fn plan(etcd: &Etcd, schema: &dyn Schema, timeout: Duration) -> Result<Vec<Move>, Error> {
    if schema.root_prefix().is_empty() {
        return Ok(Vec::new());
    }
    let mut moves = Vec::new();
    for kind in [Reserved::ServiceConfig, Reserved::Overrides] {
        let old = kind.legacy_prefix(schema);
        let new = kind.prefix(schema);
        let mut entries: Vec<Entry> = Vec::new();
        crate::watcher::list_prefix(etcd, &old, timeout, |page| entries.extend(page)).await?;
        for e in entries {
            let Ok(from) = String::from_utf8(e.key) else {
                continue;
            };
            let to = format!("{new}{}", &from[old.len()..]);
            moves.push(Move {
                kind,
                from,
                to,
                lease: e.lease,
                outcome: Outcome::Planned,
                mod_revision: e.mod_revision,
                value: e.value,
            });
        }
    }
    Ok(moves)
}

/// Copies each planned key to its new place (or, with `remove_old`, also
/// removes the old keys whose copy exists). See the [module docs](self).
pub async fn apply(
    etcd: &Etcd,
    schema: &dyn Schema,
    remove_old: bool,
    timeout: Duration,
) -> Result<Vec<Move>, Error> {
    let mut moves = plan(etcd, schema, timeout).await?;
    let live = live_instances(etcd, schema, timeout).await?;
    for m in &mut moves {
        let alive = |(service, id)| live.contains(&(service, id, m.lease));
        m.outcome = if m.kind == Reserved::Overrides && !m.instance(schema).is_some_and(alive) {
            Outcome::Stale
        } else {
            copy(etcd, m, timeout).await?
        };
        if remove_old && matches!(m.outcome, Outcome::Copied | Outcome::Exists) {
            m.outcome = remove(etcd, m, timeout).await?;
        }
    }
    Ok(moves)
}

impl Move {
    /// The service and instance id an override belongs to.
    fn instance(&self, schema: &dyn Schema) -> Option<(String, String)> {
        let rest = self.to.get(Reserved::Overrides.prefix(schema).len()..)?;
        let (service, id) = rest.rsplit_once('/')?;
        Some((service.to_owned(), id.to_owned()))
    }
}

/// Service, instance id and lease of every registered instance of the
/// namespace.
async fn live_instances(
    etcd: &Etcd,
    schema: &dyn Schema,
    timeout: Duration,
) -> Result<std::collections::HashSet<(String, String, i64)>, Error> {
    let listing = crate::catalog::list(etcd, schema, None, timeout).await?;
    Ok(listing
        .keys
        .into_iter()
        .map(|((service, id), info)| (service, id, info.lease))
        .collect())
}

async fn copy(etcd: &Etcd, m: &Move, timeout: Duration) -> Result<Outcome, Error> {
    let opts = (m.lease != 0).then(|| PutOptions::new().with_lease(m.lease));
    let txn = Txn::new()
        .when([Compare::create_revision(m.to.as_str(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(m.to.as_str(), m.value.clone(), opts)]);
    let resp = with_timeout("copy key", timeout, || {
        let (mut c, txn) = (etcd.clone(), txn.clone());
        async move { c.txn(txn).await }
    })
    .await;
    match resp {
        Ok(r) if r.succeeded() => Ok(Outcome::Copied),
        Ok(_) => Ok(Outcome::Exists),
        Err(e) if m.lease != 0 && e.is_lease_not_found() => Ok(Outcome::Expired),
        Err(e) => Err(e),
    }
}

async fn remove(etcd: &Etcd, m: &Move, timeout: Duration) -> Result<Outcome, Error> {
    let txn = Txn::new()
        .when([Compare::mod_revision(
            m.from.as_str(),
            CompareOp::Equal,
            m.mod_revision,
        )])
        .and_then([TxnOp::delete(m.from.as_str(), None)]);
    let resp = with_timeout("remove old key", timeout, || {
        let (mut c, txn) = (etcd.clone(), txn.clone());
        async move { c.txn(txn).await }
    })
    .await?;
    Ok(if resp.succeeded() {
        Outcome::Removed
    } else {
        Outcome::Changed
    })
}
