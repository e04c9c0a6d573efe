//! The pool of read-only connections: a fixed set handed out one at a time, waiting while all
//! are in use.

use std::ops::Deref;
use std::sync::{Condvar, Mutex, MutexGuard};

use rusqlite::Connection;

/// A fixed set of read-only connections; `get` waits while all are in use.
pub(super) struct ReaderPool {
    pub(super) conns: Mutex<Vec<Connection>>,
    pub(super) available: Condvar,
}

impl ReaderPool {
    pub(super) fn get(&self) -> PooledConn<'_> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(conn) = conns.pop() {
                return PooledConn {
                    pool: self,
                    conn: Some(conn),
                };
            }
            conns = self
                .available
                .wait(conns)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

pub(super) struct PooledConn<'a> {
    pub(super) pool: &'a ReaderPool,
    pub(super) conn: Option<Connection>,
}

impl Deref for PooledConn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("present until drop")
    }
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut conns: MutexGuard<'_, Vec<Connection>> =
                self.pool.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.push(conn);
            self.pool.available.notify_one();
        }
    }
}
