//! Fields of a service config that do nothing here, named with their fix.
//!
//! gRPC ignores fields it does not know (grpc-go decodes the JSON into
//! structs; grpc-java walks maps), so that configs can grow. The price is
//! that a misspelled field is silently a no-op: `requestHashHeaders` for
//! `requestHashHeader` leaves ring hash hashing every call at random. This
//! crate parses as gRPC does (unknown fields stay accepted) and *also*
//! names each of them with the nearest field it knows, for the CLI (which
//! refuses to write such a document unless `--force`) and for the
//! Balancer (a warning per revision, [`ServiceConfigStatus::warnings`]
//! and a gauge).
//!
//! [`ServiceConfigStatus::warnings`]: crate::config_store::ServiceConfigStatus::warnings

use serde_json::{Map, Value};

/// One field of a document that does nothing here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnknownField {
    /// Where it is, e.g. `loadBalancingConfig[0].ring_hash.requestHashHeaders`.
    pub path: String,
    /// What is wrong with it and what to write instead.
    pub hint: String,
}

impl std::fmt::Display for UnknownField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.hint)
    }
}

/// The fields of one object: those this client reads, and those gRPC
/// defines that this client ignores (no typo, but no effect either).
struct Fields {
    read: &'static [&'static str],
    ignored: &'static [&'static str],
}

const ROOT: Fields = Fields {
    read: &["methodConfig", "retryThrottling", "loadBalancingConfig"],
    ignored: &["loadBalancingPolicy", "healthCheckConfig"],
};
const METHOD_CONFIG: Fields = Fields {
    read: &[
        "name",
        "timeout",
        "waitForReady",
        "retryPolicy",
        "hedgingPolicy",
    ],
    ignored: &["maxRequestMessageBytes", "maxResponseMessageBytes"],
};
const NAME: Fields = Fields {
    read: &["service", "method"],
    ignored: &[],
};
const RETRY: Fields = Fields {
    read: &[
        "maxAttempts",
        "initialBackoff",
        "maxBackoff",
        "backoffMultiplier",
        "retryableStatusCodes",
    ],
    ignored: &["perAttemptRecvTimeout"],
};
const HEDGING: Fields = Fields {
    read: &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"],
    ignored: &[],
};
const THROTTLING: Fields = Fields {
    read: &["maxTokens", "tokenRatio"],
    ignored: &[],
};
const RING_HASH: Fields = Fields {
    read: &[
        "minRingSize",
        "maxRingSize",
        "requestHashHeader",
        "hashBalanceFactor",
    ],
    ignored: &[],
};
const SUBSETTING: Fields = Fields {
    read: &["subsetSize", "childPolicy"],
    ignored: &[],
};
/// gRPC's fields of the policies this crate maps onto its cost-weighted
/// pick: valid, without effect here.
const WEIGHTED: Fields = Fields {
    read: &[
        "enableOobLoadReport",
        "oobReportingPeriod",
        "blackoutPeriod",
        "weightExpirationPeriod",
        "weightUpdatePeriod",
        "errorUtilizationPenalty",
    ],
    ignored: &[],
};
const LEAST_REQUEST: Fields = Fields {
    read: &[],
    ignored: &["choiceCount"],
};
const PICK_FIRST: Fields = Fields {
    read: &[],
    ignored: &["shuffleAddressList"],
};
const NONE: Fields = Fields {
    read: &[],
    ignored: &[],
};

/// Policy names this crate knows, with the fields of their config.
const POLICIES: &[(&str, &Fields)] = &[
    ("random_subsetting_experimental", &SUBSETTING),
    ("tonic_etcd_coordinated_subsetting", &SUBSETTING),
    ("ring_hash_experimental", &RING_HASH),
    ("ring_hash", &RING_HASH),
    ("tonic_etcd_cost_weighted", &NONE),
    ("round_robin", &NONE),
    ("weighted_round_robin", &WEIGHTED),
    ("least_request_experimental", &LEAST_REQUEST),
    ("pick_first", &PICK_FIRST),
];

/// Every field of `config` (a service config as JSON) that this client
/// does not read, with a hint. Empty for a clean document; never fails
/// (validation is [`ServiceConfig::from_value`](super::ServiceConfig::from_value)'s).
pub fn unknown_fields(config: &Value) -> Vec<UnknownField> {
    let mut out = Vec::new();
    let Some(root) = config.as_object() else {
        return out;
    };
    object(root, "", &ROOT, &mut out);
    for (name, value) in root {
        match canonical(name, ROOT.read) {
            Some("methodConfig") => {
                for (i, mc) in items(value) {
                    let at = format!("{name}[{i}]");
                    let Some(mc) = mc.as_object() else { continue };
                    object(mc, &at, &METHOD_CONFIG, &mut out);
                    for (field, v) in mc {
                        let fields = match canonical(field, METHOD_CONFIG.read) {
                            Some("name") => {
                                for (k, n) in items(v) {
                                    if let Some(n) = n.as_object() {
                                        object(n, &format!("{at}.{field}[{k}]"), &NAME, &mut out);
                                    }
                                }
                                continue;
                            }
                            Some("retryPolicy") => &RETRY,
                            Some("hedgingPolicy") => &HEDGING,
                            _ => continue,
                        };
                        if let Some(p) = v.as_object() {
                            object(p, &format!("{at}.{field}"), fields, &mut out);
                        }
                    }
                }
            }
            Some("retryThrottling") => {
                if let Some(t) = value.as_object() {
                    object(t, name, &THROTTLING, &mut out);
                }
            }
            Some("loadBalancingConfig") => policies(value, name, &mut out),
            _ => {}
        }
    }
    out
}

/// A `loadBalancingConfig` list: an unknown policy name is how configs
/// name policies for other clients, so only one close to a known name is
/// reported (a typo silently falls through to the next entry).
fn policies(list: &Value, at: &str, out: &mut Vec<UnknownField>) {
    for (i, entry) in items(list) {
        let Some(entry) = entry.as_object() else {
            continue;
        };
        for (name, config) in entry {
            let p_at = format!("{at}[{i}]");
            let Some(fields) = POLICIES.iter().find(|(p, _)| p == name).map(|(_, f)| *f) else {
                let known: Vec<&str> = POLICIES.iter().map(|(p, _)| *p).collect();
                if let Some(near) = nearest(name, &known) {
                    out.push(UnknownField {
                        path: format!("{p_at}.{name}"),
                        hint: format!(
                            "not a policy this client knows, so this entry is skipped; \
                             did you mean {near:?}?"
                        ),
                    });
                }
                continue;
            };
            let c_at = format!("{p_at}.{name}");
            let Some(config) = config.as_object() else {
                continue;
            };
            object(config, &c_at, fields, out);
            if let Some((key, child)) = config
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("childPolicy"))
            {
                policies(child, &format!("{c_at}.{key}"), out);
            }
        }
    }
}

/// The unknown fields of one object.
fn object(obj: &Map<String, Value>, at: &str, fields: &Fields, out: &mut Vec<UnknownField>) {
    for name in obj.keys() {
        if canonical(name, fields.read).is_some() {
            continue;
        }
        let path = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}.{name}")
        };
        if let Some(known) = canonical(name, fields.ignored) {
            out.push(UnknownField {
                path,
                hint: format!("gRPC's {known} is not used by this client (no effect)"),
            });
            continue;
        }
        let hint = match nearest(name, fields.read) {
            Some(near) => format!("not a field this client reads; did you mean {near:?}?"),
            None if fields.read.is_empty() => {
                "not a field this client reads; this object takes none".to_owned()
            }
            None => format!(
                "not a field this client reads (fields here: {})",
                fields.read.join(", ")
            ),
        };
        out.push(UnknownField { path, hint });
    }
}

/// `name` as the known field it stands for (JSON names match without
/// regard to case, as in grpc-go).
fn canonical(name: &str, known: &[&'static str]) -> Option<&'static str> {
    known.iter().copied().find(|k| k.eq_ignore_ascii_case(name))
}

fn items(value: &Value) -> impl Iterator<Item = (usize, &Value)> {
    value.as_array().into_iter().flatten().enumerate()
}

/// The known name closest to `name`, when it is close enough to be a typo:
/// at most a third of its letters (at least 2) edited.
pub(crate) fn nearest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    let (distance, best) = known
        .iter()
        .map(|k| (edits(&lower, &k.to_ascii_lowercase()), *k))
        .min()?;
    (distance <= (name.len() / 3).max(2)).then_some(best)
}

/// Levenshtein distance (names are short: quadratic is fine).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn hints(config: Value) -> Vec<String> {
        unknown_fields(&config)
            .into_iter()
            .map(|u| u.to_string())
            .collect()
    }

    #[test]
    fn a_misspelled_field_is_named_with_the_one_meant() {
        let got = hints(json!({"loadBalancingConfig": [{"ring_hash": {
            "requestHashHeaders": "x-user"}}]}));
        assert_eq!(
            got,
            [
                r#"loadBalancingConfig[0].ring_hash.requestHashHeaders: not a field this client reads; did you mean "requestHashHeader"?"#
            ]
        );
        let got = hints(json!({"methodConfig": [{"name": [{"servce": "a"}],
            "retryPolicy": {"maxAttempt": 2}, "timeOut": "1s"}]}));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter()
                .any(|h| h.starts_with("methodConfig[0].name[0].servce")
                    && h.contains("\"service\"")),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|h| h.contains("maxAttempt:") && h.contains("\"maxAttempts\"")),
            "{got:?}"
        );
    }

    #[test]
    fn case_grpc_fields_and_foreign_policies_are_not_mistakes() {
        assert!(hints(json!({"MethodConfig": [{"Name": [{}], "TIMEOUT": "1s"}],
            "loadBalancingConfig": [{"grpclb": {}}, {"weighted_round_robin": {"blackoutPeriod": "10s"}}]}))
            .iter()
            .all(|h| h.contains("not used by this client")));
        let got = hints(json!({"loadBalancingConfig": [{"ring_hsh": {}}, {"round_robin": {}}]}));
        assert!(got[0].contains("did you mean \"ring_hash\""), "{got:?}");
        let got = hints(
            json!({"loadBalancingConfig": [{"tonic_etcd_coordinated_subsetting": {
            "subsetSize": 2, "childPolicy": [{"ring_hash": {"minRingsize": 1, "bogus": 1}}]}}]}),
        );
        assert_eq!(got.len(), 1, "case is not a mistake: {got:?}");
        assert!(got[0].contains("childPolicy[0].ring_hash.bogus"), "{got:?}");
    }

    /// JSON shaped like a service config: known and unknown keys, at any
    /// depth, with values of every type.
    fn config_like() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("methodConfig".to_owned()),
            Just("loadBalancingConfig".to_owned()),
            Just("ring_hash".to_owned()),
            Just("childPolicy".to_owned()),
            Just("retryPolicy".to_owned()),
            Just("name".to_owned()),
            "[a-zA-Z_]{0,12}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any JSON: no panic, and every path reported is a key that is in
        /// the document (no invented fields).
        #[test]
        fn any_document_is_linted_without_inventing_fields(doc in config_like()) {
            for u in unknown_fields(&doc) {
                let last = u.path.rsplit('.').next().unwrap_or_default();
                prop_assert!(doc.to_string().contains(&format!("\"{last}\"")), "{u} in {doc}");
            }
        }

        /// One letter added to any field this client reads is reported,
        /// with a suggestion no further from the typo than the field meant.
        #[test]
        fn a_one_letter_typo_of_a_known_field_is_caught(
            which in 0..RING_HASH.read.len() + RETRY.read.len(),
            at in 0usize..20,
            letter in "[a-z]",
        ) {
            let (field, doc): (&str, fn(&str) -> Value) = if which < RING_HASH.read.len() {
                (RING_HASH.read[which], |k| json!({"loadBalancingConfig": [{"ring_hash": {k: 1}}]}))
            } else {
                (RETRY.read[which - RING_HASH.read.len()], |k| json!({"methodConfig": [{"name": [{}], "retryPolicy": {k: 1}}]}))
            };
            let mut typo = field.to_owned();
            typo.insert_str(at.min(typo.len()), &letter);
            prop_assume!(canonical(&typo, RING_HASH.read).is_none() && canonical(&typo, RETRY.read).is_none());
            let found = unknown_fields(&doc(&typo));
            prop_assert_eq!(found.len(), 1, "{:?}", found);
            let suggested = found[0].hint.split('"').nth(1).unwrap_or_default();
            prop_assert!(edits(&typo.to_ascii_lowercase(), &suggested.to_ascii_lowercase()) <= 1, "{:?}", found);
        }
    }

    #[test]
    fn edits_count_insertions_deletions_and_substitutions() {
        assert_eq!(edits("kitten", "sitting"), 3);
        assert_eq!(edits("", "abc"), 3);
        assert_eq!(edits("same", "same"), 0);
        assert_eq!(nearest("completelydifferent", &["timeout"]), None);
    }
}
