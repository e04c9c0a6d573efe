//! A caller that stops waiting for the database, and the commits that must then not happen.
//!
//! A database that stops answering without closing its connections (a host or VM paused, a
//! storage stall under PostgreSQL or under SQLite's file, a network that drops packets) leaves
//! every call blocked in a read. The server bounds how long a request waits for its store work
//! (`--database-wait`) and answers 503 when the bound passes; the thread doing the work stays
//! blocked until the database answers again. Without more, that thread's write would then
//! commit: the client, told 503, retries, and the resource is created twice.
//!
//! [`Patience`] is the agreement between the two sides. The request runs its store work under
//! it ([`Patience::run`], which makes it the thread's current one); every transaction the
//! store commits on that thread first calls [`before_commit`], which marks the patience
//! *committing*, or, once the caller gave up, refuses ([`StoreError::GivenUp`]: the transaction
//! is rolled back, nothing written). The caller gives up with [`Patience::give_up`], which
//! says whether a commit had begun before it ([`GaveUp::CommitBegun`]: its outcome is unknown
//! until the database answers). The state changes once, atomically, so exactly one of "the
//! commit went ahead" and "the caller gave up first" happens.
//!
//! Work outside any patience (the export workers, the loader, the job queue's own upkeep) is
//! not affected: [`before_commit`] then always allows the commit.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::StoreError;

const WAITING: u8 = 0;
const COMMITTING: u8 = 1;
const GIVEN_UP: u8 = 2;

thread_local! {
    static CURRENT: RefCell<Option<Patience>> = const { RefCell::new(None) };
}

/// How long one caller still waits for its store work; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Patience {
    state: Arc<AtomicU8>,
}

/// What [`Patience::give_up`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GaveUp {
    /// No commit had begun; none will: nothing of the work is written.
    NothingWritten,
    /// A commit had already been sent to the database: whether it took effect is unknown until
    /// the database answers.
    CommitBegun,
}

impl Patience {
    /// A caller that is still waiting.
    pub fn new() -> Patience {
        Patience::default()
    }

    /// Runs `f` on this thread with this patience current: the store's commits inside it ask
    /// [`before_commit`] first. The previous current patience (normally none) is restored
    /// afterwards, also when `f` panics.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<Patience>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = previous);
            }
        }
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.clone()));
        let _restore = Restore(previous);
        f()
    }

    /// The caller stops waiting. From now on no commit of the work starts; the answer says
    /// whether one had started already.
    pub fn give_up(&self) -> GaveUp {
        match self
            .state
            .compare_exchange(WAITING, GIVEN_UP, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(GIVEN_UP) => GaveUp::NothingWritten,
            Err(_) => GaveUp::CommitBegun,
        }
    }

    /// The caller gave up ([`Patience::give_up`]) before any commit began.
    pub fn given_up(&self) -> bool {
        self.state.load(Ordering::Acquire) == GIVEN_UP
    }
}

/// Called by the store right before it commits a transaction on this thread: refuses
/// ([`StoreError::GivenUp`]; the caller drops, so rolls back, the transaction) once the current
/// [`Patience`] was given up, and otherwise marks it committing, so that a later give-up knows
/// the outcome is the database's. Without a current patience, always `Ok`.
pub fn before_commit() -> Result<(), StoreError> {
    CURRENT.with(|c| match &*c.borrow() {
        None => Ok(()),
        Some(p) => {
            match p
                .state
                .compare_exchange(WAITING, COMMITTING, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) | Err(COMMITTING) => Ok(()),
                Err(_) => Err(StoreError::GivenUp),
            }
        }
    })
}

/// Called where work may have waited long before it starts (SQLite's single writer lock, held
/// by a write the stalled disk blocks): refuses ([`StoreError::GivenUp`]) once the current
/// [`Patience`] was given up, so that the writes queued behind a stall do not each run a
/// transaction only to roll it back when it ends. Without a current patience, always `Ok`.
pub fn still_waited_for() -> Result<(), StoreError> {
    CURRENT.with(|c| match &*c.borrow() {
        Some(p) if p.given_up() => Err(StoreError::GivenUp),
        _ => Ok(()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_after_the_caller_gave_up_is_refused_and_one_before_is_reported() {
        // Outside any patience: always allowed.
        assert!(before_commit().is_ok());

        let p = Patience::new();
        assert_eq!(p.give_up(), GaveUp::NothingWritten);
        assert!(p.given_up());
        assert!(matches!(p.run(before_commit), Err(StoreError::GivenUp)));
        assert!(matches!(p.run(still_waited_for), Err(StoreError::GivenUp)));
        assert!(still_waited_for().is_ok());
        // Restored afterwards: this thread's next work is not affected.
        assert!(before_commit().is_ok());

        let p = Patience::new();
        assert!(p.run(before_commit).is_ok());
        // A second transaction of the same work commits too.
        assert!(p.run(before_commit).is_ok());
        assert_eq!(p.give_up(), GaveUp::CommitBegun);
        assert!(!p.given_up());
    }

    #[test]
    fn the_patience_is_restored_when_the_work_panics() {
        let p = Patience::new();
        p.give_up();
        let r = std::panic::catch_unwind(|| p.run(|| panic!("work failed")));
        assert!(r.is_err());
        assert!(before_commit().is_ok());
    }

    #[test]
    fn giving_up_races_a_commit_on_another_thread_and_exactly_one_wins() {
        for _ in 0..200 {
            let p = Patience::new();
            let worker = {
                let p = p.clone();
                std::thread::spawn(move || p.run(before_commit).is_ok())
            };
            let gave_up = p.give_up();
            let committed = worker.join().unwrap();
            assert_eq!(committed, gave_up == GaveUp::CommitBegun);
        }
    }
}
