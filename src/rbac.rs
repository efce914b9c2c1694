//! The etcd roles each part of a deployment needs under one namespace, and
//! their creation: `tonic-etcd rbac`.
//!
//! A namespace's keys are its instances (`<ns>/<service>/<id>`) and this
//! crate's own keys beside them (`<ns>/_tonic-etcd/{clients,overrides,
//! service-config}/…`, see [`Reserved`]). One role with `readwrite` on the
//! namespace's prefix runs everything; the roles here give each part only
//! what it uses:
//!
//! | part | reads | writes |
//! |---|---|---|
//! | [`Part::Server`] | its own keys | instances, overrides |
//! | [`Part::Client`] | the namespace | client keys |
//! | [`Part::Viewer`] | the namespace | — |
//! | [`Part::Operator`] | the namespace | overrides, instances |
//! | [`Part::Config`] | the namespace | service configs |
//!
//! Two rows are wider than their part's own keys, because etcd checks a
//! lease as a whole: putting a key with a lease, and revoking a lease,
//! needs write permission on *every* key bound to that lease (etcd's
//! `checkLeasePuts`). A drain is bound to the drained instance's lease, so
//! the operator who writes it needs write on the instance's key, and the
//! server that re-writes its key or revokes its lease on shutdown needs
//! write on the overrides bound to it. Without those grants a drained
//! server could not deregister, and a drain could not be set.
//!
//! Instances are granted as the two ranges around `<ns>/_tonic-etcd/`, so
//! a server cannot write service configs or client keys.

use etcd_client::{Permission, PermissionType};

use crate::schema::{Reserved, Schema, RESERVED};
use crate::{Error, Etcd};

/// A part of a deployment that talks to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A registering server ([`Registration`](crate::Registration),
    /// `tonic-etcd register`).
    Server,
    /// A client: [`Balancer`](crate::Balancer) (with service config,
    /// overrides and coordinated subsetting), [`Discover`](crate::Discover),
    /// [`Catalog`](crate::Catalog).
    Client,
    /// Reading only: the console without `--allow-writes`, `tonic-etcd
    /// list`, `watch` and `config get`.
    Viewer,
    /// Drains and weights: the console with `--allow-writes`, `tonic-etcd
    /// drain`, `undrain` and `weight`.
    Operator,
    /// `tonic-etcd config set` and `config rm`.
    Config,
}

impl Part {
    /// Every part.
    pub const ALL: [Part; 5] = [
        Self::Server,
        Self::Client,
        Self::Viewer,
        Self::Operator,
        Self::Config,
    ];

    /// Its name in role and user names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Config => "config",
        }
    }

    /// What it is for, in a sentence.
    pub fn purpose(self) -> &'static str {
        match self {
            Self::Server => "registering servers",
            Self::Client => "Balancers, Discovers and Catalogs (service config, overrides, coordinated subsetting)",
            Self::Viewer => "the console read-only; tonic-etcd list, watch, config get",
            Self::Operator => "the console with --allow-writes; tonic-etcd drain, undrain, weight",
            Self::Config => "tonic-etcd config set and config rm",
        }
    }
}

/// Read or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Range and watch.
    Read,
    /// Also put, delete, and leases bound to the keys.
    ReadWrite,
}

impl Access {
    /// As etcdctl spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::ReadWrite => "readwrite",
        }
    }
}

/// One permission: `access` on the keys from `key` up to (not including)
/// `range_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Read or read-write.
    pub access: Access,
    /// The first key.
    pub key: String,
    /// The end of the range (exclusive).
    pub range_end: String,
    /// Why the part needs it.
    pub why: &'static str,
}

impl Grant {
    fn prefix(access: Access, key: String, why: &'static str) -> Self {
        let range_end = prefix_end(&key);
        Self {
            access,
            key,
            range_end,
            why,
        }
    }

    /// Whether it covers every key that starts with [`key`](Self::key).
    pub fn is_prefix(&self) -> bool {
        prefix_end(&self.key) == self.range_end
    }

    /// The etcdctl command that grants it to `role`.
    pub fn etcdctl(&self, role: &str) -> String {
        let (key, end) = (shell_quote(&self.key), shell_quote(&self.range_end));
        if self.is_prefix() {
            format!(
                "etcdctl role grant-permission {role} --prefix {} {key}",
                self.access.as_str()
            )
        } else {
            format!(
                "etcdctl role grant-permission {role} {} {key} {end}",
                self.access.as_str()
            )
        }
    }

    fn permission(&self) -> Permission {
        let kind = match self.access {
            Access::Read => PermissionType::Read,
            Access::ReadWrite => PermissionType::Readwrite,
        };
        Permission::new(kind, self.key.as_str()).with_range_end(self.range_end.as_str())
    }
}

/// A role for one part: its name and grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The part it serves.
    pub part: Part,
    /// The role's (and its user's) name.
    pub name: String,
    /// What it may do.
    pub grants: Vec<Grant>,
}

/// The roles of every part for the namespace of `schema`, named
/// `<prefix>-<part>` (see the [module docs](self)). Needs a namespace:
/// without one the instances are every key in etcd.
pub fn roles(schema: &dyn Schema, prefix: &str) -> Result<Vec<Role>, Error> {
    let root = schema.root_prefix();
    if root.is_empty() {
        return Err(Error::InvalidConfig(
            "roles are per namespace: give the schema a namespace (--namespace)".into(),
        ));
    }
    // Its range end is the prefix with the last byte raised by one, which
    // is text only when that byte is ASCII (the schemas' separators are).
    if !root.ends_with(|c: char| c.is_ascii() && c != '\x7f') {
        return Err(Error::InvalidConfig(format!(
            "the namespace prefix {root:?} must end in an ASCII character for its key range"
        )));
    }
    let reserved = format!("{root}{RESERVED}");
    let instances = |access, why| {
        [
            Grant {
                access,
                key: root.clone(),
                range_end: reserved.clone(),
                why,
            },
            Grant {
                access,
                key: prefix_end(&reserved),
                range_end: prefix_end(&root),
                why,
            },
        ]
    };
    let namespace = Grant::prefix(
        Access::Read,
        root.clone(),
        "instances, service configs, overrides",
    );
    let kind = |kind: Reserved, why| Grant::prefix(Access::ReadWrite, kind.prefix(schema), why);
    let lease_rule =
        "etcd checks write on every key of a lease: drains are bound to the instance's lease";
    Ok(Part::ALL
        .into_iter()
        .map(|part| {
            let grants = match part {
                Part::Server => {
                    let mut g = instances(Access::ReadWrite, "its instance keys").to_vec();
                    g.push(kind(Reserved::Overrides, lease_rule));
                    g
                }
                Part::Client => vec![
                    namespace.clone(),
                    kind(Reserved::Clients, "its client key (coordinated subsetting)"),
                ],
                Part::Viewer => vec![namespace.clone()],
                Part::Operator => {
                    let mut g = vec![
                        namespace.clone(),
                        kind(Reserved::Overrides, "drains and weights"),
                    ];
                    g.extend(instances(Access::ReadWrite, lease_rule));
                    g
                }
                Part::Config => vec![
                    namespace.clone(),
                    kind(Reserved::ServiceConfig, "service configs"),
                ],
            };
            Role {
                part,
                name: format!("{prefix}-{}", part.name()),
                grants,
            }
        })
        .collect())
}

/// The default role name prefix for `namespace`: `tonic-etcd-<namespace>`,
/// with characters other than letters, digits, `.`, `_` and `-` as `_`.
pub fn default_prefix(namespace: &str) -> String {
    let ns: String = namespace
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    format!("tonic-etcd-{ns}")
}

/// The etcdctl commands that create `roles` (and, with `users`, a user
/// per role holding it).
pub fn script(roles: &[Role], users: bool) -> String {
    let mut out = String::new();
    for role in roles {
        out.push_str(&format!("# {}: {}\n", role.name, role.part.purpose()));
        out.push_str(&format!("etcdctl role add {}\n", role.name));
        for g in &role.grants {
            out.push_str(&g.etcdctl(&role.name));
            out.push('\n');
        }
        if users {
            out.push_str(&format!("etcdctl user add {} --interactive\n", role.name));
            out.push_str(&format!("etcdctl user grant-role {0} {0}\n", role.name));
        }
        out.push('\n');
    }
    out
}

/// What [`apply`] did for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The role (and user) name.
    pub name: String,
    /// Whether the role was new.
    pub role_created: bool,
    /// The new user's password, when a user was created (shown once).
    pub password: Option<String>,
}

/// Creates `roles` in etcd (as a user allowed to: etcd's `root`), granting
/// what each lacks; with `users`, a user per role holding it, with a new
/// random password. Existing roles keep their other grants; existing users
/// keep their password. Safe to run again.
pub async fn apply(etcd: &Etcd, roles: &[Role], users: bool) -> Result<Vec<Applied>, Error> {
    // Managing roles and users is for etcd's root role; say so on a refusal.
    let failed = |op: &'static str| move |source| Error::Etcd { op, source };
    let mut client = etcd.clone();
    let mut applied = Vec::new();
    for role in roles {
        let role_created = match client.role_add(role.name.as_str()).await {
            Ok(_) => true,
            Err(e) if e.to_string().contains("already exists") => false,
            Err(e) => return Err(failed("role add (as etcd's root user)")(e)),
        };
        for g in &role.grants {
            client
                .role_grant_permission(role.name.as_str(), g.permission())
                .await
                .map_err(failed("role grant-permission"))?;
        }
        let password = if users {
            let password = new_password();
            match client
                .user_add(role.name.as_str(), password.as_str(), None)
                .await
            {
                Ok(_) => Some(password),
                Err(e) if e.to_string().contains("already exists") => None,
                Err(e) => return Err(failed("user add")(e)),
            }
        } else {
            None
        };
        if users {
            client
                .user_grant_role(role.name.as_str(), role.name.as_str())
                .await
                .map_err(failed("user grant-role"))?;
        }
        applied.push(Applied {
            name: role.name.clone(),
            role_created,
            password,
        });
    }
    Ok(applied)
}

/// 24 characters from a 62-letter alphabet: 142 bits from the OS's
/// generator (through `rand`'s thread RNG).
fn new_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// The first key after every key that starts with `prefix` (etcd's range
/// end), as text: `roles` admits only prefixes ending in ASCII, whose end
/// is ASCII too.
fn prefix_end(prefix: &str) -> String {
    String::from_utf8(crate::watcher::prefix_end(prefix.as_bytes())).unwrap_or_default()
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@+,".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColonSchema, NamingSchema};
    use crate::{Instance, Metadata};
    use proptest::prelude::*;

    /// What `role` may do with `key`: (read, write).
    fn may(role: &Role, key: &str) -> (bool, bool) {
        let covering = || {
            role.grants
                .iter()
                .filter(|g| key >= g.key.as_str() && key < g.range_end.as_str())
        };
        let read = covering().next().is_some();
        let write = covering().any(|g| g.access == Access::ReadWrite);
        (read, write)
    }

    fn role(roles: &[Role], part: Part) -> &Role {
        roles.iter().find(|r| r.part == part).unwrap()
    }

    fn schemas(ns: &str) -> Vec<Box<dyn Schema>> {
        vec![
            Box::new(NamingSchema::with_namespace(ns).unwrap()),
            Box::new(ColonSchema::new(ns).unwrap()),
        ]
    }

    /// The key of each kind for `service` and `id`, by the code that writes
    /// it (the stores' layouts), not by a copy of the rule.
    fn keys_of(
        schema: &dyn Schema,
        service: &str,
        id: &str,
    ) -> Option<[(&'static str, String); 4]> {
        let addr = "10.0.0.1:80";
        let instance = schema
            .encode(&Instance {
                service: service.into(),
                id: id.into(),
                addr: addr.into(),
                metadata: Metadata::new(),
            })
            .ok()?
            .key;
        let beside = |kind: Reserved| {
            let entry = Instance {
                service: service.into(),
                id: id.into(),
                addr: addr.into(),
                metadata: Metadata::new(),
            };
            kind.schema(schema).unwrap().encode(&entry).unwrap().key
        };
        Some([
            ("instance", instance),
            ("override", beside(Reserved::Overrides)),
            ("client", beside(Reserved::Clients)),
            (
                "config",
                crate::config_store::config_key(schema, service).ok()?,
            ),
        ])
    }

    proptest! {
        /// Every part may do exactly what the table in the module docs
        /// says, for every service name and instance id either schema
        /// takes (upper-case, lower-case, digits and `_` sort on both sides
        /// of `_tonic-etcd/`), and nothing in a sibling namespace.
        #[test]
        fn each_part_reaches_exactly_its_keys(
            service in "[A-Za-z0-9._-]{1,6}(/[A-Za-z0-9._-]{1,6})?",
            id in "[A-Za-z0-9._:-]{1,8}",
            ns in "[a-z][a-z0-9-]{0,6}",
        ) {
            for schema in schemas(&ns) {
                let roles = roles(&*schema, "p").unwrap();
                // The colon schema's id is its address.
                let id = if schema.name() == "colon" { "10.0.0.1:80" } else { id.as_str() };
                let Some(keys) = keys_of(&*schema, &service, id) else { continue };
                for (kind, key) in &keys {
                    for part in Part::ALL {
                        let expected = match (part, *kind) {
                            (Part::Server, "instance" | "override") => (true, true),
                            (Part::Server, _) => (false, false),
                            (Part::Client, "client") => (true, true),
                            (Part::Operator, "instance" | "override") => (true, true),
                            (Part::Config, "config") => (true, true),
                            _ => (true, false),
                        };
                        prop_assert_eq!(
                            may(role(&roles, part), key), expected,
                            "{:?} on {} key {} ({})", part, kind, key, schema.name()
                        );
                    }
                }
                // A sibling namespace whose name extends this one.
                let sibling = schemas(&format!("{ns}-b")).remove(if schema.name() == "colon" { 1 } else { 0 });
                if let Some(keys) = keys_of(&*sibling, &service, id) {
                    for (kind, key) in &keys {
                        for r in &roles {
                            prop_assert_eq!(may(r, key), (false, false), "{} reaches {} {}", r.name, kind, key);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn without_a_namespace_there_are_no_roles() {
        let err = roles(&NamingSchema::new(), "p").unwrap_err();
        assert!(err.to_string().contains("--namespace"), "{err}");
    }

    #[test]
    fn the_script_is_what_etcdctl_takes() {
        let roles = roles(&NamingSchema::with_namespace("prod").unwrap(), "t").unwrap();
        let script = script(&roles, true);
        assert!(script.contains(
            "etcdctl role grant-permission t-server readwrite prod/ prod/_tonic-etcd/\n"
        ));
        assert!(script.contains(
            "etcdctl role grant-permission t-server readwrite prod/_tonic-etcd0 prod0\n"
        ));
        assert!(script.contains(
            "etcdctl role grant-permission t-client --prefix readwrite prod/_tonic-etcd/clients/\n"
        ));
        assert!(script.contains("etcdctl user grant-role t-viewer t-viewer\n"));
        let colon = roles_for_colon();
        assert!(colon.contains("'apc;'"), "{colon}");
    }

    fn roles_for_colon() -> String {
        script(
            &roles(&ColonSchema::new("apc").unwrap(), "t").unwrap(),
            false,
        )
    }

    #[test]
    fn passwords_are_long_and_differ() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
    }
}
