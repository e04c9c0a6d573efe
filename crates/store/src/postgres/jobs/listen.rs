//! Waking the export workers of every node when work becomes claimable (PostgreSQL
//! `LISTEN`/`NOTIFY`). The queue's statements that add work items (a kick-off) or give them back
//! (a release at shutdown, a failure to retry, a dead incarnation's leases) run
//! `NOTIFY fhirhose_work` in their transaction: PostgreSQL delivers it at commit, to every session
//! listening, and never for a rolled-back transaction. Each node keeps one connection of its own
//! (not from a pool: a listening session must stay open) that `LISTEN`s and calls the export
//! service's wake-up; the workers' poll stays as the fallback for whatever a notification misses
//! (the listener reconnecting, a node started after the notification).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::postgres::Client;
use ::postgres::fallible_iterator::FallibleIterator;

use super::super::Target;
use super::super::target::describe;
use crate::StoreError;
use crate::jobs::WorkWatch;

/// The channel of work notifications.
const CHANNEL: &str = "fhirhose_work";

/// The statement that announces claimable work, run inside the transaction that made it so.
pub(super) const NOTIFY: &str = "NOTIFY fhirhose_work";

/// How long the listener waits for a notification before it looks at its stop flag again.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// Round-trip check of a quiet listening connection every this many looks (a connection cut
/// without a reset would otherwise wait for notifications that never come).
const CHECK_EVERY_LOOKS: u32 = 60;

/// First and longest wait before connecting again after the listening connection was lost.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the listener thread: `wake` is called for every notification, and once after every
/// (re)connection (notifications sent while no session listened are lost). Stops when the
/// returned watch is dropped.
pub(super) fn spawn(
    target: Target,
    wake: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<WorkWatch> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("export-listen".into())
        .spawn(move || listen(&target, &*wake, &stopped))?;
    Ok(WorkWatch::new(stop))
}

fn listen(target: &Target, wake: &(dyn Fn() + Send + Sync), stop: &AtomicBool) {
    let mut backoff = BACKOFF_FIRST;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let mut client = match connect(target) {
            Ok(c) => c,
            Err(e) => {
                if !failing {
                    tracing::warn!(target_db = %target.display, error = %e, "cannot listen for export work (the job queue is polled meanwhile)");
                    failing = true;
                }
                pause(stop, backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        wake();
        if failing {
            tracing::info!(target_db = %target.display, "listening for export work again");
            failing = false;
        } else {
            tracing::info!(target_db = %target.display, "listening for export work");
        }
        if let Err(e) = serve(&mut client, wake, stop) {
            tracing::warn!(target_db = %target.display, error = %e, "lost the connection listening for export work; connecting again");
            failing = true;
            pause(stop, backoff);
        }
    }
}

fn connect(target: &Target) -> Result<Client, StoreError> {
    let mut client = target.connect()?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .map_err(|e| target.unavailable(describe(&e)))?;
    Ok(client)
}

/// Wakes on notifications until `stop` is set (`Ok`) or the connection fails.
fn serve(
    client: &mut Client,
    wake: &(dyn Fn() + Send + Sync),
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut quiet = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let got = {
            let mut notifications = client.notifications();
            let got = notifications.timeout_iter(LOOK_EVERY).next();
            if let Ok(Some(_)) = got {
                // Several notifications at once wake the workers once.
                while let Ok(Some(_)) = notifications.iter().next() {}
            }
            got.map(|n| n.is_some())
        };
        match got {
            Ok(true) => {
                quiet = 0;
                wake();
            }
            Ok(false) => {
                quiet += 1;
                if quiet >= CHECK_EVERY_LOOKS {
                    quiet = 0;
                    client
                        .is_valid(Duration::from_secs(5))
                        .map_err(|e| describe(&e))?;
                }
            }
            Err(e) => return Err(describe(&e)),
        }
    }
    Ok(())
}

/// Sleeps `d`, in short steps that look at `stop`.
fn pause(stop: &AtomicBool, d: Duration) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}
