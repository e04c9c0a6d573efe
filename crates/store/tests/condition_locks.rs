//! `Store::lock_conditions`, the locks of conditional interactions' conditions, on the test
//! store's backend (SQLite, or PostgreSQL with `FHIRHOSE_TEST_DATABASE`): a held condition
//! makes another request with it (in any parameter order) wait and, past its wait, fail with
//! `ConditionLocked` holding nothing; other conditions are free; a dropped guard (also one
//! dropped while a panic unwinds) frees its keys. On PostgreSQL the other request comes from a
//! second store on the same database, as from another node.

use std::time::Duration;

use store::{ConditionKey, StoreError};

fn key(mrn: &str, reversed: bool) -> ConditionKey {
    let mut params = vec![
        ("identifier".to_string(), format!("urn:x|{mrn}")),
        ("birthdate".to_string(), "1970-01-01".to_string()),
    ];
    if reversed {
        params.reverse();
    }
    ConditionKey::new("Patient", &params)
}

const SHORT: Duration = Duration::from_millis(200);

#[test]
fn a_held_condition_stops_the_same_condition_elsewhere_until_released() {
    let db = store::testing::test_store(None);
    let other = if db.backend == store::testing::Backend::Postgres {
        db.reopen(None)
    } else {
        db.store.clone()
    };
    let held = db.lock_conditions(&[key("1", false)], SHORT).unwrap();
    // The same condition, its parameters in the other order, taken with another free one.
    match other.lock_conditions(&[key("2", false), key("1", true)], SHORT) {
        Err(StoreError::ConditionLocked { waited }) => assert_eq!(waited, SHORT),
        other => panic!("{other:?}"),
    }
    // Nothing of the failed call is held: the other condition is free.
    drop(other.lock_conditions(&[key("2", true)], SHORT).unwrap());
    drop(held);
    let both = other
        .lock_conditions(&[key("1", false), key("2", false), key("1", true)], SHORT)
        .unwrap();
    drop(both);

    // A guard dropped while a panic unwinds releases too.
    let store = db.store.clone();
    let panicked = std::thread::spawn(move || {
        let _held = store.lock_conditions(&[key("3", false)], SHORT).unwrap();
        panic!("a request handler panicked while holding its condition");
    })
    .join();
    assert!(panicked.is_err());
    drop(other.lock_conditions(&[key("3", false)], SHORT).unwrap());
}
