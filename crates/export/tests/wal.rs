//! The store's WAL stays bounded under a long export with concurrent writes (issue 17 item 7):
//! a scan reads in pages, each in its own short read transaction, so that between pages no
//! reader pins the WAL and `SqliteStore::checkpoint` (what the export sweeper runs) can
//! truncate it. Before, one statement held a read transaction across the whole scan and the WAL
//! grew with every write made meanwhile (757 MB seen).

use std::ops::ControlFlow;

use serde_json::json;
use store::sqlite::{SqliteOptions, SqliteStore};
use store::{SeqBounds, Store, WriteOp};

#[test]
fn a_long_scan_with_concurrent_writes_leaves_the_wal_checkpointable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let store = SqliteStore::open(&db, SqliteOptions::default()).expect("store");
    for chunk in 0..6 {
        let ops = (chunk * 500..(chunk + 1) * 500)
            .map(|i| WriteOp::Create {
                resource: json!({"resourceType": "Patient", "id": format!("p{i}")}),
            })
            .collect();
        store.write(ops).expect("write");
    }
    let watermark = store.watermark().expect("watermark").seq;
    let wal = dir.path().join("db.sqlite-wal");
    let pad = "x".repeat(2000);
    let mut scanned = 0u64;
    let mut writes = 0;
    let mut largest = 0u64;
    let all = SeqBounds {
        after: 0,
        up_to: i64::MAX,
    };
    store
        .scan_type_each("Patient", watermark, all, &mut |_row| {
            scanned += 1;
            if scanned.is_multiple_of(600) {
                // About 1 MB of new data while the scan is half way.
                let ops = (0..500)
                    .map(|k| WriteOp::Create {
                        resource: json!({"resourceType": "Basic", "id": format!("b{writes}-{k}"),
                            "code": {"text": pad}}),
                    })
                    .collect();
                store.write(ops).expect("concurrent write");
                writes += 1;
                store.checkpoint().expect("checkpoint");
                largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            }
            ControlFlow::Continue(())
        })
        .expect("scan");
    assert_eq!(scanned, 3000, "the snapshot is read whole, and only it");
    assert!(writes >= 4);
    assert!(
        largest <= 64 * 1024,
        "the WAL was truncated between pages of the scan (largest seen: {largest} bytes)"
    );
}
