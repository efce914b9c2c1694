//! Connecting to etcd: etcd-client's `Client::connect`, with the HTTP/2
//! settings a fleet's registrations need.
//!
//! Every etcd call a registration or a view ends early (a request timeout,
//! a keep-alive stream re-attached, a watch restarted, thousands of leases
//! revoked at once on shutdown) resets its HTTP/2 stream. h2 counts the
//! resets it makes for frames that arrive on such streams and, after 1,024
//! over the connection's life, closes the connection itself (`GOAWAY
//! ENHANCE_YOUR_CALM "too_many_internal_resets"`, hyperium/h2#856); every
//! other call on that etcd client then fails at once (the `scale`
//! benchmark's 10,000 revokes panicked on it). [`connect`] turns that limit
//! off on every endpoint of the client: the peer is the etcd cluster one
//! chose to trust, and the limit guards against a hostile one.

use etcd_client::{BalancedChannelBuilder, Channel, Client, ConnectOptions};
use http::Uri;
use tokio::sync::mpsc;
use tonic::transport::channel::Change;
use tonic::transport::Endpoint;

use crate::Etcd;

/// etcd-client's `Client::connect` with the HTTP/2 settings above, as an
/// [`Etcd`] to share (clone it into every builder); use
/// [`connect_options`](crate::connect_options) for `options`.
///
/// # Errors
/// As `Client::connect`: no endpoint, an invalid one, or (with auth) a
/// refused login.
pub async fn connect<E: AsRef<str>, S: AsRef<[E]>>(
    endpoints: S,
    options: Option<ConnectOptions>,
) -> Result<Etcd, etcd_client::Error> {
    Client::connect_with_balanced_channel(endpoints, options, ResetTolerant)
        .await
        .map(Etcd::new)
}

/// tonic's balanced channel, with every endpoint etcd-client inserts
/// changed on its way in.
struct ResetTolerant;

impl BalancedChannelBuilder for ResetTolerant {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (channel, inner) = tonic::transport::Channel::balance_channel(buffer_size);
        let (tx, mut rx) = mpsc::channel::<Change<Uri, Endpoint>>(buffer_size);
        // Waits on the channel: no work while the endpoints stay as they
        // are; ends with the client (which holds `tx`) or the channel.
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let change = match change {
                    Change::Insert(uri, endpoint) => {
                        Change::Insert(uri, endpoint.http2_max_local_error_reset_streams(None))
                    }
                    other => other,
                };
                if inner.send(change).await.is_err() {
                    return;
                }
            }
        });
        Ok((Channel::Tonic(channel), tx))
    }
}
