//! The durable job queue the export runs on: the contract and its typed records live in the
//! store ([`store::jobs`]), which keeps them in the same database as the resources
//! ([`store::Store::jobs`]; on SQLite in `exports.db` beside it, see
//! [`store::sqlite::SqliteJobQueue`]). Re-exported here for the export API.

pub use store::jobs::*;
pub use store::sqlite::SqliteJobQueue;
