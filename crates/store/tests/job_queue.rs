//! The export job queue's contract ([`store::JobQueue`]), on the backend
//! `FHIRHOSE_TEST_DATABASE` selects (SQLite without it): claims, leases, take-over, retries,
//! admission, cancellation, clean-up and purge.

use std::sync::Arc;

use store::jobs::*;
use store::testing::{TestStore, test_store};

fn job(id: &str, created_ms: i64) -> JobRecord {
    JobRecord {
        id: id.to_string(),
        state: JobState::Queued,
        request: "{}".to_string(),
        watermark: 7,
        transaction_time: "2026-01-01T00:00:00Z".to_string(),
        client_id: Some("client-a".to_string()),
        container: "fhirhose".to_string(),
        folder: id.to_string(),
        anonymization: None,
        result: None,
        failure_status: None,
        created_ms,
        finished_ms: None,
        cleanup: Cleanup::None,
    }
}

fn scan(t: &str, after: i64, up_to: i64) -> ItemPlan {
    ItemPlan {
        kind: ItemKind::Scan,
        resource_type: t.into(),
        seq_after: after,
        seq_up_to: up_to,
        expected: (up_to - after) as u64,
    }
}

fn finalize() -> ItemPlan {
    ItemPlan {
        kind: ItemKind::Finalize,
        resource_type: String::new(),
        seq_after: 0,
        seq_up_to: 0,
        expected: 0,
    }
}

fn part(prefix: &str, temp: &str, count: u64) -> NewFile {
    NewFile {
        kind: FileKind::Output,
        resource_type: prefix.into(),
        prefix: prefix.into(),
        count,
        bytes: count * 10,
        sha256: None,
        temp_path: temp.into(),
    }
}

/// A fresh store on the backend `FHIRHOSE_TEST_DATABASE` selects, and its queue.
fn open() -> (TestStore, Arc<dyn JobQueue>) {
    let store = test_store(None);
    let queue = store.jobs().expect("job queue");
    (store, queue)
}

#[test]
fn items_are_claimed_once_and_finalize_waits_for_the_rest() {
    let (_store, q) = open();
    q.create(
        &job("a", 1),
        &[scan("Patient", 0, 10), scan("Patient", 10, 20), finalize()],
        10,
    )
    .expect("create");
    assert_eq!(q.active_count().expect("count"), 1);
    let one = q.claim("w1", 100, 1000, 3).expect("claim").expect("item 1");
    let two = q.claim("w2", 100, 1000, 3).expect("claim").expect("item 2");
    assert_eq!((one.item_no, two.item_no), (1, 2));
    // The finalize item waits until both scans are done.
    assert!(q.claim("w3", 100, 1000, 3).expect("claim").is_none());
    assert_eq!(
        q.get("a").expect("get").expect("job").state,
        JobState::Running
    );

    // Files of one prefix are numbered in commit order, whichever item commits.
    let f = q
        .commit_files(&two, &[part("Patient", "_parts/2-1-1", 5)], 15, 5, 101)
        .expect("commit")
        .expect("held");
    assert_eq!(f[0].name, "Patient-1.ndjson");
    let f = q
        .commit_files(&one, &[part("Patient", "_parts/1-1-1", 3)], 4, 3, 101)
        .expect("commit")
        .expect("held");
    assert_eq!(f[0].name, "Patient-2.ndjson");
    q.renamed("a", "Patient-1.ndjson").expect("renamed");
    let files = q.files("a").expect("files");
    assert_eq!(files.len(), 2);
    assert_eq!(files[0].pending_rename, None);
    assert_eq!(files[1].pending_rename.as_deref(), Some("_parts/1-1-1"));

    assert!(q.complete_item(&one, 10, 102).expect("complete"));
    assert!(q.claim("w3", 103, 1000, 3).expect("claim").is_none());
    assert!(q.complete_item(&two, 10, 103).expect("complete"));
    let fin = q
        .claim("w3", 104, 1000, 3)
        .expect("claim")
        .expect("finalize");
    assert_eq!(fin.kind, ItemKind::Finalize);
    let progress = q.progress("a").expect("progress");
    assert_eq!(progress.len(), 1);
    assert_eq!((progress[0].scanned, progress[0].done), (20, true));
    assert!(q.complete_job(&fin, 0, "{}", false, 105).expect("complete"));
    assert_eq!(q.active_count().expect("count"), 0);
}

#[test]
fn a_stale_item_is_taken_over_from_its_cursor_and_the_old_owner_loses_its_lease() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Observation", 0, 100)], 10)
        .expect("create");
    let old = q
        .claim("node-1", 1_000, 600_000, 3)
        .expect("claim")
        .expect("item");
    q.commit_files(
        &old,
        &[part("Observation", "_parts/1-1-1", 40)],
        40,
        40,
        2_000,
    )
    .expect("commit")
    .expect("held");
    // Within the timeout nobody else may take it.
    assert!(
        q.claim("node-2", 500_000, 600_000, 3)
            .expect("claim")
            .is_none()
    );
    // After the timeout without heartbeat, node-2 takes it over and resumes at the cursor.
    let new = q
        .claim("node-2", 700_000, 600_000, 3)
        .expect("claim")
        .expect("taken over");
    assert_eq!((new.cursor, new.attempt, new.scanned), (40, 2, 40));
    // The old owner learns it at its next heartbeat or commit, and cannot commit.
    assert_eq!(q.heartbeat(&old, 50, 700_001).expect("hb"), Lease::Lost);
    assert!(
        q.commit_files(
            &old,
            &[part("Observation", "_parts/1-1-2", 10)],
            50,
            50,
            700_002
        )
        .expect("commit")
        .is_none()
    );
    assert!(!q.complete_item(&old, 100, 700_003).expect("complete"));
    assert_eq!(q.heartbeat(&new, 60, 700_004).expect("hb"), Lease::Held);
    assert!(q.complete_item(&new, 100, 700_005).expect("complete"));
}

#[test]
fn attempts_are_bounded_and_cancel_stops_workers() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    let i = q.claim("w", 0, 10, 2).expect("claim").expect("1");
    assert!(
        !q.fail_item(&i, "destination unreachable", 503, Some(RETRY), 1)
            .expect("retry")
    );
    // Retried after a back-off, not at once.
    assert!(q.claim("w", 2, 10, 2).expect("claim").is_none());
    let i = q.claim("w", 2_001, 10, 2).expect("claim").expect("2");
    assert_eq!(i.attempt, 2);
    // Stale again with attempts exhausted: the job fails instead of looping forever.
    assert!(q.claim("w", 3_000, 10, 2).expect("claim").is_none());
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(500)));

    q.create(&job("b", 2), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    let i = q.claim("w", 200, 10, 3).expect("claim").expect("b");
    q.cancel("b", 201).expect("cancel");
    assert_eq!(q.heartbeat(&i, 1, 202).expect("hb"), Lease::JobStopped);
    // A runner finishing late never overwrites the cancel.
    assert!(
        !q.complete_job(&i, 0, "{}", false, 203)
            .expect("complete late")
    );
    assert_eq!(
        q.get("b").expect("get").expect("job").state,
        JobState::Cancelled
    );
}

const RETRY: Retry = Retry {
    max_attempts: 2,
    base_ms: 2_000,
    max_ms: 60_000,
};

#[test]
fn a_transient_failure_of_the_last_attempt_fails_the_job_with_its_cause() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    let i = q.claim("w", 0, 10_000, 2).expect("claim").expect("1");
    assert!(
        !q.fail_item(&i, "s3 unavailable", 503, Some(RETRY), 1)
            .expect("fail")
    );
    let i = q.claim("w", 5_000, 10_000, 2).expect("claim").expect("2");
    // The second failure is the last allowed attempt: the job fails, nothing stays pending.
    assert!(
        q.fail_item(&i, "s3 unavailable", 503, Some(RETRY), 5_001)
            .expect("fail")
    );
    assert!(q.claim("w", 999_999, 10_000, 2).expect("claim").is_none());
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(503)));
    assert!(
        a.result
            .as_deref()
            .is_some_and(|r| r.contains("s3 unavailable"))
    );
    assert_eq!(a.cleanup, Cleanup::Pending);
    assert_eq!(q.active_count().expect("count"), 0);
    assert_eq!(q.cleanups().expect("cleanups").len(), 1);
    q.cleaned("a").expect("cleaned");
    assert!(q.cleanups().expect("cleanups").is_empty());
}

#[test]
fn a_crash_loop_fails_the_job_once_the_attempts_are_used() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    for n in 1..=2 {
        let i = q.claim("w", n, 600_000, 2).expect("claim").expect("item");
        assert_eq!(i.attempt, n);
        // The process dies; the next one releases the item.
        assert_eq!(q.release_orphans(Orphans::All).expect("release"), 1);
    }
    assert!(q.claim("w", 10, 600_000, 2).expect("claim").is_none());
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.failure_status), (JobState::Failed, Some(500)));
    assert!(
        a.result
            .as_deref()
            .is_some_and(|r| r.contains("the server stopped while it ran")),
        "{:?}",
        a.result
    );
}

#[test]
fn a_released_item_keeps_its_cursor_and_gets_its_attempt_back() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    for _ in 0..5 {
        let i = q.claim("w", 1, 600_000, 1).expect("claim").expect("item");
        assert_eq!(i.attempt, 1);
        q.commit_files(&i, &[part("Patient", "_parts/x", 1)], i.cursor + 1, 1, 2)
            .expect("commit")
            .expect("held");
        assert!(q.release(&i).expect("release"));
        // The released holder has lost its lease.
        assert_eq!(q.heartbeat(&i, 1, 3).expect("hb"), Lease::Lost);
    }
    let i = q.claim("w", 1, 600_000, 1).expect("claim").expect("item");
    assert_eq!(i.cursor, 5);
    assert_eq!(q.release_owned("w").expect("release"), 1);
    assert_eq!(
        q.get("a").expect("get").expect("job").state,
        JobState::Running
    );
}

#[test]
fn claims_whose_answer_was_lost_are_given_back_and_held_ones_kept() {
    let (_store, q) = open();
    q.create(
        &job("a", 1),
        &[
            scan("Patient", 0, 10),
            scan("Patient", 10, 20),
            scan("Patient", 20, 30),
        ],
        10,
    )
    .expect("create");
    // "w" runs the first; its claim of the second was committed but never answered; another
    // process holds the third.
    let held = q.claim("w", 1, 600_000, 2).expect("claim").expect("item");
    let lost = q.claim("w", 1, 600_000, 2).expect("claim").expect("item");
    let other = q.claim("v", 1, 600_000, 2).expect("claim").expect("item");
    let keep = [(held.job_id.clone(), held.item_no)];
    assert_eq!(q.release_unheld("w", &keep, &[]).expect("release"), 1);
    assert_eq!(q.release_unheld("w", &keep, &[]).expect("again"), 0);
    assert_eq!(q.heartbeat(&held, 1, 2).expect("hb"), Lease::Held);
    assert_eq!(q.heartbeat(&other, 1, 2).expect("hb"), Lease::Held);
    assert_eq!(q.heartbeat(&lost, 1, 2).expect("hb"), Lease::Lost);
    // Claimable at once; the lost claim never ran, so its attempt is not counted.
    let again = q
        .claim("w", 3, 600_000, 2)
        .expect("claim")
        .expect("the lost item");
    assert_eq!((again.item_no, again.attempt), (lost.item_no, 1));
    // An item that ran but whose outcome was lost keeps its attempt.
    let ran = [(again.job_id.clone(), again.item_no)];
    assert_eq!(q.release_unheld("w", &keep, &ran).expect("release"), 1);
    let third = q
        .claim("w", 4, 600_000, 2)
        .expect("claim")
        .expect("the item again");
    assert_eq!((third.item_no, third.attempt), (lost.item_no, 2));
}

#[test]
fn admission_is_refused_in_the_creating_transaction() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[finalize()], 2).expect("a");
    q.create(&job("b", 2), &[finalize()], 2).expect("b");
    assert!(matches!(
        q.create(&job("c", 3), &[finalize()], 2),
        Err(QueueError::Full(2))
    ));
    assert!(q.get("c").expect("get").is_none());
}

#[test]
fn orphans_of_a_dead_process_are_released_on_reopen() {
    let (store, q) = open();
    {
        q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        q.claim("dead", 0, 600_000, 3)
            .expect("claim")
            .expect("item");
    }
    drop(q);
    // Another process opens the same database.
    let q = store.reopen(None).jobs().expect("job queue");
    assert!(q.claim("new", 1, 600_000, 3).expect("claim").is_none());
    assert_eq!(q.release_orphans(Orphans::All).expect("release"), 1);
    let i = q.claim("new", 2, 600_000, 3).expect("claim").expect("item");
    assert_eq!(i.attempt, 2);
    assert!(q.get("missing").expect("get").is_none());
}

#[test]
fn rows_of_removed_jobs_are_purged_after_the_horizon_and_nothing_else() {
    let (_store, q) = open();
    // a: complete, expired and cleaned; b: failed and cleaned; c: cancelled, files not yet
    // removed; d: complete, not expired; e: running.
    for (id, at) in [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)] {
        q.create(&job(id, at), &[scan("Patient", 0, 10), finalize()], 10)
            .expect("create");
    }
    let item = q
        .claim("w", 10, 600_000, 3)
        .expect("claim")
        .expect("a's item");
    q.commit_files(&item, &[part("Patient", "_parts/a", 3)], 10, 3, 11)
        .expect("commit")
        .expect("held");
    assert!(q.complete_item(&item, 3, 100).expect("a's scan done"));
    let fin = q
        .claim("w", 100, 600_000, 3)
        .expect("claim")
        .expect("a's finalize");
    assert!(
        q.complete_job(&fin, 0, "{}", false, 100)
            .expect("a complete")
    );
    let b = q
        .claim("w", 100, 600_000, 3)
        .expect("claim")
        .expect("b's item");
    assert_eq!(b.job_id, "b");
    assert!(q.fail_item(&b, "broken", 500, None, 100).expect("b failed"));
    q.cancel("c", 100).expect("cancel");
    let d = q
        .claim("w", 100, 600_000, 3)
        .expect("claim")
        .expect("d's item");
    assert_eq!(d.job_id, "d");
    assert!(q.complete_item(&d, 3, 100).expect("d's scan done"));
    let fin = q
        .claim("w", 100, 600_000, 3)
        .expect("claim")
        .expect("d's finalize");
    assert!(
        q.complete_job(&fin, 0, "{}", false, 5_000)
            .expect("d complete")
    );
    assert_eq!(q.expire(1_000, 1_000).expect("expire"), 1);
    q.cleaned("a").expect("cleaned");
    q.cleaned("b").expect("cleaned");

    // Nothing finished after the horizon goes.
    assert_eq!(q.purge(99, 99).expect("purge"), 0);
    assert_eq!(q.purge(10_000, 10_000).expect("purge"), 2);
    assert!(q.get("a").expect("get").is_none());
    assert!(q.get("b").expect("get").is_none());
    assert!(q.files("a").expect("files").is_empty());
    assert!(q.progress("a").expect("progress").is_empty());
    // Still to clean, complete, or active: kept.
    assert_eq!(
        q.get("c").expect("get").expect("c").cleanup,
        Cleanup::Pending
    );
    assert_eq!(
        q.get("d").expect("get").expect("d").state,
        JobState::Complete
    );
    assert!(q.get("e").expect("get").expect("e").state.is_active());
    assert_eq!(q.purge(i64::MAX, i64::MAX).expect("purge"), 0);
}

#[test]
fn concurrent_claims_take_every_item_exactly_once() {
    let (_store, q) = open();
    let plans: Vec<ItemPlan> = (0..40)
        .map(|n| scan("Patient", n * 10, n * 10 + 10))
        .collect();
    q.create(&job("a", 1), &plans, 10).expect("create");
    let claimed: Vec<i64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let q = q.clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(item) =
                        q.claim(&format!("w{w}"), 100, 600_000, 3).expect("claim")
                    {
                        assert!(q.complete_item(&item, 10, 101).expect("complete"));
                        mine.push(item.item_no);
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    let mut sorted = claimed.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=40).collect::<Vec<_>>(), "{claimed:?}");
}

/// `job` recorded for `client` (`None`: no authentication).
fn job_of(id: &str, client: Option<&str>) -> JobRecord {
    JobRecord {
        client_id: client.map(str::to_string),
        ..job(id, 1)
    }
}

#[test]
fn one_clients_jobs_are_admitted_up_to_its_share() {
    let (_store, q) = open();
    let admission = Admission {
        max_active: 4,
        max_per_client: 2,
    };
    let create = |id: &str, client: Option<&str>| {
        q.create_admitted(&job_of(id, client), &[finalize()], admission)
    };
    create("a1", Some("a")).expect("a1");
    create("a2", Some("a")).expect("a2");
    assert!(matches!(
        create("a3", Some("a")),
        Err(QueueError::ClientFull(2))
    ));
    assert!(q.get("a3").expect("get").is_none());
    assert_eq!(q.active_count_of("a").expect("count"), 2);
    // Another client has a share of its own; jobs without a client only the global limit.
    create("b1", Some("b")).expect("b1");
    create("n1", None).expect("n1");
    assert!(matches!(create("c1", Some("c")), Err(QueueError::Full(4))));
    // A cancelled job frees its client's slot.
    q.cancel("a1", 2).expect("cancel");
    create("a4", Some("a")).expect("a4 after the cancel");
    assert_eq!(q.active_count_of("a").expect("count"), 2);
}

#[test]
fn concurrent_kickoffs_of_one_client_never_pass_its_share() {
    let (_store, q) = open();
    let admission = Admission {
        max_active: 100,
        max_per_client: 3,
    };
    let admitted = std::thread::scope(|s| {
        let kickoffs: Vec<_> = (0..8)
            .map(|n| {
                let q = q.clone();
                s.spawn(move || {
                    match q.create_admitted(
                        &job_of(&format!("j{n}"), Some("one")),
                        &[finalize()],
                        admission,
                    ) {
                        Ok(()) => true,
                        Err(QueueError::ClientFull(_)) => false,
                        Err(e) => panic!("create: {e}"),
                    }
                })
            })
            .collect();
        kickoffs
            .into_iter()
            .map(|k| k.join().expect("kick-off"))
            .filter(|admitted| *admitted)
            .count()
    });
    assert_eq!(admitted, 3);
    assert_eq!(q.active_count_of("one").expect("count"), 3);
}

#[test]
fn concurrent_kickoffs_never_pass_the_limit() {
    let (_store, q) = open();
    let admitted = std::thread::scope(|s| {
        let kickoffs: Vec<_> = (0..8)
            .map(|n| {
                let q = q.clone();
                s.spawn(
                    move || match q.create(&job(&format!("j{n}"), n), &[finalize()], 3) {
                        Ok(()) => true,
                        Err(QueueError::Full(_)) => false,
                        Err(e) => panic!("create: {e}"),
                    },
                )
            })
            .collect();
        kickoffs
            .into_iter()
            .map(|k| k.join().expect("kick-off"))
            .filter(|admitted| *admitted)
            .count()
    });
    assert_eq!(admitted, 3);
    assert_eq!(q.active_count().expect("count"), 3);
}

#[test]
fn a_restarted_node_releases_only_its_previous_incarnations_leases() {
    let (_store, q) = open();
    q.create(
        &job("a", 1),
        &[
            scan("Patient", 0, 10),
            scan("Patient", 10, 20),
            scan("Patient", 20, 30),
            scan("Patient", 30, 40),
        ],
        10,
    )
    .expect("create");
    let dead = owner_name("n1", "old");
    let current = owner_name("n1", "new");
    let other = owner_name("n2", "live");
    // A node whose id starts like n1's is another node.
    let lookalike = owner_name("n10", "live");
    for owner in [&dead, &other, &lookalike, &current] {
        q.claim(owner, 1, 600_000, 3).expect("claim").expect("item");
    }
    let released = q
        .release_orphans(Orphans::OfNode {
            node: "n1",
            current: &current,
        })
        .expect("release");
    assert_eq!(released, 1, "only n1's previous incarnation");
    // The released item is claimable at once; the live leases stay where they are.
    let again = q
        .claim(&current, 2, 600_000, 3)
        .expect("claim")
        .expect("released");
    assert_eq!(again.attempt, 2);
    assert!(q.claim(&current, 3, 600_000, 3).expect("claim").is_none());
}

#[test]
fn one_deleter_at_a_time_holds_a_jobs_cleanup() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    // Nothing to delete while the job runs.
    let (n1, n2) = (owner_name("n1", "a"), owner_name("n2", "a"));
    assert!(!q.hold_cleanup("a", &n1, 100, 1_000).expect("hold"));
    q.cancel("a", 100).expect("cancel");
    assert!(q.hold_cleanup("a", &n1, 200, 1_000).expect("first deleter"));
    assert!(
        !q.hold_cleanup("a", &n2, 300, 1_000)
            .expect("second deleter waits")
    );
    // A hold whose deleter failed or died lapses.
    assert!(
        q.hold_cleanup("a", &n2, 1_300, 1_000)
            .expect("after the hold")
    );
    q.cleaned("a").expect("cleaned");
    assert!(!q.hold_cleanup("a", &n1, 5_000, 1_000).expect("done"));
    assert!(
        !q.hold_cleanup("missing", &n1, 5_000, 1_000)
            .expect("unknown job")
    );
}

#[test]
fn a_failed_deletion_releases_its_hold_for_the_next_try() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    q.cancel("a", 100).expect("cancel");
    let (n1, n2) = (owner_name("n1", "a"), owner_name("n2", "a"));
    assert!(q.hold_cleanup("a", &n1, 200, 600_000).expect("hold"));
    // Another owner's release leaves the hold alone.
    q.release_cleanup("a", &n2).expect("not the holder");
    assert!(!q.hold_cleanup("a", &n2, 300, 600_000).expect("still held"));
    // The holder's deletion failed: released, the next try (any node) takes it at once.
    q.release_cleanup("a", &n1).expect("release");
    assert!(q.hold_cleanup("a", &n2, 400, 600_000).expect("taken again"));
    q.cleaned("a").expect("cleaned");
    q.release_cleanup("a", &n2).expect("nothing held");
    assert!(!q.hold_cleanup("a", &n1, 500, 600_000).expect("done"));
}

#[test]
fn a_restarted_node_takes_back_the_deletion_its_dead_incarnation_held() {
    let (_store, q) = open();
    for id in ["a", "b"] {
        q.create(&job(id, 1), &[scan("Patient", 0, 10)], 10)
            .expect("create");
        q.cancel(id, 100).expect("cancel");
    }
    let (dead, other) = (owner_name("n1", "dead"), owner_name("n2", "live"));
    assert!(q.hold_cleanup("a", &dead, 200, 600_000).expect("hold a"));
    assert!(q.hold_cleanup("b", &other, 200, 600_000).expect("hold b"));
    // n1 starts again (a new incarnation): its dead hold goes, n2's live one stays.
    let current = owner_name("n1", "now");
    q.release_orphans(Orphans::OfNode {
        node: "n1",
        current: &current,
    })
    .expect("release");
    assert!(
        q.hold_cleanup("a", &current, 300, 600_000)
            .expect("taken back at once")
    );
    assert!(
        !q.hold_cleanup("b", &current, 300, 600_000)
            .expect("another node's hold")
    );
    // A process alone on its queue (SQLite) releases every hold.
    q.release_orphans(Orphans::All).expect("release all");
    assert!(
        q.hold_cleanup("b", &current, 400, 600_000)
            .expect("free after a lone restart")
    );
}

/// Every change that makes work claimable wakes the queue's watchers at once. PostgreSQL: the
/// statement's `NOTIFY` (at commit) reaches the listener, as it reaches every node's. SQLite: no
/// other process shares the queue, so there is no watch (the service wakes its own workers).
#[test]
fn every_change_that_makes_work_claimable_wakes_the_watchers() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    let (_store, q) = open();
    let wakes = Arc::new(AtomicU64::new(0));
    let counter = wakes.clone();
    let watch = q
        .watch_work(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .expect("watch");
    if store::testing::test_database_url().is_none() {
        assert!(watch.is_none(), "SQLite has no other process to hear of");
        return;
    }
    assert!(watch.is_some());
    // A bound against hangs: a wake-up comes well within it, or not at all.
    let woken = |what: &str, before: u64| {
        let start = Instant::now();
        while wakes.load(Ordering::SeqCst) <= before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no wake-up after {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // The listener wakes once when it listens.
    woken("listening", 0);
    let step = |what: &str, f: &mut dyn FnMut()| {
        let before = wakes.load(Ordering::SeqCst);
        f();
        woken(what, before);
    };
    let retry = Retry {
        max_attempts: 10,
        base_ms: 0,
        max_ms: 0,
    };
    step("a kick-off", &mut || {
        q.create(
            &job("a", 1),
            &[
                scan("Patient", 0, 10),
                scan("Patient", 10, 20),
                scan("Patient", 20, 30),
                finalize(),
            ],
            10,
        )
        .expect("create");
    });
    let claim = |owner: &str| {
        q.claim(owner, 10, 600_000, 10)
            .expect("claim")
            .expect("item")
    };
    step("a release", &mut || {
        assert!(q.release(&claim("w")).expect("release"));
    });
    step("a release of unheld items", &mut || {
        let held = claim("w");
        claim("w");
        let keep = [(held.job_id.clone(), held.item_no)];
        assert_eq!(q.release_unheld("w", &keep, &[]).expect("release"), 1);
    });
    step("a release at shutdown", &mut || {
        assert_eq!(q.release_owned("w").expect("release"), 1);
    });
    step("a failure to retry", &mut || {
        let i = claim("w");
        assert!(
            !q.fail_item(&i, "unreachable", 503, Some(retry), 10)
                .expect("fail")
        );
    });
    step("a release of a dead incarnation's items", &mut || {
        claim("n/1");
        let orphans = Orphans::OfNode {
            node: "n",
            current: "n/2",
        };
        assert_eq!(q.release_orphans(orphans).expect("release"), 1);
    });
    let scans = [claim("w"), claim("w"), claim("w")];
    assert!(q.complete_item(&scans[0], 10, 11).expect("complete"));
    assert!(q.complete_item(&scans[1], 10, 11).expect("complete"));
    step("the last item before the finalize done", &mut || {
        assert!(q.complete_item(&scans[2], 10, 11).expect("complete"));
    });
    assert_eq!(claim("w").kind, ItemKind::Finalize);
    drop(watch);
}

/// A full destination: the item is given back without spending its attempt, claimable again
/// after a wait that grows with the time waited; a commit ends the wait; once the item has
/// waited longer than the limit, the next full destination fails the job with the cause and
/// the status given. Another node sees the wait, a restart (orphans released) keeps it, a
/// non-holder changes nothing.
#[test]
fn a_full_destination_gives_the_item_back_to_wait_until_the_limit() {
    let (store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10), finalize()], 10)
        .expect("create");
    let wait = SpaceWait {
        min_ms: 5_000,
        max_ms: 60_000,
        limit_ms: 30_000,
    };
    let full = |item: &WorkItem, now: i64| {
        q.wait_for_space(item, "the destination is full", 507, wait, now)
            .expect("wait")
    };
    let claim = |now: i64| q.claim("w1", now, 600_000, 3).expect("claim");
    let item = claim(1_000).expect("item");
    assert_eq!(q.space_wait("a", 1_000).expect("read"), None);
    assert_eq!(
        full(&item, 1_000),
        SpaceWaited::Waiting {
            waited_ms: 0,
            retry_in_ms: 5_000
        }
    );
    assert_eq!(q.space_wait("a", 2_000).expect("read"), Some(1_000));
    // Another node sees the same wait (on PostgreSQL within its own clock offset's
    // measurement, a few ms) and cannot claim the item before it is over either.
    let other = store.reopen(None).jobs().expect("another node's queue");
    let seen = other
        .space_wait("a", 2_000)
        .expect("read")
        .expect("waiting");
    assert!((900..=1_100).contains(&seen), "{seen}");
    assert!(
        other
            .claim("w2", 3_000, 600_000, 3)
            .expect("claim")
            .is_none()
    );
    // Not before the wait is over; then under the same attempt (none was spent).
    assert!(claim(3_000).is_none());
    let stale = item;
    let item = claim(6_000).expect("claimed again after the wait");
    assert_eq!((item.item_no, item.attempt), (1, 1));
    // A restart keeps the wait (its start is recorded with the item).
    assert_eq!(
        full(&item, 6_000),
        SpaceWaited::Waiting {
            waited_ms: 5_000,
            retry_in_ms: 5_000
        }
    );
    assert_eq!(q.release_orphans(Orphans::All).expect("orphans"), 0);
    assert_eq!(q.space_wait("a", 7_000).expect("read"), Some(6_000));
    // Space again: a commit ends the wait.
    let item = claim(11_000).expect("claimed");
    assert_eq!(item.attempt, 1);
    q.commit_files(&item, &[part("Patient", "t/1", 3)], 3, 3, 11_500)
        .expect("commit")
        .expect("held");
    assert_eq!(q.space_wait("a", 11_600).expect("read"), None);
    // Full again: a new wait, each delay the time waited (at least 5 s), never past the
    // 30 s limit; the next full destination after it fails the job.
    let (mut at, mut item, mut waits) = (12_000, item, Vec::new());
    let failed = loop {
        match full(&item, at) {
            SpaceWaited::Waiting {
                waited_ms,
                retry_in_ms,
            } => {
                assert_eq!(waited_ms, at - 12_000);
                waits.push(retry_in_ms);
                assert!(
                    claim(at + retry_in_ms - 1).is_none(),
                    "claimed before its wait"
                );
                at += retry_in_ms;
                item = claim(at).expect("claimable once its wait is over");
                assert_eq!(item.attempt, 1);
            }
            other => break other,
        }
        assert!(waits.len() < 10, "the wait never ends: {waits:?}");
    };
    assert_eq!(waits, vec![5_000, 5_000, 10_000, 10_000]);
    assert_eq!(at, 42_000);
    assert_eq!(failed, SpaceWaited::JobFailed);
    let j = q.get("a").expect("get").expect("job");
    assert_eq!(
        (j.state, j.failure_status, j.cleanup),
        (JobState::Failed, Some(507), Cleanup::Pending)
    );
    let text = j.result.unwrap_or_default();
    assert!(
        text.contains("the destination is full") && text.contains("after waiting 30 s"),
        "{text}"
    );
    assert_eq!(q.space_wait("a", 50_000).expect("read"), None);
    // An earlier claim of the item changes nothing.
    assert_eq!(full(&stale, 50_000), SpaceWaited::NotHeld);
}

/// Defect: the finalize item was marked done in one transaction and the job complete in
/// another; when the second write failed (a lost connection, a failover), the job stayed
/// `running` with every item done, which nothing claims again. Both are now one transaction:
/// a failed completion changes nothing, so it can be recorded again (or the item retried).
#[test]
fn a_completion_whose_write_fails_changes_nothing_and_completes_when_recorded_again() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10), finalize()], 10)
        .expect("create");
    let s = q.claim("w", 100, 1000, 3).expect("claim").expect("scan");
    assert!(q.complete_item(&s, 10, 101).expect("complete"));
    let fin = q
        .claim("w", 102, 1000, 3)
        .expect("claim")
        .expect("finalize");
    assert_eq!(fin.kind, ItemKind::Finalize);

    // The completion's commit fails (here refused before it is sent): nothing is written.
    let patience = store::Patience::new();
    patience.give_up();
    let failed = patience.run(|| q.complete_job(&fin, 0, r#"{"output":[]}"#, false, 103));
    assert!(failed.is_err(), "{failed:?}");
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.result), (JobState::Running, None));
    assert_eq!(
        q.item_states("a").expect("items"),
        vec![(1, true), (2, false)],
        "the finalize item is not done without its job"
    );
    assert_eq!(q.active_count().expect("count"), 1);

    // Recorded again: the item done and the job complete with its manifest, together.
    assert!(
        q.complete_job(&fin, 0, r#"{"output":[]}"#, false, 104)
            .expect("complete job")
    );
    let a = q.get("a").expect("get").expect("job");
    assert_eq!(a.state, JobState::Complete);
    assert_eq!(a.result.as_deref(), Some(r#"{"output":[]}"#));
    assert_eq!((a.finished_ms, a.cleanup), (Some(104), Cleanup::None));
    assert_eq!(
        q.item_states("a").expect("items"),
        vec![(1, true), (2, true)]
    );
    assert_eq!(q.active_count().expect("count"), 0);
    // A repeat whose first answer was lost after the commit is told it is complete, and
    // changes nothing.
    assert!(q.complete_job(&fin, 0, "{}", false, 105).expect("repeat"));
    let a = q.get("a").expect("get").expect("job");
    assert_eq!(
        (a.result.as_deref(), a.finished_ms),
        (Some(r#"{"output":[]}"#), Some(104))
    );
}

#[test]
fn a_completion_never_overwrites_a_stopped_job_nor_another_holders_item() {
    let (_store, q) = open();
    // Taken over after the heartbeat timeout: the old holder cannot complete the job.
    q.create(&job("a", 1), &[finalize()], 10).expect("create");
    let old = q.claim("w1", 0, 1000, 3).expect("claim").expect("finalize");
    let new = q
        .claim("w2", 5_000, 1000, 3)
        .expect("claim")
        .expect("again");
    assert!(
        !q.complete_job(&old, 0, "{}", false, 5_001)
            .expect("old holder")
    );
    assert_eq!(
        q.get("a").expect("get").expect("job").state,
        JobState::Running
    );
    assert!(
        q.complete_job(&new, 0, "{}", false, 5_002)
            .expect("new holder")
    );

    // Cancelled while finalizing: stays cancelled, the completion is refused.
    q.create(&job("b", 2), &[finalize()], 10).expect("create");
    let fin = q.claim("w", 10, 1000, 3).expect("claim").expect("finalize");
    q.cancel("b", 11).expect("cancel");
    assert!(!q.complete_job(&fin, 0, "{}", false, 12).expect("complete"));
    let b = q.get("b").expect("get").expect("job");
    assert_eq!((b.state, b.result), (JobState::Cancelled, None));
}

/// What a finished job answers with: its state, result, failure status, finish time and
/// clean-up.
fn outcome(j: &JobRecord) -> (JobState, Option<String>, Option<u16>, Option<i64>, Cleanup) {
    (
        j.state,
        j.result.clone(),
        j.failure_status,
        j.finished_ms,
        j.cleanup,
    )
}

/// Defect: DELETE on a failed export rewrote it to `cancelled`, and its failure was lost. A
/// queued, running or complete job is cancelled (a complete export's status then answers 404);
/// a failed, expired or cancelled one keeps its state, its failure and its finish time.
#[test]
fn cancel_ends_active_and_complete_jobs_and_keeps_a_finished_ones_outcome() {
    let (_store, q) = open();
    // Failed.
    q.create(&job("f", 1), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    let i = q.claim("w", 10, 10_000, 3).expect("claim").expect("item");
    assert!(
        q.fail_item(&i, "bad request body", 400, None, 11)
            .expect("fail")
    );
    let before = outcome(&q.get("f").expect("get").expect("job"));
    assert_eq!((before.0, before.2), (JobState::Failed, Some(400)));
    q.cancel("f", 20).expect("cancel");
    let after = q.get("f").expect("get").expect("job");
    assert_eq!(outcome(&after), before, "a failed job's failure is kept");
    assert!(
        after
            .result
            .as_deref()
            .is_some_and(|r| r.contains("bad request body"))
    );

    // Complete, then DELETE: cancelled, its files to be removed.
    q.create(&job("c", 2), &[finalize()], 10).expect("create");
    let fin = q
        .claim("w", 30, 10_000, 3)
        .expect("claim")
        .expect("finalize");
    assert!(q.complete_job(&fin, 0, "{}", false, 31).expect("complete"));
    q.cancel("c", 32).expect("cancel");
    let c = q.get("c").expect("get").expect("job");
    assert_eq!(
        (c.state, c.cleanup, c.finished_ms),
        (JobState::Cancelled, Cleanup::Pending, Some(32))
    );
    // Cancelled again: the first cancel's time stays.
    q.cancel("c", 33).expect("cancel");
    assert_eq!(q.get("c").expect("get").expect("job").finished_ms, Some(32));

    // Expired: stays expired.
    q.create(&job("e", 3), &[finalize()], 10).expect("create");
    let fin = q
        .claim("w", 40, 10_000, 3)
        .expect("claim")
        .expect("finalize");
    assert!(q.complete_job(&fin, 0, "{}", false, 41).expect("complete"));
    assert_eq!(q.expire(41, 41).expect("expire"), 1);
    let before = outcome(&q.get("e").expect("get").expect("job"));
    assert_eq!(before.0, JobState::Expired);
    q.cancel("e", 42).expect("cancel");
    let after = outcome(&q.get("e").expect("get").expect("job"));
    assert_eq!(after, before);

    // Queued: cancelled.
    q.create(&job("q", 4), &[scan("Patient", 0, 10)], 10)
        .expect("create");
    q.cancel("q", 50).expect("cancel");
    let j = q.get("q").expect("get").expect("job");
    assert_eq!(
        (j.state, j.cleanup, j.finished_ms),
        (JobState::Cancelled, Cleanup::Pending, Some(50))
    );
}

/// Reliability review: the sweeper expired an overdue export and, in the same sweep, purged
/// its row (the purge counted two retention periods from its completion), so an export
/// completed long before (a server down for days) went from 200 straight to 404, never 410.
/// An expired job's row now counts from its expiry.
#[test]
fn an_expired_job_is_purged_counting_from_its_expiry_not_its_completion() {
    let (_store, q) = open();
    q.create(&job("old", 1), &[finalize()], 10).expect("create");
    let fin = q
        .claim("w", 10, 10_000, 3)
        .expect("claim")
        .expect("finalize");
    assert!(q.complete_job(&fin, 0, "{}", false, 100).expect("complete"));
    // Days later (retention 1_000 here): expired now, at 1_000_000.
    assert_eq!(q.expire(1_000_000 - 1_000, 1_000_000).expect("expire"), 1);
    q.cleaned("old").expect("cleaned");
    // The sweep's purge at the same instant: completion is long past both horizons, expiry
    // is not.
    assert_eq!(
        q.purge(1_000_000 - 2_000, 1_000_000 - 1_000)
            .expect("purge"),
        0
    );
    assert_eq!(
        q.get("old").expect("get").expect("kept").state,
        JobState::Expired
    );
    // One retention period after the expiry it goes.
    assert_eq!(
        q.purge(1_001_000 - 2_000, 1_001_000 - 1_000)
            .expect("purge"),
        1
    );
    assert!(q.get("old").expect("get").is_none());
}

/// Reliability review: a failed deletion of a complete export's temporary parts folder was
/// ignored, so the folder stayed for ever. It is recorded with the completion
/// (`Cleanup::Parts`), listed and held like any deletion, and recorded done on its own.
#[test]
fn a_parts_folder_left_at_completion_is_a_cleanup_of_its_own() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[finalize()], 10).expect("create");
    let fin = q
        .claim("w", 10, 10_000, 3)
        .expect("claim")
        .expect("finalize");
    assert!(q.complete_job(&fin, 0, "{}", true, 11).expect("complete"));
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.cleanup), (JobState::Complete, Cleanup::Parts));
    let listed = q.cleanups().expect("cleanups");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].cleanup, Cleanup::Parts);
    let n1 = owner_name("n1", "i1");
    assert!(q.hold_cleanup("a", &n1, 20, 600_000).expect("hold"));
    assert!(
        !q.hold_cleanup("a", &owner_name("n2", "i1"), 21, 600_000)
            .expect("held")
    );
    q.parts_cleaned("a").expect("parts cleaned");
    let a = q.get("a").expect("get").expect("job");
    assert_eq!((a.state, a.cleanup), (JobState::Complete, Cleanup::None));
    assert!(q.cleanups().expect("cleanups").is_empty());
    assert!(
        !q.hold_cleanup("a", &n1, 22, 600_000)
            .expect("nothing to do")
    );
    // A complete job is never purged, whatever its cleanup.
    assert_eq!(q.purge(i64::MAX, i64::MAX).expect("purge"), 0);

    // Expired (or cancelled) while its parts are still to go: the whole folder goes, and a
    // late record of the parts' removal does not end that.
    q.create(&job("b", 2), &[finalize()], 10).expect("create");
    let fin = q
        .claim("w", 30, 10_000, 3)
        .expect("claim")
        .expect("finalize");
    assert!(q.complete_job(&fin, 0, "{}", true, 31).expect("complete"));
    assert_eq!(q.expire(31, 40).expect("expire"), 2, "a and b");
    q.parts_cleaned("b").expect("late");
    let b = q.get("b").expect("get").expect("job");
    assert_eq!((b.state, b.cleanup), (JobState::Expired, Cleanup::Pending));
}

/// Reliability review: an older version completed a job in two writes (finalize item done,
/// then the job complete); when the second was lost the job stayed `running` with every item
/// done for ever, holding a concurrency slot. Its finalize item is made claimable again
/// (once it is older than the heartbeat timeout), and the job completes.
#[test]
fn a_job_left_running_with_every_item_done_gets_its_finalize_again() {
    let (_store, q) = open();
    q.create(&job("a", 1), &[scan("Patient", 0, 10), finalize()], 10)
        .expect("create");
    q.create(&job("busy", 2), &[scan("Patient", 0, 10), finalize()], 10)
        .expect("create");
    let s = q.claim("old", 10, 1_000, 3).expect("claim").expect("scan");
    assert!(q.complete_item(&s, 10, 11).expect("scan done"));
    let fin = q
        .claim("old", 12, 1_000, 3)
        .expect("claim")
        .expect("finalize");
    assert_eq!(fin.kind, ItemKind::Finalize);
    // The older version's first write; its second (the job complete) is lost.
    assert!(q.complete_item(&fin, 0, 13).expect("finalize done"));
    // Another job still running is not touched.
    let busy = q
        .claim("w", 14, 1_000, 3)
        .expect("claim")
        .expect("busy's scan");
    assert_eq!(busy.job_id, "busy");
    assert_eq!(q.active_count().expect("count"), 2);
    assert!(q.claim("w", 15, 1_000, 3).expect("claim").is_none());

    // Not before the heartbeat timeout: the older node may be between its two writes.
    assert_eq!(q.requeue_stranded(500, 1_000).expect("requeue"), 0);
    assert_eq!(q.requeue_stranded(2_000, 1_000).expect("requeue"), 1);
    let again = q
        .claim("new", 2_001, 1_000_000, 3)
        .expect("claim")
        .expect("finalize again");
    assert_eq!(
        (again.job_id.as_str(), again.kind),
        ("a", ItemKind::Finalize)
    );
    assert_eq!(
        again.attempt, fin.attempt,
        "its attempt is not counted again"
    );
    assert!(
        q.complete_job(&again, 0, "{}", false, 2_002)
            .expect("complete")
    );
    assert_eq!(
        q.get("a").expect("get").expect("a").state,
        JobState::Complete
    );
    assert_eq!(q.active_count().expect("count"), 1);
    assert_eq!(q.requeue_stranded(i64::MAX / 2, 1_000).expect("requeue"), 0);
}
