//! What the integration tests of several crates share (issue 23 item 6), written once:
//!
//! - [`process`]: a command with a clean environment, a free port, waiting for a started
//!   `fhirhose serve` to answer ([`process::Serve`]), signals, log tails.
//! - [`external`]: the components `scripts/test.sh` starts or installs (Azurite, moto, s3s-fs,
//!   PostgreSQL, pyarrow): skipped when absent, a failure under `FHIRHOSE_REQUIRE_EXTERNAL=1`.
//! - [`destination`]: a private Azurite, moto or s3s-fs on a free port of its own, to stop,
//!   pause and restart without disturbing other tests.
//! - [`smart`]: SMART Backend Services clients signed with the auth crate's test keys.
//! - [`sink`]: [`sink::FaultySink`], an export destination forwarding to another with a fault
//!   hook per call (a destination down for some calls).
//! - [`raw_http`]: a hand-written HTTP/1.1 server for the hostile-server tests of the clients.
//!
//! The PostgreSQL database of one test is the store's own (`store::testing`, cargo feature
//! `test-support` of the store). This crate is a dev-dependency only: nothing here is built into
//! the server.

pub mod destination;
pub mod external;
pub mod process;
pub mod raw_http;
pub mod sink;
pub mod smart;

use std::path::{Path, PathBuf};

/// The workspace's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The 100-patient Synthea set (`testdata/synthea-r4-100`, gzipped Bundles).
pub fn synthea_100() -> PathBuf {
    repo_root().join("testdata/synthea-r4-100")
}

/// Distinct resources per type in `testdata/synthea-r4-100` (see its PROVENANCE.md: the 452
/// Organization and Practitioner entries name 203 distinct resources each).
pub const SYNTHEA_100_COUNTS: &[(&str, usize)] = &[
    ("Observation", 16_315),
    ("Claim", 6_083),
    ("Encounter", 3_697),
    ("ExplanationOfBenefit", 3_697),
    ("MedicationRequest", 2_386),
    ("Procedure", 2_351),
    ("Immunization", 1_287),
    ("DiagnosticReport", 897),
    ("Condition", 639),
    ("Organization", 203),
    ("Practitioner", 203),
    ("CareTeam", 278),
    ("CarePlan", 278),
    ("Patient", 100),
    ("AllergyIntolerance", 38),
    ("ImagingStudy", 16),
    ("Device", 4),
    ("Group", 1),
];
