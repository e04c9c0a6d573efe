//! The CapabilityStatement: generated from the model and from what this server implements,
//! nothing more.

use fhir_model::SearchParamType;
use serde_json::{Value, json};

use crate::AppState;

/// The `$export` kick-off parameters and preferences this server supports (the operations'
/// `documentation`).
const EXPORT_PARAMETERS: &str = "Kick-off parameters (GET query or POST Parameters): _outputFormat, _since, _until (_till), _type, _typeFilter, _elements, patient (POST), includeAssociatedData, _container, _compression, _anonymizationConfig, _anonymizationConfigEtag, _anonymizationConfigCollectionReference, _anonymizationKeySet, _anonymizationDryRun, allowPartialManifests (true|false), organizeOutputBy (Patient; Patient and Group level). Prefer: respond-async, handling=lenient, separate-export-status.";

/// Search parameter types the search crate answers (composite and special are refused).
fn supported(kind: SearchParamType) -> bool {
    !matches!(kind, SearchParamType::Composite | SearchParamType::Special)
}

pub fn capability_statement(state: &AppState) -> Value {
    let model = fhir_model::r4();
    let resources: Vec<Value> = model
        .resource_types()
        .iter()
        .map(|t| {
            let params: Vec<Value> = model
                .search_params(t)
                .into_iter()
                .filter(|p| supported(p.kind))
                .map(|p| json!({"name": p.code, "definition": p.url, "type": p.kind.as_str()}))
                .collect();
            let mut r = json!({
                "type": t,
                "interaction": [
                    {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
                    {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"},
                    {"code": "search-type"}
                ],
                "versioning": "versioned",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchInclude": ["*"],
                "searchRevInclude": ["*"],
                "searchParam": params,
            });
            if t == "Patient" || t == "Group" {
                r["operation"] = json!([{"name": "export", "definition": if t == "Patient" {
                    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
                } else {
                    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
                }, "documentation": EXPORT_PARAMETERS}]);
            }
            r
        })
        .collect();
    let mut resources = resources;
    resources.push(crate::view_routes::capability_resource());
    let mut operations = vec![
        json!({"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export", "documentation": EXPORT_PARAMETERS}),
        // Azure FHIR service's `$import` (its OperationDefinition's canonical URL).
        json!({"name": "import", "definition": "http://azurehealthcareapis.com/data-extensions/OperationDefinition/import"}),
    ];
    operations.extend(
        crate::view_routes::capability_operations()
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    let mut rest = json!({
        "mode": "server",
        "resource": resources,
        "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
        "operation": operations,
    });
    if let Some(security) = state.auth.capability_security() {
        rest["security"] = security;
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "Fhirhose", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Fhirhose FHIR R4 server", "url": state.base_url.as_ref()},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [rest],
    })
}
