//! SMART v1 and v2 scope parsing, permissions and the grant (requested ∩ registered).

use auth::{Permission, ScopeError, Scopes};

fn p(s: &str) -> Scopes {
    Scopes::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[test]
fn v1_read_write_star() {
    let s = p("system/Patient.read");
    assert!(s.can_read("Patient") && s.can_search("Patient") && s.can_export("Patient"));
    assert!(!s.can_write("Patient"));
    assert!(!s.can_read("Observation"));

    let s = p("system/*.read");
    assert!(s.can_read("Observation") && s.can_export("Group"));
    assert!(!s.can_write("Observation"));

    let s = p("system/*.write");
    assert!(s.can_write("Observation"));
    assert!(!s.can_read("Observation"));
    assert!(s.allows("Observation", Permission::Create));
    assert!(s.allows("Observation", Permission::Delete));

    let s = p("system/*.*");
    for perm in Permission::ALL {
        assert!(s.allows("Encounter", perm));
    }
}

#[test]
fn v2_letters() {
    let s = p("system/Patient.rs");
    assert!(s.can_read("Patient") && s.can_search("Patient") && s.can_export("Patient"));
    assert!(!s.allows("Patient", Permission::Create));

    let s = p("system/*.rs");
    assert_eq!(
        s.readable_types().len(),
        fhir_model::r4().resource_types().len()
    );

    let s = p("system/*.cruds");
    assert!(s.can_write("Basic") && s.can_export("Basic"));

    // `r` without `s`: instance reads, but no search and no export.
    let s = p("system/Observation.r");
    assert!(s.can_read("Observation"));
    assert!(!s.can_search("Observation"));
    assert!(!s.can_export("Observation"));
    assert_eq!(s.readable_types(), vec!["Observation".to_string()]);
    assert!(s.exportable_types().is_empty());

    let s = p("system/Observation.cu");
    assert!(s.allows("Observation", Permission::Create));
    assert!(s.allows("Observation", Permission::Update));
    assert!(!s.allows("Observation", Permission::Delete));
    assert!(!s.can_write("Observation"), "can_write needs c, u and d");
}

#[test]
fn several_tokens_combine() {
    let s = p("system/Patient.rs system/Observation.read  system/Encounter.s");
    assert_eq!(
        s.exportable_types(),
        vec!["Observation".to_string(), "Patient".to_string()]
    );
    assert!(s.can_search("Encounter") && !s.can_read("Encounter"));
}

#[test]
fn refused_scopes() {
    type Check = fn(&ScopeError) -> bool;
    let cases: &[(&str, Check)] = &[
        ("", |e| matches!(e, ScopeError::Empty)),
        ("patient/*.read", |e| {
            matches!(e, ScopeError::UnsupportedContext { .. })
        }),
        ("user/Patient.rs", |e| {
            matches!(e, ScopeError::UnsupportedContext { .. })
        }),
        ("openid", |e| {
            matches!(e, ScopeError::UnsupportedContext { .. })
        }),
        ("system/Patient", |e| {
            matches!(e, ScopeError::Malformed { .. })
        }),
        ("system/.rs", |e| matches!(e, ScopeError::Malformed { .. })),
        ("Patient.read", |e| {
            matches!(e, ScopeError::Malformed { .. })
        }),
        ("system/Patients.rs", |e| {
            matches!(e, ScopeError::UnknownResourceType { .. })
        }),
        ("system/Resource.rs", |e| {
            matches!(e, ScopeError::UnknownResourceType { .. })
        }),
        ("system/patient.rs", |e| {
            matches!(e, ScopeError::UnknownResourceType { .. })
        }),
        ("system/Patient.sr", |e| {
            matches!(e, ScopeError::UnknownAction { .. })
        }),
        ("system/Patient.rr", |e| {
            matches!(e, ScopeError::UnknownAction { .. })
        }),
        ("system/Patient.x", |e| {
            matches!(e, ScopeError::UnknownAction { .. })
        }),
        ("system/Patient.READ", |e| {
            matches!(e, ScopeError::UnknownAction { .. })
        }),
        ("system/Patient.readwrite", |e| {
            matches!(e, ScopeError::UnknownAction { .. })
        }),
        ("system/Observation.rs?category=vital-signs", |e| {
            matches!(e, ScopeError::ConstraintsUnsupported { .. })
        }),
        // One bad token spoils the whole string.
        ("system/Patient.rs system/Nope.rs", |e| {
            matches!(e, ScopeError::UnknownResourceType { .. })
        }),
    ];
    for (scope, check) in cases {
        let e = Scopes::parse(scope).expect_err(scope);
        assert!(check(&e), "{scope}: unexpected error {e:?}");
    }
}

#[test]
fn non_resource_types_are_never_allowed() {
    let s = p("system/*.cruds");
    assert!(!s.can_read("HumanName"));
    assert!(!s.can_read("NotAType"));
    // Mode `none` allows anything.
    assert!(Scopes::unrestricted().can_write("Whatever"));
}

#[test]
fn intersection_narrows_to_registration() {
    let registered = p("system/*.rs");
    assert_eq!(
        registered.intersect(&p("system/*.cruds")).render(),
        "system/*.rs"
    );
    assert_eq!(
        registered.intersect(&p("system/Patient.r")).render(),
        "system/Patient.r"
    );
    assert!(registered.intersect(&p("system/*.write")).is_empty());

    let registered = p("system/Patient.rs system/Observation.cruds");
    let granted = registered.intersect(&p("system/*.read"));
    assert_eq!(
        granted.render(),
        "system/Observation.read system/Patient.read"
    );
    assert!(granted.can_export("Observation") && !granted.can_write("Observation"));
    assert!(!granted.can_read("Encounter"));

    let granted = registered.intersect(&p("system/*.*"));
    assert_eq!(granted.render(), "system/Observation.* system/Patient.read");

    // A v1 request narrowed to something only v2 can name is rendered in v2.
    let registered = p("system/Patient.r");
    assert_eq!(
        registered.intersect(&p("system/Patient.read")).render(),
        "system/Patient.r"
    );

    // Wildcard on both sides, plus a type-specific extra.
    let registered = p("system/*.rs system/Patient.cruds");
    let granted = registered.intersect(&p("system/*.cruds"));
    assert_eq!(granted.render(), "system/*.rs system/Patient.cud");
    assert!(granted.can_write("Patient") && !granted.can_write("Observation"));

    // Nothing in common.
    assert!(
        p("system/Patient.rs")
            .intersect(&p("system/Observation.rs"))
            .is_empty()
    );
}

#[test]
fn rendering_round_trips() {
    for s in [
        "system/*.rs",
        "system/*.read",
        "system/Observation.cruds system/Patient.rs",
        "system/*.write system/Patient.read",
    ] {
        let once = p(s).render();
        assert_eq!(p(&once), p(s), "{s} → {once}");
    }
}
