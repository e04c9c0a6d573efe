//! Search behaviour on a small hand-made data set: paging and sorting, totals, includes,
//! updates and deletes, `_lastUpdated`, lenient handling, and `_typeFilter` predicate sets.

mod support;

use search::{ParseOptions, Predicate, PredicateSet, SearchError, parse_query, parse_query_string};
use serde_json::{Value, json};
use store::{Store, WriteOp};

fn patient(id: &str, family: &str, birth: &str) -> Value {
    json!({"resourceType":"Patient","id":id,"name":[{"family":family,"given":["Ann"]}],"birthDate":birth,"gender":"female"})
}

fn obs(id: &str, subject: &str, code: &str, date: &str, value: f64) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":code}]},
        "subject":{"reference":format!("Patient/{subject}")},
        "effectiveDateTime":date,
        "valueQuantity":{"value":value,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"}})
}

fn data() -> Vec<Value> {
    let mut v = vec![
        patient("p1", "Zeta", "1980-01-01"),
        patient("p2", "Alpha", "1990-05-05"),
        patient("p3", "Müller", "1970-03-03"),
    ];
    for i in 0..25 {
        let p = ["p1", "p2", "p3"][i % 3];
        v.push(obs(
            &format!("o{i:02}"),
            p,
            if i % 2 == 0 { "29463-7" } else { "8302-2" },
            &format!("2020-01-{:02}T10:00:00Z", i + 1),
            50.0 + i as f64,
        ));
    }
    v.push(json!({"resourceType":"Provenance","id":"prov1","target":[{"reference":"Patient/p1"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"reference":"Patient/p1"}}]}));
    v
}

fn run(store: &dyn Store, ty: &str, q: &str) -> Result<search::SearchPage, SearchError> {
    let query = parse_query(ty, &parse_query_string(q), ParseOptions::default())?;
    search::execute(store, &query)
}

fn ids(rs: &[Value]) -> Vec<&str> {
    rs.iter()
        .map(|r| r["id"].as_str().unwrap_or_default())
        .collect()
}

#[test]
fn sorting_and_keyset_paging() {
    let (store, _) = support::load_store(&data());
    let all = support::search_ids(&*store, "Observation", "_sort=-date&_count=4").unwrap();
    let expected: Vec<String> = (0..25).rev().map(|i| format!("o{i:02}")).collect();
    assert_eq!(all, expected);
    let asc = support::search_ids(
        &*store,
        "Observation",
        "code=29463-7&_sort=date,_id&_count=5",
    )
    .unwrap();
    assert_eq!(
        asc,
        (0..25)
            .step_by(2)
            .map(|i| format!("o{i:02}"))
            .collect::<Vec<_>>()
    );
    let by_name = support::search_ids(&*store, "Patient", "_sort=family&_count=1").unwrap();
    assert_eq!(by_name, ["p2", "p3", "p1"]); // alpha, muller, zeta (normalized)
    let desc_id = support::search_ids(&*store, "Patient", "_sort=-_id&_count=2").unwrap();
    assert_eq!(desc_id, ["p3", "p2", "p1"]);
}

#[test]
fn totals_and_summary_count() {
    let (store, _) = support::load_store(&data());
    let p = run(
        &*store,
        "Observation",
        "code=29463-7&_total=accurate&_count=2",
    )
    .unwrap();
    assert_eq!(p.total, Some(13));
    assert_eq!(p.matches.len(), 2);
    assert!(p.next_cursor.is_some());
    let p = run(&*store, "Observation", "_summary=count").unwrap();
    assert_eq!(p.total, Some(25));
    assert!(p.matches.is_empty());
}

#[test]
fn include_and_revinclude() {
    let (store, _) = support::load_store(&data());
    let p = run(
        &*store,
        "Observation",
        "_id=o00,o03&_include=Observation:subject",
    )
    .unwrap();
    assert_eq!(ids(&p.matches), ["o00", "o03"]);
    assert_eq!(ids(&p.included), ["p1"]);
    let p = run(
        &*store,
        "Observation",
        "_id=o01&_include=Observation:patient:Patient",
    )
    .unwrap();
    assert_eq!(ids(&p.included), ["p2"]);
    let p = run(&*store, "Patient", "_id=p1&_revinclude=Provenance:target").unwrap();
    assert_eq!(ids(&p.included), ["prov1"]);
    let p = run(
        &*store,
        "Patient",
        "_id=p2&_revinclude=Observation:subject&_include:iterate=Observation:subject",
    )
    .unwrap();
    assert_eq!(p.included.len(), 8);
    let params = parse_query_string("_id=o00&_include=Observation:subject");
    let q = parse_query("Observation", &params, ParseOptions::default()).unwrap();
    let page = search::execute(&*store, &q).unwrap();
    let b = search::searchset_bundle("http://x/fhir", &q, &params, &page);
    assert_eq!(b["entry"][1]["search"]["mode"], "include");
    assert_eq!(b["entry"][1]["fullUrl"], "http://x/fhir/Patient/p1");
}

#[test]
fn updates_and_deletes_keep_the_index_current() {
    let (store, _) = support::load_store(&data());
    let mut p = patient("p2", "Beta", "1990-05-05");
    p["gender"] = json!("male");
    store
        .write(vec![WriteOp::Update {
            resource_type: "Patient".into(),
            id: "p2".into(),
            resource: p,
            if_match: None,
        }])
        .unwrap();
    assert_eq!(
        support::search_ids(&*store, "Patient", "family=alpha").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        support::search_ids(&*store, "Patient", "family=beta").unwrap(),
        ["p2"]
    );
    assert_eq!(
        support::search_ids(&*store, "Patient", "gender=female").unwrap(),
        ["p1", "p3"]
    );
    store
        .write(vec![WriteOp::Delete {
            resource_type: "Patient".into(),
            id: "p1".into(),
            if_match: None,
        }])
        .unwrap();
    assert_eq!(
        support::search_ids(&*store, "Patient", "gender=female").unwrap(),
        ["p3"]
    );
    assert_eq!(
        support::search_ids(&*store, "Patient", "_id=p1").unwrap(),
        Vec::<String>::new()
    );
    // chains only follow current targets
    assert!(
        support::search_ids(&*store, "Observation", "subject:Patient.family=zeta")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn last_updated_uses_transaction_instants() {
    let (store, stored) = support::load_store(&data());
    let lu = stored[0]["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(std::time::Duration::from_millis(5));
    store
        .write(vec![WriteOp::Create {
            resource: patient("p9", "Late", "2000-01-01"),
        }])
        .unwrap();
    let after = support::search_ids(&*store, "Patient", &format!("_lastUpdated=gt{lu}")).unwrap();
    assert_eq!(after, ["p9"]);
    let upto = support::search_ids(&*store, "Patient", &format!("_lastUpdated=le{lu}")).unwrap();
    assert_eq!(upto, ["p1", "p2", "p3"]);
    let p9 = store.read("Patient", "p9").unwrap();
    let p9: Value = serde_json::from_slice(&p9.json).unwrap();
    let pred = Predicate::compile("Patient", &format!("_lastUpdated=gt{lu}")).unwrap();
    assert!(pred.matches(&p9));
    assert!(!pred.matches(&stored[0]));
}

#[test]
fn errors_and_lenient_handling() {
    let (store, _) = support::load_store(&data());
    for (q, param) in [
        ("birthdate=2020-13-45", "birthdate"),
        ("_count=-1", "_count"),
        ("birthdate=zz2020", "birthdate"),
        ("gender.name=x", "gender.name"),
        ("_cursor=nothex", "_cursor"),
    ] {
        let e = run(&*store, "Patient", q).unwrap_err();
        assert_eq!(e.param(), Some(param), "{q}: {e}");
    }
    assert!(matches!(
        run(&*store, "Patient", "nope=1"),
        Err(SearchError::UnknownParameter { .. })
    ));
    let q = parse_query(
        "Patient",
        &parse_query_string("nope=1&family=zeta"),
        ParseOptions {
            lenient: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(q.ignored[0].param, "nope");
    assert_eq!(ids(&search::execute(&*store, &q).unwrap().matches), ["p1"]);
}

/// A cursor the client edited (well-formed hex JSON, values of the wrong type for their sort
/// keys) is a 400 on `_cursor` on every backend: PostgreSQL refused to compare a text cursor
/// value with a date column (a 500), SQLite compared them anyway. A NUL in a value, and a NUL
/// in a search value, which no PostgreSQL text can hold, are refused the same way.
#[test]
fn tampered_cursors_and_nul_values_are_invalid_on_every_backend() {
    let (store, _) = support::load_store(&data());
    let hex = |text: &str| -> String { text.bytes().map(|b| format!("{b:02x}")).collect() };
    let query = "code=29463-7&_sort=date,_id&_count=5";
    let first = run(&*store, "Observation", query).unwrap();
    let cursor = first.next_cursor.expect("a next page");
    let next = run(&*store, "Observation", &format!("{query}&_cursor={cursor}")).unwrap();
    assert_eq!(next.matches.len(), 5);
    for tampered in [
        r#"["2020","o08",9]"#.to_string(),
        r#"[5,7,9]"#.to_string(),
        r#"[1.5,"o08",9]"#.to_string(),
        r#"[null,"o08",9]"#.to_string(),
        r#"[5,"o\u0000",9]"#.to_string(),
    ] {
        let e = run(
            &*store,
            "Observation",
            &format!("{query}&_cursor={}", hex(&tampered)),
        )
        .unwrap_err();
        assert!(
            matches!(&e, SearchError::InvalidValue { param, .. } if param == "_cursor"),
            "{tampered}: {e:?}"
        );
    }
    for q in ["family=a%00b", "_id=p%001", "code=29463-7%00"] {
        let ty = if q.starts_with("code") {
            "Observation"
        } else {
            "Patient"
        };
        let e = run(&*store, ty, q).unwrap_err();
        assert!(matches!(&e, SearchError::InvalidValue { .. }), "{q}: {e:?}");
    }
}

#[test]
fn type_filter_sets_or_per_type_and_pass_other_types() {
    let mut set = PredicateSet::new();
    set.add_type_filter("Observation?code=29463-7&value-quantity=lt52")
        .unwrap();
    set.add_type_filter("Observation?date=ge2020-01-25")
        .unwrap();
    let d = data();
    let selected: Vec<&str> = d
        .iter()
        .filter(|r| set.matches(r))
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(selected, ["p1", "p2", "p3", "o00", "o24", "prov1"]);
    for bad in [
        "Observation?subject:Patient.name=x",
        "Patient?_has:Observation:patient:code=1",
        "Observation?_sort=date",
        "Observation?_include=Observation:subject",
        "Observation?code-value-quantity=x",
        "Nope?x=1",
        "Observation",
    ] {
        assert!(set.add_type_filter(bad).is_err(), "{bad}");
    }
}

#[test]
fn search_bundle_for_the_server() {
    let (store, _) = support::load_store(&data());
    let b = search::search_bundle(
        &*store,
        "http://h/fhir",
        "Patient",
        &parse_query_string("family=zeta&_total=accurate"),
        false,
    )
    .unwrap();
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["resource"]["id"], "p1");
    let e = search::search_bundle(
        &*store,
        "http://h/fhir",
        "Patient",
        &parse_query_string("birthdate=2020-13-45"),
        false,
    )
    .unwrap_err();
    assert_eq!(e.http_status(), 400);
    let oo = e.operation_outcome();
    assert_eq!(oo["issue"][0]["code"], "invalid");
    assert_eq!(oo["issue"][0]["expression"][0], "birthdate");
}

fn letters(seed: u64, n: usize) -> String {
    store::testing::incompressible_letters(seed, n)
}

/// Texts longer than an index row may hold (PostgreSQL refuses B-tree rows over 2,704 bytes:
/// such a resource was refused with 500 there) are stored, and found by their values on every
/// backend: by the first 1,024 bytes (`store::MAX_INDEXED_TEXT`), and whole with `:exact`.
#[test]
fn resources_with_very_long_indexed_texts_are_stored_and_found() {
    let family = letters(1, 4000);
    let (id_system, id_value) = (format!("urn:x:{}", letters(2, 3000)), letters(3, 3000));
    let (code_system, code) = (format!("urn:c:{}", letters(4, 3000)), letters(5, 3000));
    let text = letters(6, 5000);
    let url = format!("http://example.org/{}", letters(7, 3000));
    let patient = json!({"resourceType": "Patient", "id": "long",
        "name": [{"family": family}],
        "identifier": [{"system": id_system, "value": id_value}]});
    let other = json!({"resourceType": "Patient", "id": "other",
        "name": [{"family": format!("{}zz", &family[..2000])}]});
    let obs = json!({"resourceType": "Observation", "id": "o", "status": "final",
        "code": {"coding": [{"system": code_system, "code": code}], "text": text},
        "subject": {"reference": "Patient/long"},
        "instantiatesUri": url});
    let (store, stored) = support::load_store(&[patient, other, obs]);
    assert_eq!(stored.len(), 3);
    let find = |ty: &str, q: String| support::search_ids(&*store, ty, &q).unwrap();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(find("Patient", format!("family={}", &family[..20]))),
        ["long", "other"]
    );
    assert!(find("Patient", format!("family={}", &family[1..20])).is_empty());
    // Both share the first 2,000 letters: the first 1,024 bytes of a longer value are compared.
    assert_eq!(
        sorted(find("Patient", format!("family={family}"))),
        ["long", "other"]
    );
    assert_eq!(find("Patient", format!("family:exact={family}")), ["long"]);
    assert!(find("Patient", format!("family:exact={}", &family[..3999])).is_empty());
    assert_eq!(
        sorted(find(
            "Patient",
            format!("family:contains={}", &family[500..540])
        )),
        ["long", "other"]
    );
    assert_eq!(
        find("Patient", format!("identifier={id_system}|{id_value}")),
        ["long"]
    );
    assert_eq!(
        find("Observation", format!("code={code_system}|{code}")),
        ["o"]
    );
    assert_eq!(find("Observation", format!("code={code}")), ["o"]);
    assert_eq!(
        find("Observation", format!("code:text={}", &text[..30])),
        ["o"]
    );
    assert_eq!(find("Observation", "subject=Patient/long".into()), ["o"]);
}

/// A page holds at most `max_page_bytes` of stored JSON: it ends early with a cursor to the
/// next (never before its first match), and every match still comes once, in order; included
/// resources beyond the bound are left out with a warning. Large resources (over 64 KiB) are
/// read apart, only when their page takes them.
#[test]
fn a_page_holds_at_most_its_byte_budget() {
    let big = |id: &str, seed: u64| {
        json!({"resourceType": "Patient", "id": id,
        "name": [{"family": "Big", "given": [letters(seed, 100_000)]}]})
    };
    let mut resources: Vec<Value> = (0..5).map(|i| big(&format!("b{i}"), i + 10)).collect();
    resources.extend((0..5).map(|i| patient(&format!("s{i}"), "Big", "1990-01-01")));
    resources.extend((0..5).map(|i| {
        obs(
            &format!("o{i}"),
            &format!("b{i}"),
            "1234-5",
            "2020-01-01",
            1.0,
        )
    }));
    let (store, _) = support::load_store(&resources);
    let pages = |query: &str, max_page_bytes: usize| -> Vec<Vec<String>> {
        let mut pairs = parse_query_string(query);
        let mut out = Vec::new();
        loop {
            let q = parse_query("Patient", &pairs, ParseOptions::default()).unwrap();
            let opts = search::ExecOptions {
                max_page_bytes,
                ..Default::default()
            };
            let page = search::execute_with(&*store, &q, &opts).unwrap();
            out.push(
                page.matches
                    .iter()
                    .map(|r| r["id"].as_str().unwrap().to_string())
                    .collect(),
            );
            match page.next_cursor {
                Some(c) => {
                    pairs.retain(|(k, _)| k != "_cursor");
                    pairs.push(("_cursor".into(), c));
                }
                None => return out,
            }
        }
    };
    let every = |pages: &[Vec<String>]| pages.concat();
    let whole = pages("family=Big&_sort=_id&_count=100", usize::MAX);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].len(), 10);
    // Two large resources (about 100 KB each) fit in 250,000 bytes, a third does not.
    let cut = pages("family=Big&_sort=_id&_count=100", 250_000);
    assert!(cut.len() > 1, "{cut:?}");
    assert!(
        cut.iter()
            .all(|p| !p.is_empty() && p.iter().filter(|id| id.starts_with('b')).count() <= 2),
        "{cut:?}"
    );
    assert_eq!(every(&cut), whole[0]);
    // Without `_sort` (pages in key order, driven by the index) the same.
    let unsorted = pages("family=Big&_count=100", 250_000);
    let mut ids = every(&unsorted);
    ids.sort();
    assert_eq!(ids, whole[0]);
    // Each page keeps its first match, however large.
    let ones = pages("family=Big&_sort=_id&_count=100", 1);
    assert_eq!(ones.len(), 10);
    assert_eq!(every(&ones), whole[0]);
    // Included resources beyond the bound are left out, with a warning.
    let q = parse_query(
        "Observation",
        &parse_query_string("_include=Observation:subject&_count=5"),
        ParseOptions::default(),
    )
    .unwrap();
    let all = search::execute_with(&*store, &q, &search::ExecOptions::default()).unwrap();
    assert_eq!((all.matches.len(), all.included.len()), (5, 5));
    assert!(all.warnings.is_empty());
    let opts = search::ExecOptions {
        max_page_bytes: 250_000,
        ..Default::default()
    };
    let some = search::execute_with(&*store, &q, &opts).unwrap();
    assert_eq!(some.matches.len(), 5);
    assert!(
        (1..5).contains(&some.included.len()),
        "{}",
        some.included.len()
    );
    assert!(
        some.warnings.iter().any(|w| w.contains("250000 bytes")),
        "{:?}",
        some.warnings
    );
}

/// A history page holds at most `max_bytes` of stored JSON (16 MiB by default): it ends early
/// with a cursor (never before its first version), every version still comes once, tombstones
/// included; versions over 64 KiB are read only when their page takes them.
#[test]
fn a_history_page_holds_at_most_its_byte_budget() {
    use store::{HistoryQuery, HistoryScope};
    let big = |seed: u64| {
        json!({"resourceType": "Patient", "id": "h",
        "name": [{"family": "Hist", "given": [letters(seed, 100_000)]}]})
    };
    let (store, _) = support::load_store(&[big(1), patient("small", "Small", "1990-01-01")]);
    for seed in 2..5 {
        store
            .write(vec![WriteOp::Update {
                resource_type: "Patient".into(),
                id: "h".into(),
                resource: big(seed),
                if_match: None,
            }])
            .unwrap();
    }
    store
        .write(vec![WriteOp::Delete {
            resource_type: "Patient".into(),
            id: "h".into(),
            if_match: None,
        }])
        .unwrap();
    let walk = |scope: HistoryScope<'_>, max_bytes: Option<usize>| -> Vec<Vec<(i64, bool)>> {
        let mut q = HistoryQuery {
            count: 100,
            max_bytes,
            ..Default::default()
        };
        let mut pages = Vec::new();
        loop {
            let page = store.history(scope, &q).unwrap();
            pages.push(
                page.entries
                    .iter()
                    .map(|e| (e.seq, e.json.is_some()))
                    .collect(),
            );
            for e in &page.entries {
                if let Some(j) = &e.json {
                    let v: Value = serde_json::from_slice(j).unwrap();
                    assert_eq!(v["resourceType"], "Patient");
                }
            }
            match page.next_before_seq {
                Some(b) => q.before_seq = Some(b),
                None => return pages,
            }
        }
    };
    for scope in [
        HistoryScope::Instance {
            resource_type: "Patient",
            id: "h",
        },
        HistoryScope::Type("Patient"),
        HistoryScope::System,
    ] {
        let whole = walk(scope, None);
        assert_eq!(whole.len(), 1);
        let cut = walk(scope, Some(250_000));
        assert!(cut.len() > 1, "{cut:?}");
        // Two versions of about 100 KB fit in 250,000 bytes, a third does not.
        assert!(cut.iter().all(|p| !p.is_empty() && p.len() <= 3), "{cut:?}");
        assert_eq!(cut.concat(), whole[0]);
        // Five versions of h (the last a tombstone), in every scope.
        assert_eq!(whole[0].iter().filter(|(_, json)| !json).count(), 1);
        let ones = walk(scope, Some(1));
        assert_eq!(ones.concat(), whole[0]);
        assert!(ones.iter().all(|p| p.len() == 1));
    }
}

/// A page driven by an equality filter's index lists each resource once however many of its
/// index rows match (one code under three systems, and an OR of two of them), in key order,
/// and its keyset pages go on after the last resource of the page. SQLite's page reads the
/// value index in rowid order and keeps the first matching row of each version (its index rows
/// carry no `k`, schema version 5).
#[test]
fn an_equality_driven_page_lists_a_resource_once_whatever_its_matching_rows() {
    let mut data = Vec::new();
    for i in 0..7 {
        data.push(
            json!({"resourceType":"Observation","status":"final","code":{"coding":[
            {"system":"http://loinc.org","code":"x-1"},
            {"system":"http://example.org/other","code":"x-1"},
            {"code":"x-1"}]}}),
        );
        // Another code between them, in the same rowid ranges' neighbourhood.
        data.push(
            json!({"resourceType":"Observation","status":"final","code":{"coding":[
            {"system":"http://loinc.org","code":format!("y-{i}")}]}}),
        );
    }
    let (store, stored) = support::load_store(&data);
    let expected: Vec<String> = stored
        .iter()
        .step_by(2)
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    for query in [
        "code=x-1",
        "code=http://loinc.org|x-1,http://example.org/other|x-1",
        "code=x-1&status=final",
    ] {
        for count in [1, 2, 3, 100] {
            let got =
                support::search_ids(&*store, "Observation", &format!("{query}&_count={count}"))
                    .unwrap();
            assert_eq!(got, expected, "{query}&_count={count}");
        }
    }
    let p = run(&*store, "Observation", "code=x-1&_total=accurate&_count=2").unwrap();
    assert_eq!(p.total, Some(7));
    assert_eq!(p.matches.len(), 2);
}

/// `eq` on a number finer than an f64 can tell apart, or too small for one, still finds the
/// resource that holds it (the implied interval used to collapse to nothing), on the store's
/// SQL as in the `_typeFilter` predicate.
#[test]
fn decimals_beyond_f64_precision_are_found_by_eq() {
    let obs = |id: &str, value: &str| -> Value {
        serde_json::from_str(&format!(
            r#"{{"resourceType":"Observation","id":"{id}","status":"final",
                "code":{{"text":"x"}},"valueQuantity":{{"value":{value},"code":"kg"}}}}"#
        ))
        .unwrap()
    };
    let (store, _) = support::load_store(&[
        obs("big", "12345678901234567890.123456789"),
        obs("near", "12345678901234560000"),
        obs("tiny", "1e-400"),
        obs("negtiny", "-1e-400"),
        obs("zero", "0"),
    ]);
    let find = |q: &str| {
        let mut ids = support::search_ids(&*store, "Observation", q).unwrap();
        ids.sort();
        ids
    };
    for q in [
        "gt0",
        "lt0",
        "0",
        "1e-400",
        "1.23456789012346e19",
        "12345678901234567890",
        "12345678901234567890|kg",
    ] {
        find(&format!("value-quantity={q}"));
    }
    for q in [
        "12345678901234567890.123456789",
        "12345678901234567890",
        "1.2345678901234567890123456789e19",
    ] {
        assert_eq!(find(&format!("value-quantity={q}")), ["big"], "{q}");
        assert_eq!(find(&format!("value-quantity={q}||kg")), ["big"], "{q}");
    }
    assert_eq!(find("value-quantity=1.23456789012346e19"), ["big", "near"]);
    assert_eq!(find("value-quantity=1e-400"), ["tiny"]);
    assert_eq!(find("value-quantity=-1e-400"), ["negtiny"]);
    assert_eq!(find("value-quantity=gt0"), ["big", "near", "tiny"]);
    assert_eq!(find("value-quantity=lt0"), ["negtiny"]);
    assert_eq!(find("value-quantity=0"), ["negtiny", "tiny", "zero"]);
    assert!(matches!(
        run(&*store, "Observation", "value-quantity=1e400"),
        Err(SearchError::InvalidValue { .. })
    ));
    // The compiled `_typeFilter` predicate agrees.
    let mut set = PredicateSet::new();
    set.add_type_filter("Observation?value-quantity=12345678901234567890")
        .unwrap();
    assert!(set.matches(&obs("big", "12345678901234567890.123456789")));
    assert!(!set.matches(&obs("near", "12345678901234560000")));
}
