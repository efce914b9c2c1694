//! The model: an instance of a service, its address and its metadata.

use std::fmt;
use std::net::IpAddr;

use serde_json::Value;

use crate::Error;

/// Opaque metadata of an instance, stored as a JSON value beside its address.
///
/// By default it is JSON `null`, which is what etcd's Go naming package
/// writes when no metadata is set. [`Metadata::insert`] turns it into a JSON
/// object of string key/values (version, zone, weight, ...).
///
/// **Interoperability hazard**: older Go gRPC clients that use etcd's
/// resolver with the `round_robin` policy crash on object or array metadata
/// (it ends up in a map key; etcd-io/etcd#19700). If Go clients of those
/// versions dial your services, keep metadata scalar
/// ([`Metadata::from_json`] with a string or number) or unset.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Metadata(Value);

impl Metadata {
    /// No metadata (`null`).
    pub fn new() -> Self {
        Self(Value::Null)
    }

    /// Metadata from any JSON value (Go clients may write strings or numbers).
    pub fn from_json(value: Value) -> Self {
        Self(value)
    }

    /// Adds a string key/value, making the metadata a JSON object.
    ///
    /// A non-object value set before (a scalar from [`from_json`](Self::from_json))
    /// is replaced.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        if !self.0.is_object() {
            self.0 = Value::Object(serde_json::Map::new());
        }
        if let Value::Object(map) = &mut self.0 {
            map.insert(key.into(), Value::String(value.into()));
        }
        self
    }

    /// Builder form of [`insert`](Self::insert).
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// The value of `key` when the metadata is an object and the value a
    /// string (numbers and booleans are rendered as text).
    pub fn get(&self, key: &str) -> Option<String> {
        match self.0.get(key)? {
            Value::String(s) => Some(s.clone()),
            v @ (Value::Number(_) | Value::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }

    /// Whether no metadata is set (`null`).
    pub fn is_null(&self) -> bool {
        self.0.is_null()
    }

    /// The JSON value.
    pub fn as_json(&self) -> &Value {
        &self.0
    }
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One instance of one service, as stored in etcd.
///
/// Discovery hands these to the balancer, so a custom balancer or filter can
/// use the address and the metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// The service name (the part of the key a client dials by).
    pub service: String,
    /// The instance id: the last segment of the key; defaults to the address.
    pub id: String,
    /// The address clients dial: `host:port`, `[ipv6]:port` or `hostname:port`.
    pub addr: String,
    /// Free metadata.
    pub metadata: Metadata,
}

impl Instance {
    /// An instance of `service` at `addr`, with `id = addr` and no metadata.
    pub fn new(service: impl Into<String>, addr: impl Into<String>) -> Self {
        let addr = addr.into();
        Self {
            service: service.into(),
            id: addr.clone(),
            addr,
            metadata: Metadata::new(),
        }
    }

    /// The URI tonic dials for this instance, e.g. `http://10.0.0.1:50051`.
    pub fn uri(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

/// An address split into host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPort<'a> {
    /// The host without IPv6 brackets.
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) ip: Option<IpAddr>,
}

/// Parses `host:port`, `[ipv6]:port` or `hostname:port`.
pub(crate) fn parse_addr(addr: &str) -> Result<HostPort<'_>, Error> {
    let invalid = |reason: &str| Error::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some((scheme, _)) = addr.split_once("://") {
        return Err(invalid(&format!(
            "write host:port without a scheme (found \"{scheme}://\"), e.g. 10.0.0.1:50051"
        )));
    }
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("an IPv6 literal opened with '[' is not closed with ']'"))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid("no port: expected [ipv6]:port, e.g. [::1]:50051"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid("the text between brackets is not an IPv6 address"));
        }
        (host, port)
    } else {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| invalid("no port: expected host:port, e.g. 10.0.0.1:50051"))?;
        if host.contains(':') {
            return Err(invalid(
                "an IPv6 address must be written in brackets, e.g. [::1]:50051",
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(invalid("port 0 cannot be dialed"));
    }
    let ip = host.parse::<IpAddr>().ok();
    if ip.is_none()
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        return Err(invalid(
            "the host is neither an IP address nor a host name (letters, digits, '-', '.', '_')",
        ));
    }
    Ok(HostPort { host, port, ip })
}

/// Validates an address that will be advertised to clients.
pub(crate) fn validate_advertised(addr: &str) -> Result<(), Error> {
    let hp = parse_addr(addr)?;
    if hp.ip.is_some_and(|ip| ip.is_unspecified()) {
        return Err(Error::UnspecifiedAddress {
            addr: addr.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_address_forms() {
        let v4 = parse_addr("10.0.0.1:50051").unwrap();
        assert_eq!((v4.host, v4.port), ("10.0.0.1", 50051));
        let v6 = parse_addr("[::1]:50051").unwrap();
        assert_eq!((v6.host, v6.port), ("::1", 50051));
        assert!(v6.ip.is_some());
        let name = parse_addr("greeter-0.svc.local:7020").unwrap();
        assert_eq!((name.host, name.ip), ("greeter-0.svc.local", None));
    }

    #[test]
    fn rejects_bad_addresses_with_reasons() {
        for (addr, needle) in [
            ("10.0.0.1", "no port"),
            ("::1:50051", "brackets"),
            ("[::1]50051", "no port"),
            ("[::1:50051", "not closed"),
            ("[zz]:1", "not an IPv6"),
            (":50051", "empty host"),
            ("h:0", "port 0"),
            ("h:70000", "1 to 65535"),
            ("h/x:1", "neither"),
        ] {
            let err = parse_addr(addr).unwrap_err().to_string();
            assert!(err.contains(needle), "{addr}: {err}");
        }
    }

    #[test]
    fn refuses_to_advertise_unspecified_addresses() {
        for addr in ["0.0.0.0:1", "[::]:1"] {
            let err = validate_advertised(addr).unwrap_err();
            assert!(matches!(err, Error::UnspecifiedAddress { .. }));
            assert!(err.to_string().contains("set an advertise address"));
        }
        validate_advertised("127.0.0.1:1").unwrap();
    }

    #[test]
    fn metadata_defaults_to_null_and_reads_scalars() {
        assert!(Metadata::new().is_null());
        let m = Metadata::new().with("version", "v2").with("zone", "a");
        assert_eq!(m.get("version").as_deref(), Some("v2"));
        assert_eq!(m.to_string(), r#"{"version":"v2","zone":"a"}"#);
        let n = Metadata::from_json(serde_json::json!({"weight": 3}));
        assert_eq!(n.get("weight").as_deref(), Some("3"));
        assert_eq!(Metadata::from_json("x".into()).get("k"), None);
    }
}
