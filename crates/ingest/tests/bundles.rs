//! `POST /` Bundles against a real store: urn resolution, kept ids, atomicity, batch outcomes.

mod support;

use ingest::{BundleError, BundleOptions, EntryError, process_bundle};
use serde_json::{Value, json};

fn obs(subject: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": "weight"},
           "subject": {"reference": subject},
           "valueQuantity": {"value": serde_json::from_str::<Value>("70.50").unwrap(), "unit": "kg"}})
}

#[test]
fn transaction_resolves_urns_keeps_ids_and_answers_per_entry() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:3b5c1d2e-0000-4000-8000-000000000001",
         "resource": {"resourceType": "Patient", "id": "3b5c1d2e-0000-4000-8000-000000000001"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:3b5c1d2e-0000-4000-8000-000000000002",
         "resource": obs("urn:uuid:3b5c1d2e-0000-4000-8000-000000000001"),
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:3b5c1d2e-0000-4000-8000-000000000003",
         "resource": {"resourceType": "Patient", "link": [{"type": "seealso",
            "other": {"reference": "urn:uuid:3b5c1d2e-0000-4000-8000-000000000001"}}]},
         "request": {"method": "PUT", "url": "Patient/other"}}
    ]});
    let resp = process_bundle(
        &*store,
        bundle,
        &BundleOptions {
            validate: true,
            return_resources: true,
            ..BundleOptions::default()
        },
    )
    .unwrap();
    assert_eq!(resp["type"], "transaction-response");
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(e.len(), 3);
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(
        e[0]["response"]["location"],
        "Patient/3b5c1d2e-0000-4000-8000-000000000001/_history/1"
    );
    assert_eq!(e[0]["response"]["etag"], "W/\"1\"");
    assert!(
        e[0]["response"]["lastModified"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    // The observation got a fresh id and its subject now names the kept patient id.
    let loc = e[1]["response"]["location"].as_str().unwrap();
    let id = loc.split('/').nth(1).unwrap();
    let stored: Value =
        serde_json::from_slice(&store.read("Observation", id).unwrap().json).unwrap();
    assert_eq!(
        stored["subject"]["reference"],
        "Patient/3b5c1d2e-0000-4000-8000-000000000001"
    );
    let text = String::from_utf8(store.read("Observation", id).unwrap().json).unwrap();
    assert!(text.contains("\"value\":70.50"), "{text}");
    assert_eq!(
        e[1]["resource"]["subject"]["reference"],
        stored["subject"]["reference"]
    );
    // PUT entries keep the URL id and their references are rewritten too.
    let other: Value =
        serde_json::from_slice(&store.read("Patient", "other").unwrap().json).unwrap();
    assert_eq!(
        other["link"][0]["other"]["reference"],
        "Patient/3b5c1d2e-0000-4000-8000-000000000001"
    );
}

#[test]
fn transaction_with_one_invalid_entry_writes_nothing() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b", "birthDate": "1990-13-45"},
         "request": {"method": "PUT", "url": "Patient/b"}}
    ]});
    let err = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap_err();
    assert_eq!(err.status(), 400);
    let oo = err.to_operation_outcome();
    assert_eq!(
        oo["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.birthDate"
    );
    assert_eq!(store.current_seq().unwrap(), 0);
    assert!(store.read("Patient", "a").is_err());
}

#[test]
fn transaction_rolls_back_on_a_version_conflict() {
    let (_d, store) = support::temp_store();
    let put = |id: &str| {
        json!({"resource": {"resourceType": "Patient", "id": id},
                                "request": {"method": "PUT", "url": format!("Patient/{id}")}})
    };
    process_bundle(
        &*store,
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [put("a")]}),
        &BundleOptions::default(),
    )
    .unwrap();
    let mut conflicting = put("a");
    conflicting["request"]["ifMatch"] = json!("W/\"5\"");
    let err = process_bundle(
        &*store,
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [put("b"), conflicting]}),
        &BundleOptions::default(),
    )
    .unwrap_err();
    match &err {
        BundleError::Entry(EntryError::Store { index: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(err.status(), 412);
    assert!(store.read("Patient", "b").is_err());
    assert_eq!(store.read("Patient", "a").unwrap().version, 1);
}

/// Review: `GET Patient/a?_elements=gender` in a batch answered the whole resource (the
/// query of a read entry was dropped). A subset asked of a read entry is refused per entry;
/// `_summary=false` and parameters that change nothing are read as a direct read reads them.
#[test]
fn a_read_entry_asking_for_a_subset_is_refused_not_answered_whole() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a", "gender": "other"},
         "request": {"method": "PUT", "url": "Patient/a"}},
        {"request": {"method": "GET", "url": "Patient/a?_elements=gender"}},
        {"request": {"method": "GET", "url": "Patient/a/_history/1?_summary=true"}},
        {"request": {"method": "GET", "url": "Patient/a?_format=json&_summary=false"}}
    ]});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    let e = resp["entry"].as_array().unwrap();
    for (i, name) in [(1, "_elements"), (2, "_summary")] {
        let status = e[i]["response"]["status"].as_str().unwrap();
        assert!(
            status.starts_with('4') || status.starts_with('5'),
            "{status}"
        );
        assert!(e[i].get("resource").is_none());
        let text = e[i]["response"]["outcome"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap();
        assert!(text.contains(name), "{text}");
    }
    assert_eq!(e[3]["response"]["status"], "200 OK");
    assert_eq!(e[3]["resource"]["gender"], "other");
}

#[test]
fn batch_entries_succeed_or_fail_independently() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}, "request": {"method": "PUT", "url": "Patient/a"}},
        {"resource": {"resourceType": "Patient", "id": "b"}, "request": {"method": "PUT", "url": "Patient/b", "ifMatch": "W/\"3\""}},
        {"resource": {"resourceType": "Patient", "unknownElement": 1}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": "Patient/nothing"}},
        {"request": {"method": "GET", "url": "Patient/a"}},
        {"request": {"method": "GET", "url": "Patient/zzz"}}
    ]});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    assert_eq!(resp["type"], "batch-response");
    let statuses: Vec<&str> = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec![
            "201 Created",
            "412 Precondition Failed",
            "400 Bad Request",
            "204 No Content",
            "200 OK",
            "404 Not Found"
        ]
    );
    assert_eq!(
        resp["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(
        resp["entry"][2]["response"]["outcome"]["issue"][0]["expression"][0],
        "Bundle.entry[2].resource.unknownElement"
    );
    assert_eq!(resp["entry"][4]["resource"]["id"], "a");
    assert_eq!(store.read("Patient", "a").unwrap().version, 1);
    assert!(store.read("Patient", "b").is_err());
}

#[test]
fn transaction_deletes_and_updates_in_fhir_order() {
    let (_d, store) = support::temp_store();
    let seed = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "y"}, "request": {"method": "PUT", "url": "Patient/y"}}
    ]});
    process_bundle(&*store, seed, &BundleOptions::default()).unwrap();
    // The PUT is listed first, the DELETE second; both run (DELETE first, as FHIR orders them)
    // and each answers in its own entry's place.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "x", "active": true}, "request": {"method": "PUT", "url": "Patient/x"}},
        {"request": {"method": "DELETE", "url": "Patient/y"}}
    ]});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    assert_eq!(resp["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(resp["entry"][1]["response"]["status"], "204 No Content");
    assert_eq!(store.read("Patient", "x").unwrap().version, 1);
    assert!(store.read("Patient", "y").is_err());
}

#[test]
fn transaction_changing_one_resource_twice_fails_and_writes_nothing() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "x", "active": true}, "request": {"method": "PUT", "url": "Patient/x"}},
        {"request": {"method": "DELETE", "url": "Patient/x"}}
    ]});
    let err = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap_err();
    assert!(err.to_string().contains("at most once"), "{err}");
    assert!(store.read("Patient", "x").is_err());
}

/// The status lines of a batch-response's entries.
fn statuses(resp: &Value) -> Vec<String> {
    resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

/// A Patient `PUT` entry with `fullUrl` `urn:uuid:…{n}` whose link names `urn:uuid:…{other}`.
fn linked_patient(id: &str, n: u32, other: u32, if_match: Option<&str>) -> Value {
    let mut request = json!({"method": "PUT", "url": format!("Patient/{id}")});
    if let Some(etag) = if_match {
        request["ifMatch"] = json!(etag);
    }
    json!({"fullUrl": format!("urn:uuid:77777777-0000-4000-8000-00000000000{n}"),
           "resource": {"resourceType": "Patient", "id": id, "link": [{"type": "seealso",
               "other": {"reference": format!("urn:uuid:77777777-0000-4000-8000-00000000000{other}")}}]},
           "request": request})
}

/// A batch whose single transaction fails is written entry by entry; two entries that name each
/// other are written together, and an entry behind them waits for them.
#[test]
fn a_batch_retried_alone_writes_entries_that_name_each_other_together() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "x"},
         "request": {"method": "PUT", "url": "Patient/x", "ifMatch": "W/\"9\""}},
        linked_patient("a", 1, 2, None),
        linked_patient("b", 2, 1, None),
        {"resource": obs("urn:uuid:77777777-0000-4000-8000-000000000001"),
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    assert_eq!(
        statuses(&resp),
        [
            "412 Precondition Failed",
            "201 Created",
            "201 Created",
            "201 Created"
        ]
    );
    let read = |id: &str| -> Value {
        serde_json::from_slice(&store.read("Patient", id).unwrap().json).unwrap()
    };
    assert_eq!(read("a")["link"][0]["other"]["reference"], "Patient/b");
    assert_eq!(read("b")["link"][0]["other"]["reference"], "Patient/a");
    assert!(store.read("Patient", "x").is_err());
}

/// Two circles of entries that name each other, one failing, and many entries behind the other,
/// each failing on its own: each circle is written (or fails) alone, the good circle's entries
/// and those behind it settle one by one (each failure behind a circle used to rewrite the
/// circle and everything else left, again for each failure: quadratic in the entries).
#[test]
fn circles_are_written_alone_and_failures_behind_them_settle_one_by_one() {
    let (_d, store) = support::temp_store();
    let mut entries = vec![
        linked_patient("a", 1, 2, None),
        linked_patient("b", 2, 1, None),
        linked_patient("c", 3, 4, Some("W/\"9\"")),
        linked_patient("d", 4, 3, None),
    ];
    for i in 0..200 {
        let mut request = json!({"method": "PUT", "url": format!("Observation/o{i}")});
        if i % 2 == 1 {
            request["ifMatch"] = json!("W/\"9\"");
        }
        let mut o = obs("urn:uuid:77777777-0000-4000-8000-000000000001");
        o["id"] = json!(format!("o{i}"));
        entries.push(json!({"resource": o, "request": request}));
    }
    let mut behind_c = obs("urn:uuid:77777777-0000-4000-8000-000000000003");
    behind_c["id"] = json!("oc");
    entries
        .push(json!({"resource": behind_c, "request": {"method": "PUT", "url": "Observation/oc"}}));
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    let statuses = statuses(&resp);
    assert_eq!(
        statuses[..4],
        [
            "201 Created",
            "201 Created",
            "412 Precondition Failed",
            "424 Failed Dependency"
        ]
    );
    for i in 0..200 {
        let expected = if i % 2 == 1 {
            "412 Precondition Failed"
        } else {
            "201 Created"
        };
        assert_eq!(statuses[4 + i], expected, "entry {}", 4 + i);
    }
    assert_eq!(statuses[204], "424 Failed Dependency");
    assert_eq!(store.read("Observation", "o0").unwrap().version, 1);
    assert!(store.read("Observation", "o1").is_err());
    assert!(store.read("Patient", "c").is_err());
    let read = |id: &str| -> Value {
        serde_json::from_slice(&store.read("Patient", id).unwrap().json).unwrap()
    };
    assert_eq!(read("a")["link"][0]["other"]["reference"], "Patient/b");
}

/// Entries that name each other and fail together in the store: the entry the store error
/// names fails with it, the others that depend on it fail 424, and so does an entry behind them;
/// an entry outside the circle is written.
#[test]
fn a_circle_failing_in_the_store_fails_the_named_entry_and_its_dependents() {
    let (_d, store) = support::temp_store();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        linked_patient("a", 1, 2, Some("W/\"9\"")),
        linked_patient("b", 2, 1, None),
        {"resource": {"resourceType": "Patient", "id": "c"},
         "request": {"method": "PUT", "url": "Patient/c"}},
        {"resource": obs("urn:uuid:77777777-0000-4000-8000-000000000002"),
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let resp = process_bundle(&*store, bundle, &BundleOptions::default()).unwrap();
    assert_eq!(
        statuses(&resp),
        [
            "412 Precondition Failed",
            "424 Failed Dependency",
            "201 Created",
            "424 Failed Dependency"
        ]
    );
    let diagnostics = |i: usize| {
        resp["entry"][i]["response"]["outcome"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        diagnostics(1).contains("entry 0 failed (412 Precondition Failed)"),
        "{}",
        diagnostics(1)
    );
    assert!(
        diagnostics(3).contains("entry 1 failed (424 Failed Dependency)"),
        "{}",
        diagnostics(3)
    );
    assert!(store.read("Patient", "a").is_err());
    assert!(store.read("Patient", "b").is_err());
    assert_eq!(store.read("Patient", "c").unwrap().version, 1);
}
