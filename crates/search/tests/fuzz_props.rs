//! Property tests (fuzzing) of the search-parameter parser and the search it runs: query strings
//! built from the real R4 search parameters (chains, `_has`, modifiers, prefixes, `_sort`,
//! `_include`, OR lists, escapes, percent-encoding) and hostile shapes (huge OR lists and
//! repetition counts, long values, odd numbers and dates). Properties: parsing never panics; a
//! query that parses runs against a real store without panicking and without a server-side
//! error (a client's query is never a 500); `_typeFilter` predicates never panic on resources;
//! percent-encoding round-trips through `parse_query_string`.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not persisted: a failing case is printed, minimized, and
//! becomes a named regression test.

mod support;

use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::Config;
use search::{ParseOptions, Predicate, SearchError, SearchLimits, parse_query, parse_query_string};
use serde_json::Value;
use store::SqliteStore;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // `FUZZ_SCALE` multiplies every property's own default (scripts/fuzz-long.sh).
            let scale: u32 = std::env::var("FUZZ_SCALE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            default_cases.saturating_mul(scale)
        });
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

const TYPES: &[&str] = &[
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "Procedure",
    "Organization",
    "Group",
    "Bundle",
    "Claim",
];

/// A small Synthea store (the first patients' resources), shared by every case.
/// SQLite only: on PostgreSQL some generated queries (long ANDed `_id` lists) ran for minutes
/// without a time limit (open, see docs/testing.md); the server runs every search with one.
fn store() -> &'static (tempfile::TempDir, SqliteStore, Vec<Value>) {
    static STORE: OnceLock<(tempfile::TempDir, SqliteStore, Vec<Value>)> = OnceLock::new();
    STORE.get_or_init(|| {
        let all = support::synthea::load();
        support::load_sqlite_store(&all[..all.len().min(3000)])
    })
}

/// Parameter codes of a type, from the model, plus the common ones.
fn codes(ty: &str) -> Vec<String> {
    let mut v: Vec<String> = fhir_model::r4()
        .search_params(ty)
        .iter()
        .map(|p| p.code.clone())
        .collect();
    v.extend(
        [
            "_id",
            "_lastUpdated",
            "_sort",
            "_count",
            "_include",
            "_revinclude",
            "_total",
            "_summary",
            "_elements",
            "_has",
            "_cursor",
            "_format",
            "nope",
        ]
        .map(str::to_string),
    );
    v.sort();
    v.dedup();
    v
}

fn modifier() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        1 => prop::sample::select(&[
            ":not", ":text", ":exact", ":contains", ":missing", ":identifier", ":Patient",
            ":Practitioner", ":Organization", ":iterate", ":recurse", ":above", ":below", ":in",
            ":of-type", ":", "::", ":Unknown",
        ][..]).prop_map(str::to_string),
    ]
}

fn value() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(
        &[
            "", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "xx",
        ][..],
    );
    let number = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("1e999999999".to_string()),
        Just("-0.000000000000000000000000000000000001".to_string()),
        "[0-9]{1,60}(\\.[0-9]{0,60})?([eE][+-]?[0-9]{1,12})?".prop_map(|s| s),
        Just("NaN".to_string()),
    ];
    let date = prop_oneof![
        "[0-9]{1,5}(-[0-9]{1,2}(-[0-9]{1,2}(T[0-9]{1,2}(:[0-9]{1,2}(:[0-9]{1,2}(\\.[0-9]{0,12})?)?)?(Z|[+-][0-9]{1,2}:[0-9]{1,2})?)?)?)?"
            .prop_map(|s| s),
        Just("2020-02-30".to_string()),
        Just("9999-12-31T23:59:59.999999999+14:00".to_string()),
        Just("0000".to_string()),
    ];
    let token = "[a-zA-Z0-9:/.é-]{0,12}(\\|[a-zA-Z0-9:/.-]{0,12}){0,3}".prop_map(|s| s);
    let text = "[a-zA-Z0-9 ,|$\\\\:/.%&=+éß\u{1F600}-]{0,24}".prop_map(|s| s);
    let reference = prop_oneof![
        "(Patient|Observation|Unknown|)/[A-Za-z0-9.-]{0,70}(/_history/[0-9]{1,3})?".prop_map(|s| s),
        "https?://[a-z]{1,8}/fhir/Patient/[a-z0-9]{1,8}".prop_map(|s| s),
        "urn:uuid:[0-9a-f-]{0,36}".prop_map(|s| s),
    ];
    let single = prop_oneof![
        (prefix.clone(), number.clone()).prop_map(|(p, n)| format!("{p}{n}")),
        (prefix.clone(), date).prop_map(|(p, d)| format!("{p}{d}")),
        (prefix, number, token.clone()).prop_map(|(p, n, t)| format!("{p}{n}|{t}")),
        token,
        text,
        reference,
        prop::sample::select(
            &[
                "true",
                "false",
                "count",
                "accurate",
                "estimate",
                "none",
                "*",
                "-date",
                "date,-_id,name"
            ][..]
        )
        .prop_map(str::to_string),
    ];
    prop::collection::vec(single, 1..4).prop_map(|v| v.join(","))
}

/// One (name, value) pair from the real parameters of `ty`: plain, with a modifier, chained (one
/// level or more), reverse-chained through `_has`, or a result parameter.
fn pair(ty: &'static str) -> impl Strategy<Value = (String, String)> {
    let codes = codes(ty);
    let all_types = TYPES.to_vec();
    let name = prop_oneof![
        4 => (prop::sample::select(codes.clone()), modifier()).prop_map(|(c, m)| format!("{c}{m}")),
        2 => (
            prop::sample::select(codes.clone()),
            modifier(),
            prop::collection::vec(("[a-z-]{0,3}", prop::sample::select(&["name", "identifier", "subject", "patient", "organization", "code", "birthdate", "general-practitioner", "_id", "x"][..])), 1..4),
        )
            .prop_map(|(c, m, chain)| {
                let mut s = format!("{c}{m}");
                for (junk, link) in chain {
                    s.push('.');
                    s.push_str(if junk.is_empty() { link } else { &junk });
                }
                s
            }),
        2 => (
            prop::sample::select(all_types.clone()),
            prop::sample::select(&["patient", "subject", "encounter", "organization", "general-practitioner", "x", ""][..]),
            prop::sample::select(codes.clone()),
            modifier(),
            0usize..3,
        )
            .prop_map(|(t, r, c, m, nest)| {
                format!("{}{t}:{r}:{c}{m}", "_has:Observation:patient:".repeat(nest) + "_has:")
            }),
        1 => (
            prop::sample::select(&["_include", "_revinclude", "_include:iterate", "_revinclude:recurse", "_include:bad"][..]),
            prop::sample::select(all_types),
            prop::sample::select(&["subject", "patient", "*", "general-practitioner", "code", ""][..]),
            prop::option::of(prop::sample::select(&["Patient", "Organization", "Nope"][..])),
        )
            .prop_map(|(n, t, p, target)| {
                let v = match target {
                    Some(x) => format!("{t}:{p}:{x}"),
                    None => format!("{t}:{p}"),
                };
                (n.to_string() + "=" + &v).to_string()
            }),
    ];
    (name, value()).prop_map(|(n, v)| match n.split_once('=') {
        // The `_include` arm carries its own value.
        Some((name, own)) if n.starts_with("_include") || n.starts_with("_revinclude") => {
            (name.to_string(), own.to_string())
        }
        _ => (n, v),
    })
}

fn query() -> impl Strategy<Value = (&'static str, Vec<(String, String)>)> {
    prop::sample::select(TYPES)
        .prop_flat_map(|ty| (Just(ty), prop::collection::vec(pair(ty), 0..6)))
}

/// Percent-encodes everything but unreserved characters; `space_as_plus` writes a space as `+`.
fn encode(s: &str, space_as_plus: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' if space_as_plus => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn to_query_string(pairs: &[(String, String)], space_as_plus: bool) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k, space_as_plus), encode(v, space_as_plus)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Parses (strict and lenient) and runs what parses against the store, twice: as is (errors are
/// fine, a panic is not), and within the server's default request limits
/// ([`SearchLimits`], checked as the server checks them), where a server-side error is a bug
/// too: a client's query is never a 500.
fn check(ty: &str, pairs: &[(String, String)]) -> Result<(), TestCaseError> {
    let (_, store, _) = store();
    let limits = SearchLimits::default();
    for lenient in [false, true] {
        let opts = ParseOptions {
            lenient,
            predicate_only: false,
        };
        let Ok(q) = parse_query(ty, pairs, opts) else {
            continue;
        };
        let _ = search::execute(store, &q);
        if limits.check_request(pairs).is_err() || limits.check_query(&q).is_err() {
            continue;
        }
        let exec = search::ExecOptions {
            max_included: limits.max_included,
            ..Default::default()
        };
        if let Err(e @ SearchError::Store(_)) = search::execute_with(store, &q, &exec) {
            return Err(TestCaseError::fail(format!(
                "{ty}?{pairs:?}: server-side error {e:?}"
            )));
        }
    }
    let _ = parse_query(
        ty,
        pairs,
        ParseOptions {
            lenient: false,
            predicate_only: true,
        },
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn grammar_queries_parse_and_run_without_panic_or_server_error((ty, pairs) in query()) {
        check(ty, &pairs)?;
    }

    #[test]
    fn query_strings_round_trip_percent_encoding(
        pairs in prop::collection::vec(("\\PC{0,12}", "\\PC{0,24}"), 0..6),
        space_as_plus in any::<bool>(),
    ) {
        // Names and values without `&`/`=` literal need no context; empty names are dropped.
        let pairs: Vec<(String, String)> = pairs.into_iter().filter(|(k, v)| !(k.is_empty() && v.is_empty())).collect();
        let qs = to_query_string(&pairs, space_as_plus);
        prop_assert_eq!(parse_query_string(&qs), pairs);
    }

    #[test]
    fn raw_query_strings_never_panic(ty in prop::sample::select(TYPES), qs in "[a-z_:.|,=&%0-9A-F+$\\\\ -]{0,60}") {
        let pairs = parse_query_string(&qs);
        check(ty, &pairs)?;
        let _ = Predicate::compile(ty, &qs);
    }

    #[test]
    fn type_filter_predicates_never_panic_on_real_resources(
        (ty, pairs) in query(),
        pick in any::<prop::sample::Index>(),
    ) {
        let (_, _, stored) = store();
        if let Ok(p) = Predicate::from_pairs(ty, &pairs) {
            let same_type: Vec<&Value> = stored.iter().filter(|r| r["resourceType"] == ty).collect();
            if !same_type.is_empty() {
                let _ = p.matches(same_type[pick.index(same_type.len())]);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// Huge OR lists, long AND lists, long values and deep chains.
    #[test]
    fn hostile_queries_never_panic_or_fail_server_side(
        ty in prop::sample::select(TYPES),
        shape in 0usize..6,
        n in prop_oneof![1usize..10, 500usize..1500, 5000usize..20_000],
    ) {
        let pairs: Vec<(String, String)> = match shape {
            0 => vec![("_id".into(), (0..n).map(|i| format!("id{i}")).collect::<Vec<_>>().join(","))],
            1 => (0..n.min(2000)).map(|i| ("_id".into(), format!("x{i}"))).collect(),
            2 => vec![("_lastUpdated".into(), format!("ge{}", "9".repeat(n)))],
            3 => vec![(format!("general-practitioner{}", ".organization".repeat(n.min(500))), "x".into())],
            4 => vec![("_sort".into(), vec!["-_lastUpdated"; n].join(","))],
            _ => vec![("_has:Observation:patient:code".into(), vec!["http://loinc.org|1234-5"; n].join(","))],
        };
        check(ty, &pairs)?;
    }
}
