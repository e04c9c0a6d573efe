//! Dry run: what a configuration would do to a set of resources, without the data.
//!
//! - **Rules**: how many nodes each rule processed (first match wins), and the rules that
//!   processed none.
//! - **Coverage**: per resource type, the fields whose values no rule touched. Found by running
//!   the same rules with every method replaced by `redact` (no partial dates, ages or zip codes):
//!   rules then reach exactly the nodes they reach in the real run, and whatever value survives
//!   that run was reached by no rule.
//! - **Residual PHI**: names, birth dates, phone numbers, e-mail addresses, postal codes and
//!   identifier values of each input resource (found by FHIR type: `HumanName`, `ContactPoint`,
//!   `Address.postalCode`, `Identifier.value`, `birthDate`) that appear verbatim in the
//!   would-be output of that resource: as a whole value, or (4 characters or more) inside one.
//!   The report names the category, type and output field, never the value.
//! - **Risk**: k-anonymity of the output Patients over the quasi-identifiers that survive.
//!
//! Everything is counted per resource and merged, so that the report of a set is the merge of
//! the reports of its parts (threads, files). Pure: no IO.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{Datelike, NaiveDate};
use fhirpath::{Item, Node};
use serde::Serialize;
use serde_json::Value as Json;

use crate::config::{Config, Method};
use crate::engine::{DeidError, Engine};

/// A quasi-identifier of a Patient, read on the de-identified output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum QuasiIdentifier {
    /// The year of `birthDate`.
    BirthYear,
    /// Age in 10-year bands (`30-39`) at the report's date, from `birthDate`.
    AgeBand,
    Gender,
    /// The first three characters of the first address's `postalCode`.
    Zip3,
    /// The first address's `state`.
    State,
}

impl QuasiIdentifier {
    pub fn parse(s: &str) -> Option<QuasiIdentifier> {
        Some(match s.to_ascii_lowercase().as_str() {
            "birthyear" | "yearofbirth" => QuasiIdentifier::BirthYear,
            "ageband" | "age" => QuasiIdentifier::AgeBand,
            "gender" => QuasiIdentifier::Gender,
            "zip3" | "zip" => QuasiIdentifier::Zip3,
            "state" => QuasiIdentifier::State,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            QuasiIdentifier::BirthYear => "birthYear",
            QuasiIdentifier::AgeBand => "ageBand",
            QuasiIdentifier::Gender => "gender",
            QuasiIdentifier::Zip3 => "zip3",
            QuasiIdentifier::State => "state",
        }
    }

    /// The value on a de-identified Patient; `None` when it did not survive.
    fn value(self, patient: &Json, today: NaiveDate) -> Option<String> {
        let birth_year = || {
            patient
                .get("birthDate")
                .and_then(Json::as_str)
                .and_then(|b| b.get(..4))
                .and_then(|y| y.parse::<i32>().ok())
        };
        let address = |key: &str| {
            patient
                .get("address")
                .and_then(|a| a.get(0))
                .and_then(|a| a.get(key))
                .and_then(Json::as_str)
                .map(str::to_string)
        };
        match self {
            QuasiIdentifier::BirthYear => birth_year().map(|y| y.to_string()),
            QuasiIdentifier::AgeBand => birth_year().map(|y| {
                let band = ((today.year() - y).max(0) / 10) * 10;
                format!("{band}-{}", band + 9)
            }),
            QuasiIdentifier::Gender => patient
                .get("gender")
                .and_then(Json::as_str)
                .map(str::to_string),
            QuasiIdentifier::Zip3 => address("postalCode").map(|z| z.chars().take(3).collect()),
            QuasiIdentifier::State => address("state"),
        }
    }
}

/// What the risk part of the report measures.
#[derive(Debug, Clone)]
pub struct RiskOptions {
    pub quasi_identifiers: Vec<QuasiIdentifier>,
    /// Equivalence classes smaller than this are counted.
    pub k: usize,
    /// The date ages are computed at.
    pub today: NaiveDate,
}

impl RiskOptions {
    pub fn new(today: NaiveDate) -> RiskOptions {
        RiskOptions {
            quasi_identifiers: vec![
                QuasiIdentifier::BirthYear,
                QuasiIdentifier::Gender,
                QuasiIdentifier::Zip3,
            ],
            k: 5,
            today,
        }
    }
}

/// Accumulates a dry run over resources; [`DryRun::report`] at the end.
#[derive(Debug, Clone)]
pub struct DryRun {
    engine: Engine,
    coverage: Engine,
    rules: Vec<(usize, String, String)>,
    risk: RiskOptions,
    resources: u64,
    skipped: u64,
    failed: u64,
    rule_hits: Vec<u64>,
    /// (resource type, field path) -> values present, values no rule touched.
    fields: BTreeMap<(String, String), (u64, u64)>,
    /// (category, resource type, output field) -> occurrences.
    residual: BTreeMap<(&'static str, String, String), u64>,
    /// Quasi-identifier values of each output Patient -> patients.
    classes: HashMap<Vec<Option<String>>, u64>,
}

fn method_name(m: &Method) -> String {
    match m {
        Method::Keep => "keep",
        Method::Redact => "redact",
        Method::DateShift => "dateShift",
        Method::CryptoHash => "cryptoHash",
        Method::Encrypt => "encrypt",
        Method::Substitute(_) => "substitute",
        Method::Perturb { .. } => "perturb",
        Method::Generalize { .. } => "generalize",
        Method::Unknown(m) => m,
    }
    .to_string()
}

impl DryRun {
    /// `engine` is the configured engine (its keys, scope and file context), as it would run.
    pub fn new(engine: Engine, risk: RiskOptions) -> DryRun {
        let config: &Config = engine.config();
        let rules = config
            .rules
            .iter()
            .map(|r| (r.index, r.path.clone(), method_name(&r.method)))
            .collect::<Vec<_>>();
        let mut redact_all = config.clone();
        for r in &mut redact_all.rules {
            r.method = Method::Redact;
        }
        let p = &mut redact_all.parameters;
        p.enable_partial_dates_for_redact = false;
        p.enable_partial_ages_for_redact = false;
        p.enable_partial_zip_codes_for_redact = false;
        DryRun {
            rule_hits: vec![0; rules.len()],
            coverage: Engine::new(redact_all).with_today(risk.today),
            engine: engine.with_today(risk.today),
            rules,
            risk,
            resources: 0,
            skipped: 0,
            failed: 0,
            fields: BTreeMap::new(),
            residual: BTreeMap::new(),
            classes: HashMap::new(),
        }
    }

    /// Runs one input resource through the configuration (its output is only measured). A
    /// resource the configuration fails on is counted, and its error returned.
    /// A Bundle is measured entry by entry (its entries' types are what the report is about).
    pub fn add(&mut self, input: &Json) -> Result<(), DeidError> {
        if input.get("resourceType").and_then(Json::as_str) == Some("Bundle")
            && let Some(entries) = input.get("entry").and_then(Json::as_array)
        {
            let mut first_error = None;
            for r in entries.iter().filter_map(|e| e.get("resource")) {
                if let Err(e) = self.add(r) {
                    first_error.get_or_insert(e);
                }
            }
            return first_error.map_or(Ok(()), Err);
        }
        self.resources += 1;
        let out = match self.engine.anonymize(input.clone()) {
            Ok(o) => o,
            Err(e) => {
                self.failed += 1;
                return Err(e);
            }
        };
        for (slot, h) in self.rule_hits.iter_mut().zip(&out.rule_hits) {
            *slot += h;
        }
        if out.skipped {
            self.skipped += 1;
        }
        let ty = input
            .get("resourceType")
            .and_then(Json::as_str)
            .unwrap_or("?")
            .to_string();
        // Coverage: leaves that survive redaction by every rule were reached by none.
        if let Ok(cov) = self.coverage.anonymize(input.clone()) {
            let mut survived: BTreeSet<(String, String)> = BTreeSet::new();
            leaves(&cov.resource, &ty, &mut |p, v| {
                survived.insert((p, v));
            });
            let mut seen: BTreeMap<String, bool> = BTreeMap::new();
            leaves(input, &ty, &mut |p, v| {
                let untouched = survived.contains(&(p.clone(), v));
                let e = seen.entry(p).or_insert(false);
                *e |= untouched;
            });
            for (p, untouched) in seen {
                let e = self.fields.entry((ty.clone(), p)).or_default();
                e.0 += 1;
                e.1 += u64::from(untouched);
            }
        }
        // Residual PHI of this resource in its output.
        let phi = phi_values(input);
        if !phi.is_empty() {
            let mut strings = Vec::new();
            leaves(&out.resource, &ty, &mut |p, v| strings.push((p, v)));
            for (cat, value) in &phi {
                for (p, v) in &strings {
                    // Inside a longer text (a narrative, a comment), not inside a number.
                    let in_text = value.chars().count() >= 4
                        && v.len() > value.len()
                        && !v.starts_with(|c: char| c.is_ascii_digit() || c == '-')
                        && v.contains(value.as_str());
                    if v == value || in_text {
                        *self
                            .residual
                            .entry((cat, ty.clone(), p.clone()))
                            .or_default() += 1;
                    }
                }
            }
        }
        if ty == "Patient" && !out.skipped {
            let key: Vec<Option<String>> = self
                .risk
                .quasi_identifiers
                .iter()
                .map(|q| q.value(&out.resource, self.risk.today))
                .collect();
            *self.classes.entry(key).or_default() += 1;
        }
        Ok(())
    }

    /// Adds another dry run's counts (same configuration and options) to this one.
    pub fn merge(&mut self, other: DryRun) {
        self.resources += other.resources;
        self.skipped += other.skipped;
        self.failed += other.failed;
        for (a, b) in self.rule_hits.iter_mut().zip(other.rule_hits) {
            *a += b;
        }
        for (k, (n, u)) in other.fields {
            let e = self.fields.entry(k).or_default();
            e.0 += n;
            e.1 += u;
        }
        for (k, n) in other.residual {
            *self.residual.entry(k).or_default() += n;
        }
        for (k, n) in other.classes {
            *self.classes.entry(k).or_default() += n;
        }
    }

    pub fn report(&self) -> Report {
        let rules: Vec<RuleReport> = self
            .rules
            .iter()
            .map(|(i, path, method)| RuleReport {
                index: *i,
                path: path.clone(),
                method: method.clone(),
                nodes: self.rule_hits.get(*i).copied().unwrap_or(0),
            })
            .collect();
        let unmatched_rules = rules
            .iter()
            .filter(|r| r.nodes == 0)
            .map(|r| r.index)
            .collect();
        let mut untouched: BTreeMap<String, Vec<FieldReport>> = BTreeMap::new();
        for ((ty, path), (n, u)) in &self.fields {
            if *u > 0 {
                untouched.entry(ty.clone()).or_default().push(FieldReport {
                    field: path.clone(),
                    resources: *n,
                    untouched: *u,
                });
            }
        }
        let residual_phi = self
            .residual
            .iter()
            .map(|((cat, ty, field), n)| ResidualReport {
                category: cat.to_string(),
                resource_type: ty.clone(),
                field: field.clone(),
                occurrences: *n,
            })
            .collect();
        Report {
            resources: self.resources,
            skipped: self.skipped,
            failed: self.failed,
            rules,
            unmatched_rules,
            untouched_fields: untouched,
            residual_phi,
            risk: self.risk(),
        }
    }

    fn risk(&self) -> RiskReport {
        let k = self.risk.k as u64;
        let patients: u64 = self.classes.values().sum();
        let below = |classes: &HashMap<Vec<Option<String>>, u64>| {
            classes.values().filter(|n| **n < k).sum::<u64>()
        };
        let without = self
            .risk
            .quasi_identifiers
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut merged: HashMap<Vec<Option<String>>, u64> = HashMap::new();
                for (key, n) in &self.classes {
                    let mut key = key.clone();
                    key.remove(i);
                    *merged.entry(key).or_default() += n;
                }
                let surviving = self
                    .classes
                    .iter()
                    .filter(|(key, _)| key[i].is_some())
                    .map(|(_, n)| n)
                    .sum();
                QiReport {
                    quasi_identifier: q.name().to_string(),
                    patients_with_value: surviving,
                    patients_below_k_without_it: below(&merged),
                }
            })
            .collect::<Vec<_>>();
        let below_k = below(&self.classes);
        let most = without
            .iter()
            .filter(|q| q.patients_below_k_without_it < below_k)
            .min_by_key(|q| q.patients_below_k_without_it)
            .map(|q| q.quasi_identifier.clone());
        RiskReport {
            k: self.risk.k,
            quasi_identifiers: self
                .risk
                .quasi_identifiers
                .iter()
                .map(|q| q.name().to_string())
                .collect(),
            patients,
            equivalence_classes: self.classes.len() as u64,
            smallest_class: self.classes.values().min().copied().unwrap_or(0),
            patients_below_k: below_k,
            most_identifying: most,
            by_quasi_identifier: without,
        }
    }
}

/// The dry-run report (JSON with serde, a table with `Display`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub resources: u64,
    /// Replaced by the `processingErrors: skip` stub.
    pub skipped: u64,
    /// The configuration failed on them (`processingErrors: raise`).
    pub failed: u64,
    pub rules: Vec<RuleReport>,
    /// Indexes of the rules that processed no node.
    pub unmatched_rules: Vec<usize>,
    /// Per resource type, the fields with values no rule touched.
    pub untouched_fields: BTreeMap<String, Vec<FieldReport>>,
    pub residual_phi: Vec<ResidualReport>,
    pub risk: RiskReport,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleReport {
    pub index: usize,
    pub path: String,
    pub method: String,
    /// Nodes the rule processed (it and its descendants, first match wins).
    pub nodes: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldReport {
    /// `name.given`, `extension.valueString` (element names from the resource, no indexes).
    pub field: String,
    /// Resources with a value there.
    pub resources: u64,
    /// Resources with a value there that no rule touched.
    pub untouched: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResidualReport {
    /// `name`, `birthDate`, `phone`, `email`, `postalCode`, `identifier` (or `telecom`).
    pub category: String,
    pub resource_type: String,
    /// Where in the output the input's value was found.
    pub field: String,
    pub occurrences: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RiskReport {
    pub k: usize,
    pub quasi_identifiers: Vec<String>,
    /// Output Patients measured.
    pub patients: u64,
    pub equivalence_classes: u64,
    pub smallest_class: u64,
    /// Patients in classes smaller than k.
    pub patients_below_k: u64,
    /// The quasi-identifier whose removal lowers `patientsBelowK` the most.
    pub most_identifying: Option<String>,
    pub by_quasi_identifier: Vec<QiReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QiReport {
    pub quasi_identifier: String,
    /// Output Patients on which this quasi-identifier survived.
    pub patients_with_value: u64,
    pub patients_below_k_without_it: u64,
}

/// Primitive leaves of a resource as (field path without indexes, value text); the path does
/// not enter nested resources' `resourceType`.
fn leaves(v: &Json, _ty: &str, f: &mut dyn FnMut(String, String)) {
    fn walk(v: &Json, path: &mut String, f: &mut dyn FnMut(String, String)) {
        match v {
            Json::Object(o) => {
                for (k, c) in o {
                    if k == "resourceType" || (path.is_empty() && k == "meta") {
                        continue;
                    }
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k.strip_prefix('_').unwrap_or(k));
                    walk(c, path, f);
                    path.truncate(len);
                }
            }
            Json::Array(a) => a.iter().for_each(|c| walk(c, path, f)),
            Json::Null => {}
            Json::String(s) => f(path.clone(), s.clone()),
            other => f(path.clone(), other.to_string()),
        }
    }
    walk(v, &mut String::new(), f)
}

/// Identifying values of one input resource by category, found by FHIR type.
fn phi_values(input: &Json) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    fn text(n: &Node<'_>) -> Vec<String> {
        n.json()
            .and_then(Json::as_str)
            .filter(|s| s.trim().chars().count() >= 2)
            .map(|s| vec![s.trim().to_string()])
            .unwrap_or_default()
    }
    fn child<'a>(n: &Node<'a>, name: &str) -> Vec<Node<'a>> {
        n.children()
            .into_iter()
            .filter_map(|c| match c {
                Item::Node(c) if c.name() == name => Some(c),
                _ => None,
            })
            .collect()
    }
    fn walk(n: &Node<'_>, out: &mut Vec<(&'static str, String)>) {
        match n.fhir_type() {
            "HumanName" => {
                for part in ["family", "given", "text"] {
                    for c in child(n, part) {
                        out.extend(text(&c).into_iter().map(|t| ("name", t)));
                    }
                }
            }
            "ContactPoint" => {
                let system = child(n, "system")
                    .first()
                    .and_then(|s| s.json())
                    .and_then(Json::as_str)
                    .map(str::to_string);
                let cat = match system.as_deref() {
                    Some("phone") | Some("fax") | Some("sms") | Some("pager") => "phone",
                    Some("email") => "email",
                    _ => "telecom",
                };
                for c in child(n, "value") {
                    out.extend(text(&c).into_iter().map(|t| (cat, t)));
                }
            }
            "Address" => {
                for c in child(n, "postalCode") {
                    out.extend(text(&c).into_iter().map(|t| ("postalCode", t)));
                }
            }
            "Identifier" => {
                for c in child(n, "value") {
                    out.extend(text(&c).into_iter().map(|t| ("identifier", t)));
                }
            }
            _ if n.name() == "birthDate" => {
                out.extend(text(n).into_iter().map(|t| ("birthDate", t)));
            }
            _ => {}
        }
        for c in n.children() {
            if let Item::Node(c) = c {
                walk(&c, out);
            }
        }
    }
    walk(&Node::root(input), &mut out);
    out.sort();
    out.dedup();
    out
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "Dry run: {} resources ({} replaced by the processing-error stub, {} failed)",
            self.resources, self.skipped, self.failed
        )?;
        writeln!(f, "\nRules (nodes processed, first match wins)")?;
        writeln!(f, "  {:>4}  {:>9}  {:<11}  path", "#", "nodes", "method")?;
        for r in &self.rules {
            writeln!(
                f,
                "  {:>4}  {:>9}  {:<11}  {}{}",
                r.index,
                r.nodes,
                r.method,
                r.path,
                if r.nodes == 0 {
                    "   <- matched nothing"
                } else {
                    ""
                }
            )?;
        }
        writeln!(f, "\nFields with values no rule touched")?;
        if self.untouched_fields.is_empty() {
            writeln!(f, "  (none)")?;
        }
        for (ty, fields) in &self.untouched_fields {
            writeln!(f, "  {ty}")?;
            for fr in fields {
                writeln!(
                    f,
                    "    {:<48} {:>8} of {:>8} resources",
                    fr.field, fr.untouched, fr.resources
                )?;
            }
        }
        writeln!(
            f,
            "\nResidual PHI (input values found verbatim in the output)"
        )?;
        if self.residual_phi.is_empty() {
            writeln!(f, "  (none found)")?;
        }
        for r in &self.residual_phi {
            writeln!(
                f,
                "  {:<11} {:<24} {:<40} {:>8}",
                r.category, r.resource_type, r.field, r.occurrences
            )?;
        }
        let k = &self.risk;
        writeln!(
            f,
            "\nRe-identification risk (k-anonymity over {}; k = {}) - an indication, not a proof of safety",
            k.quasi_identifiers.join(", "),
            k.k
        )?;
        writeln!(
            f,
            "  {} patients in {} equivalence classes; smallest class {}; {} patients in classes below k",
            k.patients, k.equivalence_classes, k.smallest_class, k.patients_below_k
        )?;
        for q in &k.by_quasi_identifier {
            writeln!(
                f,
                "  without {:<10} {:>8} patients below k   ({} patients keep a value)",
                q.quasi_identifier, q.patients_below_k_without_it, q.patients_with_value
            )?;
        }
        if let Some(m) = &k.most_identifying {
            writeln!(f, "  contributes most: {m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dry(config: Json, k: usize) -> DryRun {
        let today = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let mut risk = RiskOptions::new(today);
        risk.k = k;
        DryRun::new(Engine::from_config_text(&config.to_string()).unwrap(), risk)
    }

    #[test]
    fn rules_coverage_residual_phi_and_risk() {
        let config = json!({"fhirPathRules": [
            {"path": "Resource.id", "method": "cryptoHash"},
            {"path": "Patient.name.family", "method": "redact"},
            {"path": "Patient.birthDate", "method": "redact"},
            {"path": "Patient.address.postalCode", "method": "keep"},
            {"path": "Observation.value", "method": "redact"}
        ], "parameters": {"cryptoHashKey": "k", "dateShiftKey": "d",
            "enablePartialDatesForRedact": true}});
        let mut d = dry(config, 2);
        let patient = |id: &str, given: &str, zip: &str, gender: &str| {
            json!({"resourceType": "Patient", "id": id, "gender": gender,
                "name": [{"family": "Doe", "given": [given]}], "birthDate": "1980-03-01",
                "address": [{"postalCode": zip, "city": "Springfield"}],
                "telecom": [{"system": "email", "value": "a@b.org"}]})
        };
        for (id, zip, g) in [
            ("p1", "02139", "female"),
            ("p2", "02144", "female"),
            ("p3", "90210", "male"),
        ] {
            d.add(&patient(id, "Jane", zip, g)).unwrap();
        }
        let r = d.report();
        assert_eq!(r.resources, 3);
        assert_eq!(r.rules[1].nodes, 3);
        assert_eq!(r.unmatched_rules, vec![4]);
        let pat = &r.untouched_fields["Patient"];
        let fields: Vec<&str> = pat.iter().map(|f| f.field.as_str()).collect();
        assert!(fields.contains(&"name.given"), "{fields:?}");
        assert!(fields.contains(&"telecom.value"));
        assert!(!fields.contains(&"name.family") && !fields.contains(&"id"));
        // Kept postal codes are touched (by keep), but remain PHI in the output.
        assert!(!fields.contains(&"address.postalCode"));
        let cats: BTreeSet<&str> = r.residual_phi.iter().map(|x| x.category.as_str()).collect();
        assert_eq!(cats, BTreeSet::from(["email", "name", "postalCode"]));
        assert!(
            !r.to_string().contains("Jane")
                && !serde_json::to_string(&r).unwrap().contains("a@b.org")
        );
        // birthYear 1980 for all; zip3 021 (2 female), 902 (1 male) -> one class below k=2.
        assert_eq!(r.risk.patients, 3);
        assert_eq!(r.risk.smallest_class, 1);
        assert_eq!(r.risk.patients_below_k, 1);
        assert_eq!(r.risk.equivalence_classes, 2);
        // Dropping gender or zip3 alone still leaves p3 alone... both identify it equally.
        assert!(r.risk.most_identifying.is_none());
        // Merging parts gives the whole.
        let mut a = dry(json!({"fhirPathRules": []}), 5);
        let mut b = a.clone();
        a.add(&patient("x", "A", "11111", "male")).unwrap();
        b.add(&patient("y", "B", "11111", "male")).unwrap();
        a.merge(b);
        assert_eq!(a.report().risk.smallest_class, 2);
        assert_eq!(a.report().resources, 2);
    }

    #[test]
    fn the_quasi_identifier_that_splits_classes_contributes_most() {
        let mut d = dry(json!({"fhirPathRules": []}), 2);
        for (i, g) in ["male", "female", "male", "female"].iter().enumerate() {
            d.add(
                &json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": g,
                "birthDate": "1970-01-01", "address": [{"postalCode": "12345"}]}),
            )
            .unwrap();
        }
        d.add(
            &json!({"resourceType": "Patient", "id": "odd", "gender": "male",
            "birthDate": "1950-01-01", "address": [{"postalCode": "12345"}]}),
        )
        .unwrap();
        let r = d.report().risk;
        assert_eq!(r.patients_below_k, 1);
        assert_eq!(r.most_identifying.as_deref(), Some("birthYear"));
    }
}
