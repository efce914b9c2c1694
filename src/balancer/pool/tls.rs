//! TLS and mutual TLS from the balancer to its backends (feature `tls`).
//!
//! Configured like tonic's `ClientTlsConfig`: CA certificates and an optional
//! client identity as PEM (tonic's `Certificate` works too, it is PEM bytes),
//! and the name to verify. rustls with the ring provider, the same stack
//! tonic's `tls-ring` feature uses, so it adds no crate to the build. ALPN
//! offers `h2`, as gRPC requires.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::Error;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How the [`Balancer`](crate::Balancer) secures its connections to
/// backends. Set with [`BalancerBuilder::tls`](crate::BalancerBuilder::tls).
///
/// ```
/// # fn pem() -> Vec<u8> { Vec::new() }
/// use tonic_etcd::balancer::TlsConfig;
/// let tls = TlsConfig::new()
///     .ca_certificate(pem())                 // the CA that signed the servers
///     .identity(pem(), pem())                // mTLS: this client's cert and key
///     .domain_name("greeter.internal");      // default: the instance's host
/// ```
///
/// Without `domain_name`, each connection verifies the host of the instance's
/// registered address (an IP address needs an IP SAN in the certificate).
#[derive(Clone, Default)]
pub struct TlsConfig {
    ca_pems: Vec<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
    custom: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.ca_pems.len())
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .field("custom", &self.custom.is_some())
            .finish()
    }
}

impl TlsConfig {
    /// No trust anchors yet: add at least one CA, or use
    /// [`rustls_config`](Self::rustls_config).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificate(s) in `pem` (one or more PEM blocks).
    #[must_use]
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.ca_pems.push(pem.as_ref().to_vec());
        self
    }

    /// Presents this certificate chain and private key (PEM) to servers that
    /// require client certificates (mutual TLS).
    #[must_use]
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self
    }

    /// The name every server certificate is verified against (default: the
    /// host of each instance's address).
    #[must_use]
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// A complete rustls configuration instead of the CA and identity above
    /// (custom verifiers, native roots, key logging). Its ALPN protocols are
    /// replaced by `h2`.
    #[must_use]
    pub fn rustls_config(mut self, config: Arc<ClientConfig>) -> Self {
        self.custom = Some(config);
        self
    }

    /// Parses the certificates and builds the connector; every mistake is
    /// reported here, when the balancer is built.
    pub(crate) fn connector(&self) -> Result<Connector, Error> {
        let invalid = |what: String| Error::InvalidConfig(format!("balancer TLS: {what}"));
        let mut config = match &self.custom {
            Some(custom) => (**custom).clone(),
            None => {
                let mut roots = RootCertStore::empty();
                for pem in &self.ca_pems {
                    let mut found = 0;
                    for cert in CertificateDer::pem_slice_iter(pem) {
                        let cert = cert.map_err(|e| invalid(format!("a CA certificate: {e}")))?;
                        roots
                            .add(cert)
                            .map_err(|e| invalid(format!("a CA certificate: {e}")))?;
                        found += 1;
                    }
                    if found == 0 {
                        return Err(invalid("a CA certificate holds no PEM certificate".into()));
                    }
                }
                if roots.is_empty() {
                    return Err(invalid(
                        "no CA certificate: add one with TlsConfig::ca_certificate \
                         (or give a complete rustls_config)"
                            .into(),
                    ));
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| invalid(e.to_string()))?
                    .with_root_certificates(roots);
                match &self.identity {
                    None => builder.with_no_client_auth(),
                    Some((cert_pem, key_pem)) => {
                        let chain = CertificateDer::pem_slice_iter(cert_pem)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| invalid(format!("the client certificate: {e}")))?;
                        if chain.is_empty() {
                            return Err(invalid(
                                "the client certificate holds no PEM certificate".into(),
                            ));
                        }
                        let key = PrivateKeyDer::from_pem_slice(key_pem)
                            .map_err(|e| invalid(format!("the client key: {e}")))?;
                        builder
                            .with_client_auth_cert(chain, key)
                            .map_err(|e| invalid(format!("the client identity: {e}")))?
                    }
                }
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let domain = match &self.domain {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| invalid(format!("domain name {name:?}: {e}")))?,
            ),
        };
        Ok(Connector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            domain,
        })
    }
}

/// A ready-to-use TLS client side.
#[derive(Clone)]
pub(crate) struct Connector {
    tls: tokio_rustls::TlsConnector,
    domain: Option<ServerName<'static>>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Runs the TLS handshake with the server at `addr` (`host:port`).
    pub(crate) async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, BoxError> {
        let name = match &self.domain {
            Some(name) => name.clone(),
            None => host_name(addr)?,
        };
        let stream = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        if stream.get_ref().1.alpn_protocol() == Some(b"http/1.1") {
            return Err("TLS handshake: the server chose HTTP/1.1, not h2".into());
        }
        Ok(stream)
    }
}

/// The host of `host:port` (`[v6]:port` too) as a name to verify.
fn host_name(addr: &str) -> Result<ServerName<'static>, BoxError> {
    let host = crate::instance::parse_addr(addr)?.host;
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("cannot verify TLS for host {host:?}: {e}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_from_addresses() {
        for (addr, want) in [
            ("127.0.0.1:5000", "127.0.0.1"),
            ("[::1]:5000", "::1"),
            ("greeter.internal:443", "greeter.internal"),
        ] {
            let name = host_name(addr).unwrap();
            assert_eq!(name.to_str(), want, "{addr}");
        }
    }

    #[test]
    fn mistakes_are_refused_when_built() {
        let e = TlsConfig::new().connector().unwrap_err().to_string();
        assert!(e.contains("no CA certificate"), "{e}");
        let e = TlsConfig::new()
            .ca_certificate("not pem")
            .connector()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
