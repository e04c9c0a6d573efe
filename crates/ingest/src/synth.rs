//! Synthetic benchmark data: `fhirhose synth --patients N --out DIR`.
//!
//! Derives N patients from a Synthea seed (patient transaction Bundles plus the hospital and
//! practitioner Bundles, by default `testdata/synthea-seed/` of the repository). Patient `i` is a
//! copy of seed patient `i mod seeds` in which
//! - every patient-specific resource gets a fresh UUID id, and every reference to it (`urn:uuid:`
//!   in the seed) becomes `Type/<new id>`; identifier values equal to an old id follow too;
//! - Organizations, Practitioners, PractitionerRoles and Locations are shared: written once with
//!   their seed ids, referenced as `Type/id`;
//! - given and family names are drawn from fixed lists;
//! - every date, dateTime and instant moves back by a per-patient number of days (0–3650), so the
//!   patient's timeline stays consistent.
//!
//! Output is NDJSON per type (`Patient.ndjson`, `Observation.ndjson`, ...) plus `Group.ndjson`
//! with one Group (`synth-all`) of all patients, ready for `fhirhose load`. Everything is derived
//! from `options.seed`, so a run is reproducible. Patients are generated in parallel blocks
//! (rayon) and written in order; memory is bounded by the block size.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::error::SynthError;
use crate::source::{self, ItemContent};

/// Options of [`synthesize`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub patients: usize,
    pub out_dir: PathBuf,
    /// Folder of Synthea transaction Bundles (`.json` or `.json.gz`).
    pub seed_dir: PathBuf,
    /// Randomness seed: same seed, same output.
    pub seed: u64,
}

impl SynthOptions {
    pub fn new(patients: usize, out_dir: PathBuf) -> SynthOptions {
        SynthOptions {
            patients,
            out_dir,
            seed_dir: default_seed_dir(),
            seed: 1,
        }
    }
}

/// `testdata/synthea-seed` of the source tree this crate was built from.
pub fn default_seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/synthea-seed")
}

/// Progress, reported after every block of patients.
#[derive(Debug, Clone, Default)]
pub struct SynthProgress {
    pub patients_done: usize,
    pub patients_total: usize,
    pub resources: u64,
}

/// What [`synthesize`] wrote.
#[derive(Debug, Clone, Default)]
pub struct SynthSummary {
    pub patients: usize,
    pub per_type: BTreeMap<String, u64>,
    pub files: Vec<PathBuf>,
    pub elapsed: Duration,
}

const SHARED_TYPES: [&str; 4] = [
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
];
const BLOCK: usize = 64;
const MAX_SHIFT_DAYS: u64 = 3650;

const GIVEN: [&str; 24] = [
    "Ada", "Bela", "Cyrus", "Dalia", "Emil", "Farah", "Gus", "Hana", "Ivo", "Jona", "Kira", "Lev",
    "Mara", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wim",
    "Yara",
];
const FAMILY: [&str; 24] = [
    "Abbott",
    "Brandt",
    "Castillo",
    "Dorsey",
    "Eklund",
    "Fischer",
    "Garza",
    "Holm",
    "Ibsen",
    "Jansen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quast",
    "Rossi",
    "Sato",
    "Tanaka",
    "Ulrich",
    "Vargas",
    "Weber",
    "Zhou",
];

/// One seed patient: its resources and the fullUrls they had.
struct SeedPatient {
    resources: Vec<(String, Value)>,
    /// Old id → index into `resources`.
    old_ids: Vec<String>,
}

struct Seed {
    patients: Vec<SeedPatient>,
    shared: Vec<(String, Value)>,
    /// `urn:uuid:X` → `Type/X` for shared resources.
    shared_refs: HashMap<String, String>,
}

/// Generate the data set described in the module docs.
pub fn synthesize(
    options: &SynthOptions,
    progress: &mut dyn FnMut(&SynthProgress),
) -> Result<SynthSummary, SynthError> {
    let started = Instant::now();
    let seed = read_seed(&options.seed_dir)?;
    if seed.patients.is_empty() {
        return Err(SynthError::Seed {
            path: options.seed_dir.clone(),
            message: "no patient Bundles found".into(),
        });
    }
    std::fs::create_dir_all(&options.out_dir).map_err(|source| SynthError::Io {
        path: options.out_dir.clone(),
        source,
    })?;
    let mut out = Outputs::new(&options.out_dir);
    let mut summary = SynthSummary {
        patients: options.patients,
        ..Default::default()
    };
    for (ty, r) in &seed.shared {
        let mut r = r.clone();
        rewrite(&mut r, &seed.shared_refs, &HashMap::new(), 0);
        let mut line = serde_json::to_vec(&r).map_err(|e| seed_err(options, e))?;
        line.push(b'\n');
        out.write(ty, &line)?;
        *summary.per_type.entry(ty.clone()).or_insert(0) += 1;
    }

    let mut patient_ids = Vec::with_capacity(options.patients);
    let mut state = SynthProgress {
        patients_total: options.patients,
        ..Default::default()
    };
    let mut start = 0;
    while start < options.patients {
        let end = (start + BLOCK).min(options.patients);
        let blocks: Vec<Generated> = (start..end)
            .into_par_iter()
            .map(|i| generate(&seed, options.seed, i))
            .collect();
        for g in blocks {
            patient_ids.push(g.patient_id);
            for (ty, bytes, n) in g.per_type {
                out.write(&ty, &bytes)?;
                *summary.per_type.entry(ty).or_insert(0) += n;
                state.resources += n;
            }
        }
        start = end;
        state.patients_done = end;
        progress(&state);
    }

    let members: Vec<Value> = patient_ids
        .iter()
        .map(|id| json!({"entity": {"reference": format!("Patient/{id}")}}))
        .collect();
    let group = json!({
        "resourceType": "Group",
        "id": "synth-all",
        "type": "person",
        "actual": true,
        "name": "Synthetic patients",
        "quantity": patient_ids.len(),
        "member": members,
    });
    let mut line = serde_json::to_vec(&group).map_err(|e| seed_err(options, e))?;
    line.push(b'\n');
    out.write("Group", &line)?;
    *summary.per_type.entry("Group".into()).or_insert(0) += 1;

    summary.files = out.finish()?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn seed_err(options: &SynthOptions, e: serde_json::Error) -> SynthError {
    SynthError::Seed {
        path: options.seed_dir.clone(),
        message: e.to_string(),
    }
}

fn read_seed(dir: &Path) -> Result<Seed, SynthError> {
    let seed_err = |message: String| SynthError::Seed {
        path: dir.to_path_buf(),
        message,
    };
    let files =
        source::collect_inputs(&[dir.to_path_buf()]).map_err(|e| seed_err(e.to_string()))?;
    let mut patients = Vec::new();
    let mut shared = Vec::new();
    let mut shared_ids = HashSet::new();
    let mut shared_refs = HashMap::new();
    for f in files {
        let mut own = Vec::new();
        let mut problems = Vec::new();
        source::read_items(&f, &mut |item| {
            match item {
                Ok(item) => {
                    if let ItemContent::Resource(r) = item.content {
                        own.push((item.full_url, r));
                    }
                }
                Err((loc, msg)) => problems.push(format!("{loc}: {msg}")),
            }
            Ok(())
        })
        .map_err(|e| seed_err(e.to_string()))?;
        if let Some(p) = problems.first() {
            return Err(seed_err(p.clone()));
        }
        let mut patient = SeedPatient {
            resources: Vec::new(),
            old_ids: Vec::new(),
        };
        for (full_url, r) in own {
            let Some(ty) = r
                .get("resourceType")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                continue;
            };
            let id = source::loader_id(full_url.as_deref(), r.get("id").and_then(Value::as_str))
                .ok_or_else(|| seed_err(format!("a {ty} in {} has no id", f.display())))?;
            if SHARED_TYPES.contains(&ty.as_str()) {
                shared_refs.insert(format!("urn:uuid:{id}"), format!("{ty}/{id}"));
                if shared_ids.insert((ty.clone(), id.clone())) {
                    let mut r = r;
                    r["id"] = Value::String(id);
                    shared.push((ty, r));
                }
            } else {
                patient.old_ids.push(id);
                patient.resources.push((ty, r));
            }
        }
        if patient.resources.iter().any(|(t, _)| t == "Patient") {
            patients.push(patient);
        }
    }
    Ok(Seed {
        patients,
        shared,
        shared_refs,
    })
}

/// One generated patient: NDJSON bytes per type, in first-seen type order.
struct Generated {
    patient_id: String,
    per_type: Vec<(String, Vec<u8>, u64)>,
}

fn generate(seed: &Seed, rng_seed: u64, index: usize) -> Generated {
    let mut rng = SplitMix::for_patient(rng_seed, index);
    let sp = &seed.patients[index % seed.patients.len()];
    let shift_days = (rng.next() % (MAX_SHIFT_DAYS + 1)) as i64;
    let mut ids: HashMap<String, String> = HashMap::with_capacity(sp.old_ids.len());
    let mut refs: HashMap<String, String> = HashMap::with_capacity(sp.old_ids.len());
    let mut new_ids = Vec::with_capacity(sp.old_ids.len());
    for (old, (ty, _)) in sp.old_ids.iter().zip(&sp.resources) {
        let new = rng.uuid();
        ids.insert(old.clone(), new.clone());
        refs.insert(format!("urn:uuid:{old}"), format!("{ty}/{new}"));
        new_ids.push(new);
    }
    let given = GIVEN[(rng.next() % GIVEN.len() as u64) as usize];
    let family = FAMILY[(rng.next() % FAMILY.len() as u64) as usize];
    let mut per_type: Vec<(String, Vec<u8>, u64)> = Vec::new();
    let mut patient_id = String::new();
    for ((ty, r), new_id) in sp.resources.iter().zip(new_ids) {
        let mut r = r.clone();
        rewrite_with_shared(&mut r, &refs, &seed.shared_refs, &ids, shift_days);
        r["id"] = Value::String(new_id.clone());
        if ty == "Patient" {
            rename(&mut r, given, family, index);
            patient_id = new_id;
        }
        let slot = match per_type.iter().position(|(t, _, _)| t == ty) {
            Some(p) => p,
            None => {
                per_type.push((ty.clone(), Vec::new(), 0));
                per_type.len() - 1
            }
        };
        let (_, buf, n) = &mut per_type[slot];
        // Serializing a Value built from JSON cannot fail.
        if serde_json::to_writer(&mut *buf, &r).is_ok() {
            buf.push(b'\n');
            *n += 1;
        }
    }
    Generated {
        patient_id,
        per_type,
    }
}

fn rename(patient: &mut Value, given: &str, family: &str, index: usize) {
    let Some(names) = patient.get_mut("name").and_then(Value::as_array_mut) else {
        return;
    };
    for name in names {
        if let Some(obj) = name.as_object_mut() {
            obj.insert("family".into(), Value::String(format!("{family}{index}")));
            obj.insert("given".into(), json!([given]));
        }
    }
}

fn rewrite_with_shared(
    v: &mut Value,
    refs: &HashMap<String, String>,
    shared: &HashMap<String, String>,
    ids: &HashMap<String, String>,
    shift_days: i64,
) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                {
                    if let Some(t) = refs.get(s.as_str()).or_else(|| shared.get(s.as_str())) {
                        *s = t.clone();
                    }
                    continue;
                }
                rewrite_with_shared(child, refs, shared, ids, shift_days);
            }
        }
        Value::Array(items) => {
            for child in items {
                rewrite_with_shared(child, refs, shared, ids, shift_days);
            }
        }
        Value::String(s) => {
            if s.len() == 36
                && let Some(new) = ids.get(s.as_str())
            {
                *s = new.clone();
            } else if let Some(shifted) = shift_date(s, shift_days) {
                *s = shifted;
            }
        }
        _ => {}
    }
}

/// Rewrite references of shared resources (no per-patient ids, no date shift).
fn rewrite(
    v: &mut Value,
    shared: &HashMap<String, String>,
    ids: &HashMap<String, String>,
    days: i64,
) {
    rewrite_with_shared(v, &HashMap::new(), shared, ids, days);
}

/// `YYYY-MM-DD` or `YYYY-MM-DDThh:mm:ss…` moved back by `days`; `None` if `s` is not a full date.
fn shift_date(s: &str, days: i64) -> Option<String> {
    if days == 0 {
        return None;
    }
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' || (b.len() > 10 && b[10] != b'T') {
        return None;
    }
    if !b[..4]
        .iter()
        .chain(&b[5..7])
        .chain(&b[8..10])
        .all(u8::is_ascii_digit)
    {
        return None;
    }
    let date = NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d").ok()?;
    let moved = date.checked_sub_signed(chrono::Duration::days(days))?;
    Some(format!("{}{}", moved.format("%Y-%m-%d"), &s[10..]))
}

/// Per-type NDJSON writers in the output folder.
struct Outputs {
    dir: PathBuf,
    writers: BTreeMap<String, BufWriter<File>>,
}

impl Outputs {
    fn new(dir: &Path) -> Outputs {
        Outputs {
            dir: dir.to_path_buf(),
            writers: BTreeMap::new(),
        }
    }

    fn write(&mut self, ty: &str, bytes: &[u8]) -> Result<(), SynthError> {
        let path = self.dir.join(format!("{ty}.ndjson"));
        let io = |source| SynthError::Io {
            path: path.clone(),
            source,
        };
        if !self.writers.contains_key(ty) {
            let f = File::create(&path).map_err(io)?;
            self.writers
                .insert(ty.to_string(), BufWriter::with_capacity(1 << 20, f));
        }
        if let Some(w) = self.writers.get_mut(ty) {
            w.write_all(bytes).map_err(io)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<PathBuf>, SynthError> {
        let mut files = Vec::new();
        for (ty, mut w) in self.writers {
            let path = self.dir.join(format!("{ty}.ndjson"));
            w.flush().map_err(|source| SynthError::Io {
                path: path.clone(),
                source,
            })?;
            files.push(path);
        }
        Ok(files)
    }
}

/// SplitMix64's finaliser: a bijection on u64 with full avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small deterministic generator (SplitMix64): reproducible output without a dependency.
struct SplitMix(u64);

impl SplitMix {
    /// The stream of patient `index`. The start state goes through the mixing function: a plain
    /// `seed ^ index * step` start would make patient i+1's stream patient i's shifted by one step,
    /// so consecutive patients would share almost every id.
    fn for_patient(seed: u64, index: usize) -> SplitMix {
        SplitMix(mix(seed ^ mix(index as u64 ^ 0x005E_ED0F_5EED)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A version-4 style UUID from the stream.
    fn uuid(&mut self) -> String {
        let hi = self.next();
        let lo = self.next();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_shift_and_keep_their_time_part() {
        assert_eq!(shift_date("2020-03-01", 1).as_deref(), Some("2020-02-29"));
        assert_eq!(
            shift_date("2020-03-01T10:00:00+02:00", 2).as_deref(),
            Some("2020-02-28T10:00:00+02:00")
        );
        assert_eq!(shift_date("2020-03", 5), None);
        assert_eq!(shift_date("abcd-ef-gh", 5), None);
        assert_eq!(shift_date("2020-03-01 not a date", 5), None);
    }

    #[test]
    fn uuids_are_valid_and_reproducible() {
        let a = SplitMix(7).uuid();
        assert_eq!(a, SplitMix(7).uuid());
        assert!(uuid::Uuid::parse_str(&a).is_ok());
    }

    #[test]
    fn patients_draw_distinct_ids() {
        // 2,000 patients of 400 resources each: every id is new.
        let mut seen = HashSet::new();
        for index in 0..2_000 {
            let mut rng = SplitMix::for_patient(42, index);
            for _ in 0..400 {
                assert!(seen.insert(rng.uuid()), "repeated id at patient {index}");
            }
        }
    }
}
