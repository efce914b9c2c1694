//! The crate's error type.

use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong in this crate.
///
/// Configuration errors are returned before anything touches etcd and say
/// what to change. Runtime faults of etcd (restarts, lost leases, compaction)
/// are *not* errors: the background tasks recover from them and report them
/// through state channels and `tracing`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A service name is empty or contains something the schema cannot store.
    #[error("invalid service name {name:?}: {reason}")]
    InvalidServiceName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An address is not `host:port`, `[ipv6]:port` or `hostname:port`.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The rejected address.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The address to advertise is `0.0.0.0` or `[::]`, which no client can dial.
    #[error(
        "cannot advertise the unspecified address {addr:?}: clients cannot dial it; \
         set an advertise address (the IP or host name clients use to reach this server)"
    )]
    UnspecifiedAddress {
        /// The rejected address.
        addr: String,
    },

    /// A lease TTL below etcd's minimum.
    #[error("lease TTL {ttl:?} is below etcd's minimum of 2 s; use at least 2 s (default 10 s)")]
    TtlTooShort {
        /// The rejected TTL.
        ttl: Duration,
    },

    /// No instance with this id is registered for the service.
    #[error(
        "no instance {id:?} of service {service:?} is registered \
         (give an id or address as `tonic-etcd list {service}` shows them)"
    )]
    UnknownInstance {
        /// The service.
        service: String,
        /// The instance id asked for.
        id: String,
    },

    /// Any other invalid configuration: the message says what to fix.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A service config (gRPC's JSON) was refused whole: `field` is where
    /// (`methodConfig[0].retryPolicy.maxAttempts`), `reason` what is wrong
    /// with its value.
    #[error("invalid service config: {field}: {reason}")]
    InvalidServiceConfig {
        /// The path of the field in the JSON document.
        field: String,
        /// What is wrong, with the value.
        reason: String,
    },

    /// The schema cannot represent this instance (e.g. an IPv6 address in colon keys).
    #[error("the {schema} schema cannot represent this: {reason}")]
    Unrepresentable {
        /// The schema's name.
        schema: &'static str,
        /// What cannot be represented, and what to use instead.
        reason: String,
    },

    /// An etcd request failed.
    #[error("etcd {op} failed: {source}")]
    Etcd {
        /// What was being done.
        op: &'static str,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },

    /// etcd refused a request for the user's permissions: the message names
    /// the grant to add. Retried at most once a minute, never in a loop.
    #[error(
        "etcd refused to let this user {access} {key:?} ({source}); grant its role \
         `etcdctl role grant-permission <role> {access} {key} --prefix`"
    )]
    Refused {
        /// `read` or `readwrite`: the permission missing.
        access: &'static str,
        /// The key or prefix the request was for.
        key: String,
        /// etcd's answer.
        #[source]
        source: Arc<Error>,
    },

    /// etcd ended a stream (watch or keep-alive) that should have stayed open.
    #[error("etcd ended the {0} stream")]
    StreamEnded(&'static str),

    /// An etcd request did not complete in time.
    #[error("etcd {op} did not complete within {timeout:?}")]
    Timeout {
        /// What was being done.
        op: &'static str,
        /// The limit that passed.
        timeout: Duration,
    },

    /// The registration could not be made within the start-up deadline.
    #[error("could not register with etcd within {deadline:?}: {last_error}")]
    StartupDeadline {
        /// The start-up deadline.
        deadline: Duration,
        /// The last failure seen (its `source()` chain is kept).
        #[source]
        last_error: Arc<Error>,
    },

    /// An instance id is empty or contains something the schema cannot store.
    #[error("invalid instance id {id:?}: {reason}")]
    InvalidInstanceId {
        /// The rejected id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// No endpoint appeared within the time waited for one.
    #[error("no endpoint of service {service:?} appeared within {timeout:?}")]
    NoEndpoints {
        /// The service waited for.
        service: String,
        /// How long was waited.
        timeout: Duration,
    },

    /// A server's load reports (its ORCA stream) could not be read.
    #[error("cannot read the load reports of {addr}: {reason}")]
    LoadReports {
        /// The server's address.
        addr: String,
        /// Why.
        reason: String,
    },

    /// A background task of this crate is gone (its runtime shut down).
    #[error("the background task is gone: {0}")]
    TaskGone(&'static str),

    /// The tonic server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// An I/O error (binding a listener, reading its address).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether etcd is overloaded rather than away: it refuses proposals
    /// ("too many requests", as it does when applying falls 5,000 entries
    /// behind committing; `RESOURCE_EXHAUSTED`), refuses lease renewals
    /// while it catches up ("waiting for the applied index took too long"),
    /// or a request timed out.
    /// Retries should back off much further than after a refused
    /// connection, or they keep the overload going.
    pub fn is_overload(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => crate::retry::is_overload(source),
            Error::Timeout { .. } => true,
            Error::StartupDeadline { last_error, .. } => last_error.is_overload(),
            _ => false,
        }
    }

    /// etcd's "requested lease not found" (gRPC `NotFound`: no other lease
    /// RPC answers it), or etcd-client's check of the first keep-alive
    /// answer (TTL 0), which has no code.
    pub(crate) fn is_lease_not_found(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => match source {
                etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
                etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether etcd refused the request for the user's permissions or
    /// credentials (`PERMISSION_DENIED`, `UNAUTHENTICATED`, a watch
    /// cancelled with "permission denied"). Such a request fails the same
    /// way until an operator changes the grants, so it is retried at most
    /// once a minute.
    pub fn is_refused(&self) -> bool {
        match self {
            Error::Refused { .. } => true,
            Error::Etcd { source, .. } => match source {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ),
                etcd_client::Error::WatchError(m) => {
                    m.contains("permission denied") || m.contains("authentication failed")
                }
                _ => false,
            },
            Error::StartupDeadline { last_error, .. } => last_error.is_refused(),
            _ => false,
        }
    }

    /// A copy of a refusal (errors are not `Clone`; a refusal's parts are).
    pub(crate) fn refusal(&self) -> Option<Self> {
        match self {
            Error::Refused {
                access,
                key,
                source,
            } => Some(Error::Refused {
                access,
                key: key.clone(),
                source: source.clone(),
            }),
            _ => None,
        }
    }

    /// `self` as a refusal naming the grant `key` needs (`access` is
    /// `read` or `readwrite`); unchanged when it is not a refusal.
    pub(crate) fn naming_grant(self, access: &'static str, key: &str) -> Self {
        if matches!(self, Error::Refused { .. }) || !self.is_refused() {
            return self;
        }
        Error::Refused {
            access,
            key: key.to_owned(),
            source: Arc::new(self),
        }
    }

    /// Whether retrying cannot help: etcd refused the request for what it is
    /// (permission denied, bad credentials, invalid argument), not for a
    /// passing fault. Start-up fails at once on these instead of retrying.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Etcd { source, .. } => match source {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                        // etcd's "too large lease TTL"
                        | tonic::Code::OutOfRange
                ),
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => true,
                etcd_client::Error::WatchError(_) => self.is_refused(),
                _ => false,
            },
            Error::Refused { .. } => true,
            Error::Timeout { .. }
            | Error::StreamEnded(_)
            | Error::TaskGone(_)
            | Error::Io(_)
            | Error::Transport(_) => false,
            Error::StartupDeadline { .. } | Error::NoEndpoints { .. } => false,
            _ => true,
        }
    }
}

/// An etcd error outside any named operation (for `?` in user code that
/// mixes etcd-client calls with this crate's).
impl From<etcd_client::Error> for Error {
    fn from(source: etcd_client::Error) -> Self {
        Error::Etcd {
            op: "etcd request",
            source,
        }
    }
}
