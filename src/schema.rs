//! How instances are laid out as etcd keys and values.
//!
//! Two schemas ship with the crate:
//!
//! * [`NamingSchema`], the default: byte-compatible with etcd's own Go naming
//!   package (`go.etcd.io/etcd/client/v3/naming/endpoints`), so Go services
//!   that dial `etcd:///<service>` find Rust servers and the other way round.
//!   Key `[<namespace>/]<service>/<id>`, value
//!   `{"Op":0,"Addr":"<host:port>","Metadata":<json>}`.
//! * [`ColonSchema`]: `<namespace>:<service>:<ip>:<port>`, the layout of the
//!   design this crate grew from. The value is the metadata as JSON.
//!
//! Implement [`Schema`] for any other layout.

use std::fmt;

use serde_json::Value;

use crate::instance::{parse_addr, Instance, Metadata};
use crate::Error;

/// Values longer than this are refused when decoding: metadata of this size is
/// a mistake or an attack, and decoding it would cost every watcher memory.
pub const MAX_VALUE_LEN: usize = 1 << 20;

/// A key and value to write to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The etcd key.
    pub key: String,
    /// The etcd value.
    pub value: Vec<u8>,
}

/// A layout of instances in etcd.
///
/// Contract: every key of `service` starts with [`service_prefix`](Self::service_prefix),
/// which ends with the schema's separator, and [`decode`](Self::decode) of a
/// key under it names the service it belongs to, so a watcher of `pb.Item`
/// can tell `pb.Item/...` from `pb.Item/nested/...` and never sees
/// `pb.ItemServer`.
pub trait Schema: fmt::Debug + Send + Sync + 'static {
    /// A short name for messages, e.g. `"naming"`.
    fn name(&self) -> &'static str;

    /// Checks that `service` can be stored; the error says what to change.
    fn validate_service(&self, service: &str) -> Result<(), Error>;

    /// The prefix of every key of `service`, ending with the separator.
    fn service_prefix(&self, service: &str) -> String;

    /// The prefix of every key this schema writes (all services).
    fn root_prefix(&self) -> String;

    /// The key and value for `instance`.
    fn encode(&self, instance: &Instance) -> Result<Encoded, Error>;

    /// The instance stored under `key` with `value`.
    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Instance, DecodeError>;

    /// A string two schemas share exactly when they encode and decode
    /// alike, or `None` (the default) when that cannot be told. Views of
    /// one prefix on one [`Etcd`](crate::Etcd) whose schemas have the same
    /// identity share one listing and one watch (Discovers, Balancers and
    /// Catalogs of one service); with `None` each view is its own.
    fn identity(&self) -> Option<String> {
        None
    }
}

/// A shared schema is a schema: builders take `Arc<dyn Schema>` (from
/// [`by_name`], or shared between a registration and its clients) through
/// the same `schema(..)` method as a concrete one.
impl Schema for std::sync::Arc<dyn Schema> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn validate_service(&self, service: &str) -> Result<(), Error> {
        (**self).validate_service(service)
    }

    fn service_prefix(&self, service: &str) -> String {
        (**self).service_prefix(service)
    }

    fn root_prefix(&self) -> String {
        (**self).root_prefix()
    }

    fn encode(&self, instance: &Instance) -> Result<Encoded, Error> {
        (**self).encode(instance)
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Instance, DecodeError> {
        (**self).decode(key, value)
    }

    fn identity(&self) -> Option<String> {
        (**self).identity()
    }
}

/// A schema chosen by name, as command lines spell it: `naming` (with an
/// optional namespace) or `colon` (which needs one).
pub fn by_name(name: &str, namespace: Option<&str>) -> Result<std::sync::Arc<dyn Schema>, Error> {
    match (name, namespace) {
        ("naming", None) => Ok(std::sync::Arc::new(NamingSchema::new())),
        ("naming", Some(ns)) => Ok(std::sync::Arc::new(NamingSchema::with_namespace(ns)?)),
        ("colon", Some(ns)) => Ok(std::sync::Arc::new(ColonSchema::new(ns)?)),
        ("colon", None) => Err(Error::InvalidConfig(
            "the colon schema needs a namespace (<namespace>:<service>:<ip>:<port>)".into(),
        )),
        (other, _) => Err(Error::InvalidConfig(format!(
            "unknown schema {other:?}: use \"naming\" or \"colon\""
        ))),
    }
}

/// Why a key or value in etcd could not be read. Such entries are skipped
/// with a warning; they never disturb other endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The key or value is not UTF-8.
    #[error("the {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// The key is not under the schema's prefix.
    #[error("the key is outside the schema's prefix")]
    OutsidePrefix,
    /// One of this crate's own keys (under `<root prefix>_tonic-etcd/`):
    /// not an instance, and not a mistake.
    #[error("the key is one of tonic-etcd's own (service configs, overrides, clients)")]
    Reserved,
    /// The key does not have the schema's shape.
    #[error("malformed key: {0}")]
    MalformedKey(String),
    /// The value is larger than [`MAX_VALUE_LEN`].
    #[error("the value has {0} bytes, more than the limit of {MAX_VALUE_LEN}")]
    TooLarge(usize),
    /// The value is not the JSON the schema expects.
    #[error("malformed value: {0}")]
    MalformedValue(String),
    /// The address is not dialable.
    #[error("invalid address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address found.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn check_name(name: &str, what: &str, forbidden: char) -> Result<(), Error> {
    let bad = |reason: String| Error::InvalidServiceName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad(format!("the {what} is empty")));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(format!(
            "the {what} contains {c:?}; use printable characters without spaces"
        )));
    }
    if name.contains(forbidden) {
        return Err(bad(format!(
            "the {what} contains the schema's separator {forbidden:?}"
        )));
    }
    Ok(())
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8(what))
}

/// The part of `key` after the schema's root prefix.
fn after_root<'a>(key: &'a [u8], root: &str) -> Result<&'a str, DecodeError> {
    utf8(key, "key")?
        .strip_prefix(root)
        .ok_or(DecodeError::OutsidePrefix)
}

fn decoded_addr(addr: &str) -> Result<(), DecodeError> {
    parse_addr(addr)
        .map(|_| ())
        .map_err(|e| DecodeError::InvalidAddress {
            addr: addr.chars().take(256).collect(),
            reason: match e {
                Error::InvalidAddress { reason, .. } => reason,
                other => other.to_string(),
            },
        })
}

/// etcd's Go naming layout (the default).
///
/// Key `[<namespace>/]<service>/<id>` where `id` defaults to the address;
/// value `{"Op":0,"Addr":"<host:port>","Metadata":<json or null>}`, compact,
/// as Go's `encoding/json` writes it (object keys sorted, `<`, `>` and `&`
/// escaped). Service names may contain `/` (`foo/bar/my-service`), like Go's.
///
/// Reading is as lenient as Go's decoder: field names match without regard to
/// case, `Op` may be missing, and an `Addr` without a port gets port 443, the
/// port a Go gRPC client would dial. The key's last segment is the instance
/// id; the value's `Addr` is what gets dialed. A key with a further `/` after
/// the service prefix belongs to a nested service, not to this one (Go's
/// resolver wrongly mixes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamingSchema {
    namespace: Option<String>,
}

impl NamingSchema {
    /// Keys directly under the service name, as `etcd:///<service>` expects.
    pub fn new() -> Self {
        Self { namespace: None }
    }

    /// Keys under `<namespace>/`. Go clients then dial `etcd:///<namespace>/<service>`.
    pub fn with_namespace(namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        check_path(&namespace, "namespace")?;
        Ok(Self {
            namespace: Some(namespace),
        })
    }
}

/// The segment under a schema's root prefix where this crate keeps its own
/// keys (service configs, overrides, the client registry of coordinated
/// subsetting): `<root prefix>_tonic-etcd/`.
pub const RESERVED: &str = "_tonic-etcd/";

/// What this crate keeps beside a schema's instances, each under
/// `<root prefix>_tonic-etcd/<kind>/`: inside the namespace, so one grant
/// on the namespace's prefix covers all of it (see [`crate::rbac`]), yet
/// never under `<namespace>/<service>`, which etcd's Go resolver would read
/// as endpoints (it watches the bare prefix, etcd-io/etcd#15022).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// One gRPC service config per service ([`crate::ConfigStore`]).
    ServiceConfig,
    /// Drains and weight overrides, bound to the instance's lease.
    Overrides,
    /// The client keys of coordinated subsetting.
    Clients,
}

impl Reserved {
    /// Every kind, in key order.
    pub const ALL: [Reserved; 3] = [Self::Clients, Self::Overrides, Self::ServiceConfig];

    /// The kind's segment under [`RESERVED`].
    pub fn segment(self) -> &'static str {
        match self {
            Self::ServiceConfig => "service-config",
            Self::Overrides => "overrides",
            Self::Clients => "clients",
        }
    }

    /// `<root prefix>_tonic-etcd/<kind>/`: the prefix of every key of this
    /// kind beside `schema`'s instances.
    pub fn prefix(self, schema: &dyn Schema) -> String {
        format!("{}{RESERVED}{}/", schema.root_prefix(), self.segment())
    }

    /// Where keys of this kind lived before 0.2 (outside the namespace:
    /// `_tonic-etcd/<kind>/<root prefix>`), for `tonic-etcd upgrade-keys`.
    pub fn legacy_prefix(self, schema: &dyn Schema) -> String {
        format!("{RESERVED}{}/{}", self.segment(), schema.root_prefix())
    }

    /// The naming layout of this kind's keys, `<prefix><service>/<id>`:
    /// overrides and client keys are stored as instances of their service.
    pub(crate) fn schema(self, schema: &dyn Schema) -> Result<NamingSchema, Error> {
        let prefix = self.prefix(schema);
        NamingSchema::with_namespace(prefix.trim_end_matches('/'))
    }
}

/// Whether `key`, under the root prefix `root`, is one of this crate's own
/// keys rather than an instance.
pub(crate) fn is_reserved(key: &[u8], root: &str) -> bool {
    key.strip_prefix(root.as_bytes())
        .is_some_and(|rest| rest.starts_with(RESERVED.as_bytes()))
}

/// Refuses a service whose keys would land among this crate's own.
fn check_not_reserved(service: &str) -> Result<(), Error> {
    if service == RESERVED.trim_end_matches('/') || service.starts_with(RESERVED) {
        return Err(Error::InvalidServiceName {
            name: service.to_owned(),
            reason: format!("{RESERVED} is where tonic-etcd keeps its own keys"),
        });
    }
    Ok(())
}

/// Checks a `/`-separated name: no empty segments, no leading or trailing `/`.
fn check_path(name: &str, what: &str) -> Result<(), Error> {
    check_name(name, what, '\0')?;
    if name.split('/').any(str::is_empty) {
        return Err(Error::InvalidServiceName {
            name: name.to_owned(),
            reason: format!("the {what} has an empty segment (a leading, trailing or double '/')"),
        });
    }
    Ok(())
}

impl Schema for NamingSchema {
    fn name(&self) -> &'static str {
        "naming"
    }

    fn identity(&self) -> Option<String> {
        Some(format!("{self:?}"))
    }

    fn validate_service(&self, service: &str) -> Result<(), Error> {
        check_path(service, "service name")?;
        check_not_reserved(service)
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}{service}/", self.root_prefix())
    }

    fn root_prefix(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/"),
            None => String::new(),
        }
    }

    fn encode(&self, instance: &Instance) -> Result<Encoded, Error> {
        self.validate_service(&instance.service)?;
        check_name(&instance.id, "instance id", '/').map_err(|e| match e {
            Error::InvalidServiceName { name, reason } => {
                Error::InvalidInstanceId { id: name, reason }
            }
            other => other,
        })?;
        parse_addr(&instance.addr)?;
        let mut value = String::with_capacity(48 + instance.addr.len());
        value.push_str(r#"{"Op":0,"Addr":"#);
        write_go_json(&mut value, &Value::String(instance.addr.clone()));
        value.push_str(r#","Metadata":"#);
        write_go_json(&mut value, instance.metadata.as_json());
        value.push('}');
        Ok(Encoded {
            key: format!("{}{}", self.service_prefix(&instance.service), instance.id),
            value: value.into_bytes(),
        })
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Instance, DecodeError> {
        let root = self.root_prefix();
        if is_reserved(key, &root) {
            // Service configs, overrides and client keys of this crate, seen
            // by a listing of the whole namespace: not instances.
            return Err(DecodeError::Reserved);
        }
        let rest = after_root(key, &root)?;
        let (service, id) = rest.rsplit_once('/').ok_or_else(|| {
            DecodeError::MalformedKey("expected <service>/<id> after the namespace".into())
        })?;
        if service.is_empty() || id.is_empty() || service.split('/').any(str::is_empty) {
            return Err(DecodeError::MalformedKey(
                "empty service name or instance id".into(),
            ));
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(DecodeError::TooLarge(value.len()));
        }
        let GoUpdate { addr, metadata } = serde_json::from_slice(value)
            .map_err(|e| DecodeError::MalformedValue(format!("not JSON: {e}")))?;
        let addr = match addr {
            Some(Value::String(a)) if !a.is_empty() => a,
            Some(Value::String(_)) | None => {
                return Err(DecodeError::MalformedValue("no Addr".into()))
            }
            Some(_) => return Err(DecodeError::MalformedValue("Addr is not a string".into())),
        };
        let addr = with_default_port(addr);
        decoded_addr(&addr)?;
        Ok(Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            addr,
            metadata: Metadata::from_json(metadata),
        })
    }
}

/// The fields of Go's `naming.Update` this crate reads, decoded straight
/// from the bytes (no intermediate map). Go's decoder matches field names
/// case-insensitively and the last matching field wins; so does this.
struct GoUpdate {
    addr: Option<Value>,
    metadata: Value,
}

impl<'de> serde::Deserialize<'de> for GoUpdate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        enum Field {
            Addr,
            Metadata,
            Other,
        }
        impl<'de> serde::Deserialize<'de> for Field {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct FieldVisitor;
                impl serde::de::Visitor<'_> for FieldVisitor {
                    type Value = Field;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Field, E> {
                        Ok(if name.eq_ignore_ascii_case("addr") {
                            Field::Addr
                        } else if name.eq_ignore_ascii_case("metadata") {
                            Field::Metadata
                        } else {
                            Field::Other
                        })
                    }
                }
                d.deserialize_identifier(FieldVisitor)
            }
        }
        struct UpdateVisitor;
        impl<'de> serde::de::Visitor<'de> for UpdateVisitor {
            type Value = GoUpdate;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object with Addr and Metadata")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<GoUpdate, A::Error> {
                let mut update = GoUpdate {
                    addr: None,
                    metadata: Value::Null,
                };
                while let Some(field) = map.next_key::<Field>()? {
                    match field {
                        Field::Addr => update.addr = Some(map.next_value()?),
                        Field::Metadata => update.metadata = map.next_value()?,
                        Field::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(update)
            }
        }
        d.deserialize_map(UpdateVisitor)
    }
}

/// Adds port 443 to an address without one, as a Go gRPC client would dial it.
fn with_default_port(addr: String) -> String {
    let has_port = if addr.starts_with('[') {
        addr.contains("]:")
    } else {
        // More than one ':' is an unbracketed IPv6 literal, which Go also
        // dials on 443.
        addr.matches(':').count() == 1
    };
    if has_port {
        addr
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:443")
    } else {
        format!("{addr}:443")
    }
}

/// Writes `v` the way Go's `encoding/json` does: compact, object keys sorted,
/// and `<`, `>`, `&`, U+2028, U+2029 escaped.
fn write_go_json(out: &mut String, v: &Value) {
    match v {
        Value::String(s) => {
            let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
            for c in quoted.chars() {
                match c {
                    '<' => out.push_str("\\u003c"),
                    '>' => out.push_str("\\u003e"),
                    '&' => out.push_str("\\u0026"),
                    '\u{2028}' => out.push_str("\\u2028"),
                    '\u{2029}' => out.push_str("\\u2029"),
                    c => out.push(c),
                }
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_json(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_go_json(out, &Value::String(k.clone()));
                out.push(':');
                write_go_json(out, item);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `<namespace>:<service>:<ip>:<port>`, e.g.
/// `apc-id-dev-services:pb.ItemServer-0711:10.12.252.5:7020`.
///
/// The value is the metadata as JSON (`null` when unset); an empty value is
/// read as no metadata.
///
/// What it cannot represent, refused with [`Error::Unrepresentable`] rather
/// than written as a key nobody can read back:
/// * IPv6 addresses (their `:` collide with the separator): use [`NamingSchema`];
/// * an instance id other than the address (the key has no room for it);
/// * service names or namespaces containing `:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColonSchema {
    namespace: String,
}

impl ColonSchema {
    /// Keys under `<namespace>:`.
    pub fn new(namespace: impl Into<String>) -> Result<Self, Error> {
        let namespace = namespace.into();
        check_name(&namespace, "namespace", ':')?;
        Ok(Self { namespace })
    }
}

impl Schema for ColonSchema {
    fn name(&self) -> &'static str {
        "colon"
    }

    fn identity(&self) -> Option<String> {
        Some(format!("{self:?}"))
    }

    fn validate_service(&self, service: &str) -> Result<(), Error> {
        check_name(service, "service name", ':')?;
        check_not_reserved(service)
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}:{service}:", self.namespace)
    }

    fn root_prefix(&self) -> String {
        format!("{}:", self.namespace)
    }

    fn encode(&self, instance: &Instance) -> Result<Encoded, Error> {
        self.validate_service(&instance.service)?;
        let hp = parse_addr(&instance.addr)?;
        if hp.host.contains(':') {
            return Err(Error::Unrepresentable {
                schema: "colon",
                reason: format!(
                    "the IPv6 address {} would make the key ambiguous; \
                     advertise an IPv4 address or host name, or use the naming schema",
                    instance.addr
                ),
            });
        }
        if instance.id != instance.addr {
            return Err(Error::Unrepresentable {
                schema: "colon",
                reason: format!(
                    "the instance id {:?} differs from the address {:?}, and the key holds only \
                     the address; drop the custom id or use the naming schema",
                    instance.id, instance.addr
                ),
            });
        }
        let mut value = String::new();
        write_go_json(&mut value, instance.metadata.as_json());
        Ok(Encoded {
            key: format!(
                "{}{}",
                self.service_prefix(&instance.service),
                instance.addr
            ),
            value: value.into_bytes(),
        })
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<Instance, DecodeError> {
        let root = self.root_prefix();
        if is_reserved(key, &root) {
            return Err(DecodeError::Reserved);
        }
        let rest = after_root(key, &root)?;
        let mut parts = rest.rsplitn(3, ':');
        let (Some(port), Some(ip), Some(service)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(DecodeError::MalformedKey(
                "expected <namespace>:<service>:<ip>:<port>".into(),
            ));
        };
        if service.is_empty() {
            return Err(DecodeError::MalformedKey("empty service name".into()));
        }
        let addr = format!("{ip}:{port}");
        decoded_addr(&addr)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(DecodeError::TooLarge(value.len()));
        }
        let metadata = if value.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(value)
                .map_err(|e| DecodeError::MalformedValue(format!("metadata is not JSON: {e}")))?
        };
        Ok(Instance {
            service: service.to_owned(),
            id: addr.clone(),
            addr,
            metadata: Metadata::from_json(metadata),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inst(service: &str, addr: &str) -> Instance {
        Instance::new(service, addr)
    }

    // The bytes etcd's Go naming package writes: `json.Marshal` of
    // `internal.Update{Op Operation; Addr string; Metadata any}`
    // (go.etcd.io/etcd/client/v3/naming/endpoints/internal/update.go), put by
    // `endpointManager.Update` in endpoints_impl.go under `<target>/<key>`.
    // Untagged struct fields keep declaration order; `nil` metadata is `null`.
    #[test]
    fn naming_writes_exactly_what_go_writes() {
        let e = NamingSchema::new()
            .encode(&inst("my-service", "10.0.0.1:50051"))
            .unwrap();
        assert_eq!(e.key, "my-service/10.0.0.1:50051");
        assert_eq!(
            e.value,
            br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#.to_vec()
        );

        let mut i = inst("foo/bar/svc", "[::1]:7");
        i.metadata = Metadata::new().with("zone", "a&b").with("version", "<2>");
        let e = NamingSchema::with_namespace("prod")
            .unwrap()
            .encode(&i)
            .unwrap();
        assert_eq!(e.key, "prod/foo/bar/svc/[::1]:7");
        assert_eq!(
            String::from_utf8(e.value).unwrap(),
            r#"{"Op":0,"Addr":"[::1]:7","Metadata":{"version":"\u003c2\u003e","zone":"a\u0026b"}}"#
        );
    }

    #[test]
    fn naming_round_trips() {
        let s = NamingSchema::with_namespace("ns").unwrap();
        let mut i = inst("svc", "host-1.local:80");
        i.id = "pod-7".into();
        i.metadata = Metadata::from_json(json!({"w": 3, "tags": ["a"]}));
        let e = s.encode(&i).unwrap();
        assert_eq!(s.decode(e.key.as_bytes(), &e.value).unwrap(), i);
    }

    #[test]
    fn naming_reads_what_go_users_write() {
        let s = NamingSchema::new();
        // The form etcd's docs show: no Op, no port, scalar metadata.
        let i = s
            .decode(
                b"my-service/1.2.3.4",
                br#"{"Addr":"1.2.3.4","Metadata":"..."}"#,
            )
            .unwrap();
        assert_eq!(i.addr, "1.2.3.4:443");
        assert_eq!(i.metadata.as_json(), &json!("..."));
        // Case-insensitive field names, as Go's decoder matches them.
        let i = s
            .decode(b"svc/x", br#"{"op":0,"addr":"h:1","METADATA":{"k":"v"}}"#)
            .unwrap();
        assert_eq!(
            (i.service.as_str(), i.id.as_str(), i.addr.as_str()),
            ("svc", "x", "h:1")
        );
        assert_eq!(i.metadata.get("k").as_deref(), Some("v"));
        // The last matching field wins, escaped names match, unknown fields
        // of any shape are ignored.
        let i = s
            .decode(
                b"svc/x",
                br#"{"Addr":"h:1","x":[{"y":null}],"A\u0064dr":"h:2"}"#,
            )
            .unwrap();
        assert_eq!(i.addr, "h:2");
    }

    #[test]
    fn naming_decode_errors_say_what_is_wrong() {
        let s = NamingSchema::with_namespace("ns").unwrap();
        let cases: [(&[u8], &[u8], DecodeError); 7] = [
            (b"other/svc/a", b"{}", DecodeError::OutsidePrefix),
            (
                b"ns/svc",
                br#"{"Addr":"h:1"}"#,
                DecodeError::MalformedKey(String::new()),
            ),
            (
                b"ns/svc/a",
                b"not json",
                DecodeError::MalformedValue(String::new()),
            ),
            (
                b"ns/svc/a",
                b"[1]",
                DecodeError::MalformedValue(String::new()),
            ),
            (
                b"ns/svc/a",
                br#"{"Metadata":1}"#,
                DecodeError::MalformedValue(String::new()),
            ),
            (b"ns/svc/\xff", b"{}", DecodeError::NotUtf8("key")),
            (
                b"ns/svc/a",
                br#"{"Addr":"h:99999"}"#,
                DecodeError::InvalidAddress {
                    addr: String::new(),
                    reason: String::new(),
                },
            ),
        ];
        for (key, value, want) in cases {
            let got = s.decode(key, value).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{got}"
            );
        }
        let huge = vec![b' '; MAX_VALUE_LEN + 1];
        assert_eq!(
            s.decode(b"ns/svc/a", &huge).unwrap_err(),
            DecodeError::TooLarge(MAX_VALUE_LEN + 1)
        );
    }

    #[test]
    fn naming_nested_keys_belong_to_the_nested_service() {
        let s = NamingSchema::new();
        let i = s
            .decode(b"foo/bar/10.0.0.1:1", br#"{"Addr":"10.0.0.1:1"}"#)
            .unwrap();
        assert_eq!(
            (i.service.as_str(), i.id.as_str()),
            ("foo/bar", "10.0.0.1:1")
        );
        assert!(!"pb.ItemServer/x".starts_with(&s.service_prefix("pb.Item")));
    }

    #[test]
    fn colon_writes_the_original_layout() {
        let s = ColonSchema::new("apc-id-dev-services").unwrap();
        let e = s
            .encode(&inst("pb.ItemServer-0711", "10.12.252.5:7020"))
            .unwrap();
        assert_eq!(
            e.key,
            "apc-id-dev-services:pb.ItemServer-0711:10.12.252.5:7020"
        );
        assert_eq!(e.value, b"null");
        let mut i = inst("pb.ItemServer-0711", "10.12.252.5:7020");
        i.metadata = Metadata::new().with("version", "v2");
        let e = s.encode(&i).unwrap();
        assert_eq!(e.value, br#"{"version":"v2"}"#);
        assert_eq!(s.decode(e.key.as_bytes(), &e.value).unwrap(), i);
        // An empty value is no metadata.
        let d = s.decode(e.key.as_bytes(), b"").unwrap();
        assert!(d.metadata.is_null());
    }

    #[test]
    fn colon_refuses_what_it_cannot_represent() {
        let s = ColonSchema::new("ns").unwrap();
        let err = s.encode(&inst("svc", "[::1]:1")).unwrap_err();
        assert!(matches!(err, Error::Unrepresentable { .. }), "{err}");
        assert!(err.to_string().contains("naming schema"));
        let mut i = inst("svc", "10.0.0.1:1");
        i.id = "pod-1".into();
        assert!(matches!(s.encode(&i), Err(Error::Unrepresentable { .. })));
        assert!(matches!(
            s.validate_service("a:b"),
            Err(Error::InvalidServiceName { .. })
        ));
        assert!(ColonSchema::new("a:b").is_err());
        assert!(ColonSchema::new("").is_err());
    }

    #[test]
    fn colon_decode_errors() {
        let s = ColonSchema::new("ns").unwrap();
        assert_eq!(
            s.decode(b"xx:svc:1.2.3.4:5", b"").unwrap_err(),
            DecodeError::OutsidePrefix
        );
        assert!(matches!(
            s.decode(b"ns:1.2.3.4:5", b""),
            Err(DecodeError::MalformedKey(_))
        ));
        assert!(matches!(
            s.decode(b"ns:svc:1.2.3.4:x", b""),
            Err(DecodeError::InvalidAddress { .. })
        ));
        assert!(matches!(
            s.decode(b"ns:svc:1.2.3.4:5", b"{"),
            Err(DecodeError::MalformedValue(_))
        ));
        // A further ':' makes it another service's key, not this one's.
        let i = s.decode(b"ns:a:b:1.2.3.4:5", b"").unwrap();
        assert_eq!(i.service, "a:b");
    }

    #[test]
    fn service_names_are_validated() {
        let n = NamingSchema::new();
        for bad in ["", "/a", "a/", "a//b", "a b", "a\nb"] {
            assert!(
                matches!(
                    n.validate_service(bad),
                    Err(Error::InvalidServiceName { .. })
                ),
                "{bad:?}"
            );
        }
        n.validate_service("foo/bar/my-service").unwrap();
        assert!(n
            .encode(&Instance {
                id: "a/b".into(),
                ..inst("s", "h:1")
            })
            .is_err());
        assert!(NamingSchema::with_namespace("a/").is_err());
    }

    mod properties {
        use super::*;
        use crate::instance::parse_addr;
        use proptest::prelude::*;

        fn schemas() -> Vec<Box<dyn Schema>> {
            vec![
                Box::new(NamingSchema::new()),
                Box::new(NamingSchema::with_namespace("ns/a").unwrap()),
                Box::new(ColonSchema::new("ns").unwrap()),
            ]
        }

        proptest! {
            // Keys and values in etcd are data anyone may have written.
            #[test]
            fn decoders_never_panic_and_only_return_dialable_instances(
                key in proptest::collection::vec(any::<u8>(), 0..80),
                value in proptest::collection::vec(any::<u8>(), 0..200),
            ) {
                for schema in schemas() {
                    if let Ok(i) = schema.decode(&key, &value) {
                        prop_assert!(parse_addr(&i.addr).is_ok(), "{i:?}");
                        prop_assert!(!i.service.is_empty());
                    }
                }
            }

            #[test]
            fn hostile_json_values_are_skipped_or_read(
                addr in "\\PC{0,40}",
                meta in "\\PC{0,40}",
                key in "[a-z]{1,8}/[ -~]{1,20}",
            ) {
                let value = serde_json::json!({"Op": 0, "Addr": addr, "Metadata": meta}).to_string();
                if let Ok(i) = NamingSchema::new().decode(key.as_bytes(), value.as_bytes()) {
                    prop_assert!(parse_addr(&i.addr).is_ok());
                }
            }

            #[test]
            fn encode_then_decode_is_identity(
                service in "[A-Za-z0-9._-]{1,12}(/[A-Za-z0-9._-]{1,8})?",
                ip in any::<[u8; 4]>(),
                port in 1u16..,
                meta in proptest::collection::btree_map("[a-z]{1,6}", "\\PC{0,12}", 0..4),
            ) {
                let addr = std::net::SocketAddrV4::new(ip.into(), port).to_string();
                let mut instance = Instance::new(service.clone(), addr);
                for (k, v) in &meta {
                    instance.metadata.insert(k.clone(), v.clone());
                }
                if ip == [0, 0, 0, 0] {
                    return Ok(());
                }
                let mut all: Vec<Box<dyn Schema>> = vec![Box::new(NamingSchema::with_namespace("ns").unwrap())];
                if !service.contains('/') {
                    all.push(Box::new(ColonSchema::new("ns").unwrap()));
                }
                for schema in all {
                    let e = schema.encode(&instance).unwrap();
                    prop_assert_eq!(schema.decode(e.key.as_bytes(), &e.value).unwrap(), instance.clone());
                }
            }
        }
    }
}
