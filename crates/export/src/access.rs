//! Who may start, see and use an export: decided here, on the parsed [`ExportRequest`], for the
//! kick-off and again for every status poll, file download and cancel (Bulk Data 2.0: status
//! and files SHALL be protected like the kick-off). The HTTP layer only says what the caller's
//! current token grants, through [`ExportAccess`]; this crate knows no HTTP.

use crate::request::{ExportLevel, ExportRequest};

/// The two permissions an export needs (SMART `r` and `s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Search,
    /// `c` (v1 `write`): `$import` creates resources.
    Create,
    /// `u` (v1 `write`): `$import` updates resources.
    Update,
}

/// What the caller may do: the server's view of the access token of the current request.
pub trait ExportAccess: Send + Sync {
    /// The client a new job is recorded for (`None` without authentication).
    fn client_id(&self) -> Option<&str>;
    /// Whether the caller may see a job that `owner` started.
    fn owns(&self, owner: Option<&str>) -> bool;
    /// Whether everything is allowed (no authorization configured).
    fn is_unrestricted(&self) -> bool;
    /// Whether the granted scopes allow `permission` on `resource_type`.
    fn allows(&self, resource_type: &str, permission: Permission) -> bool;
    /// Whether the caller may use the stored de-identification key set `name`
    /// (`_anonymizationKeySet`).
    fn may_use_key_set(&self, name: &str) -> bool;
    /// The kind of job the caller's route serves (`/export-status/…` an export,
    /// `/import-status/…` an import): a job of the other kind is unknown there (404). `None`:
    /// any job (tools, tests).
    fn job_kind(&self) -> Option<JobKind> {
        None
    }
}

/// An export or an `$import`: both are jobs of one queue, each with routes of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Export,
    Import,
}

/// No authorization: every job and every type (servers without authentication, tools, tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unrestricted;

impl ExportAccess for Unrestricted {
    fn client_id(&self) -> Option<&str> {
        None
    }
    fn owns(&self, _owner: Option<&str>) -> bool {
        true
    }
    fn is_unrestricted(&self) -> bool {
        true
    }
    fn allows(&self, _resource_type: &str, _permission: Permission) -> bool {
        true
    }
    fn may_use_key_set(&self, _name: &str) -> bool {
        true
    }
}

/// Exporting a type reads its whole population: `r` and `s`.
fn may_export(access: &dyn ExportAccess, resource_type: &str) -> bool {
    access.allows(resource_type, Permission::Read)
        && access.allows(resource_type, Permission::Search)
}

/// The types a kick-off without `_type` covers for this caller: every R4 type it may export.
/// `None` when everything is allowed (the export then covers every type present).
pub fn exportable_types(access: &dyn ExportAccess) -> Option<Vec<String>> {
    if access.is_unrestricted() {
        return None;
    }
    Some(
        fhir_model::r4()
            .resource_types()
            .iter()
            .filter(|t| may_export(access, t))
            .cloned()
            .collect(),
    )
}

/// Checks that `access` grants everything `req` needs: `r`+`s` on every type the export may
/// contain (its `_type` list, or every type of its level without one), on Provenance for
/// `includeAssociatedData`, on Patient below system level, `r` on Group at Group level, and
/// the key set of a de-identified export that names one (granted per client: whoever may use a
/// key set and read the raw data can pair the two exports and re-identify that key set's
/// releases). The error names every missing permission.
pub fn authorize(req: &ExportRequest, access: &dyn ExportAccess) -> Result<(), String> {
    if access.is_unrestricted() {
        return Ok(());
    }
    let mut export: Vec<String> = if req.types.is_empty() {
        let all = fhir_model::r4().resource_types().to_vec();
        req.effective_types(&all)
    } else {
        req.types.clone()
    };
    if req.level != ExportLevel::System {
        export.push("Patient".into());
    }
    if req.associated.is_some() {
        export.push("Provenance".into());
    }
    let mut missing: Vec<String> = Vec::new();
    for t in export {
        if !may_export(access, &t) && !missing.contains(&t) {
            missing.push(t);
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!(
            "exporting {} (export needs `r` and `s` on each type)",
            missing.join(", ")
        ));
    }
    if matches!(req.level, ExportLevel::Group(_)) && !access.allows("Group", Permission::Read) {
        problems.push("`r` on Group (a Group-level export reads its Group)".into());
    }
    if let Some(name) = req
        .anonymization
        .as_ref()
        .and_then(|a| a.key_set.as_deref())
        && !access.may_use_key_set(name)
    {
        problems.push(format!(
            "the key set `{name}` (not granted to this client: `key_sets` in the clients file)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the granted scopes do not allow {}",
            problems.join("; nor ")
        ))
    }
}

/// Whether `access` may import resources of `types` (`$import` writes each: it needs `c` and
/// `u` on every type, v1 `write`), with the reason when not.
pub fn authorize_import(types: &[String], access: &dyn ExportAccess) -> Result<(), String> {
    if access.is_unrestricted() {
        return Ok(());
    }
    let missing: Vec<&str> = types
        .iter()
        .filter(|t| !(access.allows(t, Permission::Create) && access.allows(t, Permission::Update)))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the granted scopes do not allow importing {} (import needs `c` and `u` on each type, or v1 `write`)",
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grants `r`+`s` on the listed types, `r` only on the `read` ones.
    struct Grants {
        rs: &'static [&'static str],
        read: &'static [&'static str],
    }

    impl ExportAccess for Grants {
        fn client_id(&self) -> Option<&str> {
            Some("c")
        }
        fn owns(&self, owner: Option<&str>) -> bool {
            owner == Some("c")
        }
        fn is_unrestricted(&self) -> bool {
            false
        }
        fn allows(&self, t: &str, p: Permission) -> bool {
            self.rs.contains(&t) || (p == Permission::Read && self.read.contains(&t))
        }
        fn may_use_key_set(&self, name: &str) -> bool {
            name == "granted"
        }
    }

    fn request(level: ExportLevel, query: &[(&str, &str)]) -> ExportRequest {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        ExportRequest::parse(
            level,
            &pairs,
            false,
            false,
            2_000_000_000_000,
            String::new(),
        )
        .unwrap()
    }

    #[test]
    fn needs_follow_the_parsed_request() {
        let patient_obs = Grants {
            rs: &["Patient", "Observation"],
            read: &[],
        };
        let sys = |q: &[(&str, &str)]| request(ExportLevel::System, q);
        assert!(authorize(&sys(&[("_type", "Patient,Observation")]), &patient_obs).is_ok());
        let e = authorize(&sys(&[("_type", "Patient,Encounter")]), &patient_obs).unwrap_err();
        assert!(e.contains("Encounter") && !e.contains("Patient"), "{e}");
        // Without `_type` the export may contain every type.
        assert!(authorize(&sys(&[]), &patient_obs).is_err());
        assert!(authorize(&sys(&[]), &Unrestricted).is_ok());
        let e = authorize(
            &sys(&[
                ("_type", "Patient"),
                ("includeAssociatedData", "LatestProvenanceResources"),
            ]),
            &patient_obs,
        )
        .unwrap_err();
        assert!(e.contains("Provenance"), "{e}");
        let obs_only = Grants {
            rs: &["Observation"],
            read: &["Group"],
        };
        let e = authorize(
            &request(ExportLevel::Patient, &[("_type", "Observation")]),
            &obs_only,
        )
        .unwrap_err();
        assert!(e.contains("Patient"), "{e}");
        let group = request(ExportLevel::Group("g".into()), &[("_type", "Patient")]);
        let e = authorize(&group, &patient_obs).unwrap_err();
        assert!(e.contains("Group"), "{e}");
        let with_group = Grants {
            rs: &["Patient"],
            read: &["Group"],
        };
        assert!(authorize(&group, &with_group).is_ok());
        assert_eq!(
            exportable_types(&patient_obs).unwrap(),
            ["Observation", "Patient"]
        );
        assert_eq!(exportable_types(&Unrestricted), None);
        // A key set is checked like a type: granted per client.
        let deid = |set: &str| {
            sys(&[
                ("_type", "Patient"),
                ("_container", "deid"),
                ("_anonymizationConfig", "c.json"),
                ("_anonymizationKeySet", set),
            ])
        };
        assert!(authorize(&deid("granted"), &patient_obs).is_ok());
        let e = authorize(&deid("another"), &patient_obs).unwrap_err();
        assert!(e.contains("key set `another`"), "{e}");
        assert!(authorize(&deid("another"), &Unrestricted).is_ok());
    }
}
