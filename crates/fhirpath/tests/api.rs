//! The public API as the de-identification engine and the CLI use it: node locations, focus,
//! variables, custom functions, resolve().

use fhirpath::{
    EvalContext, EvalError, Expression, FunctionRegistry, Item, NodePath, Segment, SystemValue,
};
use serde_json::{Value, json};

fn bundle() -> Value {
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:p1", "resource": {
                "resourceType": "Patient", "id": "p1",
                "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"],
                          "_given": [null, {"extension": [{"url": "http://x/nick", "valueString": "Jim"}]}]}],
                "birthDate": "1974-12-25",
                "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                              "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
                "contained": [{"resourceType": "Practitioner", "id": "doc",
                               "name": [{"family": "Careful"}]}],
                "generalPractitioner": [{"reference": "#doc"}]
            }},
            {"fullUrl": "urn:uuid:o1", "resource": {
                "resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": "Patient/p1"},
                "valueQuantity": {}
            }}
        ]
    });
    // Parsed from text so that the decimal keeps its written scale.
    b["entry"][1]["resource"]["valueQuantity"] = serde_json::from_str(
        r#"{"value": 120.50, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}"#,
    )
    .unwrap();
    b
}

fn paths(items: &[Item<'_>]) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            i.path()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into())
        })
        .collect()
}

fn eval<'a>(src: &str, ctx: &EvalContext<'a>) -> Vec<Item<'a>> {
    Expression::compile_with(src, &FunctionRegistry::with_anonymizer_functions())
        .unwrap()
        .evaluate(ctx)
        .unwrap()
}

#[test]
fn choice_elements_carry_their_real_key() {
    let b = bundle();
    let ctx = EvalContext::new(&b);
    let out = eval("Bundle.entry.resource.ofType(Observation).value", &ctx);
    assert_eq!(paths(&out), ["entry[1].resource.valueQuantity"]);
    assert_eq!(out[0].type_name(), "Quantity");
    assert_eq!(out[0].as_json()["value"].to_string(), "120.50");
    let q = eval(
        "(Bundle.entry.resource.ofType(Observation).value as Quantity).value > 100",
        &ctx,
    );
    assert!(matches!(q[0].to_system(), Some(SystemValue::Boolean(true))));
}

#[test]
fn primitive_and_shadow_are_one_node() {
    let b = bundle();
    let ctx = EvalContext::new(&b);
    let given = eval("Bundle.entry[0].resource.name.given", &ctx);
    assert_eq!(
        paths(&given),
        [
            "entry[0].resource.name[0].given[0]",
            "entry[0].resource.name[0].given[1]"
        ]
    );
    let n = given[1].as_node().unwrap();
    assert!(n.shadow().is_some());
    assert_eq!(
        n.shadow_path().unwrap().to_string(),
        "entry[0].resource.name[0]._given[1]"
    );
    let ext = eval(
        "Bundle.entry[0].resource.birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').value",
        &ctx,
    );
    assert_eq!(
        paths(&ext),
        ["entry[0].resource._birthDate.extension[0].valueDateTime"]
    );
    assert_eq!(ext[0].type_name(), "dateTime");
}

#[test]
fn computed_values_have_no_path() {
    let b = bundle();
    let out = eval(
        "Bundle.entry[0].resource.name.family.upper()",
        &EvalContext::new(&b),
    );
    assert_eq!(out[0].path(), None);
    assert_eq!(out[0].as_json(), json!("CHALMERS"));
}

#[test]
fn nodes_by_type_includes_focus_and_skips_subresources() {
    let b = bundle();
    let ctx = EvalContext::new(&b);
    // From the Bundle: the entry resources are sub-resources, so nothing below them is found.
    assert!(eval("nodesByType('HumanName')", &ctx).is_empty());
    let p = NodePath::parse("entry[0].resource").unwrap();
    let ctx = EvalContext::new(&b).with_focus_path(&p).unwrap();
    // From the Patient: its own names, not the contained Practitioner's.
    assert_eq!(
        paths(&eval("nodesByType('HumanName')", &ctx)),
        ["entry[0].resource.name[0]"]
    );
    assert_eq!(
        paths(&eval("nodesByType('date')", &ctx)),
        ["entry[0].resource.birthDate"]
    );
    assert_eq!(
        eval("nodesByName('given').count()", &ctx)[0].as_json(),
        json!(2)
    );
    assert_eq!(
        paths(&eval("nodesByType('Patient')", &ctx)),
        ["entry[0].resource"]
    );
}

#[test]
fn focus_on_a_selected_node() {
    let b = bundle();
    let p = NodePath(vec![
        Segment::Key("entry".into()),
        Segment::Index(1),
        Segment::Key("resource".into()),
        Segment::Key("valueQuantity".into()),
        Segment::Key("value".into()),
    ]);
    let ctx = EvalContext::new(&b).with_focus_path(&p).unwrap();
    let cond = Expression::compile("$this > 100 and %resource.status = 'final'").unwrap();
    assert_eq!(cond.evaluate_bool(&ctx).unwrap(), Some(true));
    let q = NodePath::parse("entry[1].resource.valueQuantity").unwrap();
    let ctx = EvalContext::new(&b)
        .with_focus_path_typed(&q, "Age")
        .unwrap();
    assert_eq!(
        eval("$this is Age and $this is Quantity", &ctx)[0].as_json(),
        json!(true)
    );
    assert!(matches!(
        EvalContext::new(&b).with_focus_path(&NodePath::parse("entry[7]").unwrap()),
        Err(EvalError::NoSuchNode(_))
    ));
}

#[test]
fn variables_and_now() {
    let b = bundle();
    let limit = json!(100);
    let now = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05+01:00").unwrap();
    let ctx = EvalContext::new(&b)
        .with_json_variable("limit", [&limit])
        .with_now(now);
    let out = eval(
        "Bundle.entry.resource.ofType(Observation).value.value > %limit",
        &ctx,
    );
    assert_eq!(out[0].as_json(), json!(true));
    assert_eq!(eval("today()", &ctx)[0].as_json(), json!("2026-01-02"));
    assert!(
        Expression::compile("%undefined")
            .unwrap()
            .evaluate(&ctx)
            .is_err()
    );
}

#[test]
fn resolve_within_resource_and_bundle() {
    let b = bundle();
    let ctx = EvalContext::new(&b);
    let subj = eval("Bundle.entry[1].resource.subject.resolve()", &ctx);
    assert_eq!(paths(&subj), ["entry[0].resource"]);
    let p = NodePath::parse("entry[0].resource").unwrap();
    let ctx = EvalContext::new(&b).with_focus_path(&p).unwrap();
    let gp = eval("generalPractitioner.resolve().name.family", &ctx);
    assert_eq!(gp[0].as_json(), json!("Careful"));
}

#[test]
fn custom_functions_and_errors() {
    let mut reg = FunctionRegistry::new();
    reg.register("double", 0, 0, |focus, _args| {
        Ok(focus
            .iter()
            .filter_map(|i| match i.to_system() {
                Some(SystemValue::Integer(n)) => {
                    Some(Item::from_value(SystemValue::Integer(n * 2)))
                }
                _ => None,
            })
            .collect())
    });
    let e = Expression::compile_with("(1 | 2).double()", &reg).unwrap();
    let v = json!({});
    let out = e.evaluate(&EvalContext::new(&v)).unwrap();
    assert_eq!(
        out.iter().map(Item::as_json).collect::<Vec<_>>(),
        [json!(2), json!(4)]
    );
    let err = Expression::compile("Patient.name.where(").unwrap_err();
    assert_eq!(err.position, 19);
    assert!(
        Expression::compile("nodesByType('X')").is_err(),
        "not registered by default"
    );
    let unsupported = Expression::compile("Patient.gender.memberOf('http://x')").unwrap();
    let p = json!({"resourceType": "Patient", "gender": "male"});
    assert!(matches!(
        unsupported.evaluate(&EvalContext::new(&p)),
        Err(EvalError::Unsupported(_))
    ));
}

#[test]
fn equality_equivalence_and_dates() {
    let v = json!({"resourceType": "Patient", "birthDate": "1974-12"});
    let ctx = EvalContext::new(&v);
    assert!(
        eval("birthDate = @1974-12-25", &ctx).is_empty(),
        "different precision: empty"
    );
    assert_eq!(eval("birthDate < @1975", &ctx)[0].as_json(), json!(true));
    assert_eq!(eval("'Abc  d' ~ 'abc  D'", &ctx)[0].as_json(), json!(true));
    assert_eq!(eval("1.0 = 1", &ctx)[0].as_json(), json!(true));
    assert_eq!(eval("1 'g' = 1000 'mg'", &ctx)[0].as_json(), json!(true));
    assert_eq!(eval("{} and false", &ctx)[0].as_json(), json!(false));
    assert!(eval("{} and true", &ctx).is_empty());
}

#[test]
fn descendants_of_type_matches_the_unfused_form() {
    let b = bundle();
    let ctx = EvalContext::new(&b);
    for t in ["Reference", "HumanName", "string", "Quantity", "Resource"] {
        let fused = eval(&format!("descendants().ofType({t})"), &ctx);
        let plain = eval(&format!("descendants().where($this is {t})"), &ctx);
        assert_eq!(paths(&fused), paths(&plain), "{t}");
    }
}

#[test]
fn every_r4_search_parameter_expression_compiles_and_runs() {
    let model = fhir_model::r4();
    let b = bundle();
    let mut count = 0;
    for rt in model.resource_types() {
        for sp in model.search_params(rt) {
            let Some(src) = &sp.expression else { continue };
            let e = Expression::compile(src)
                .unwrap_or_else(|err| panic!("{rt}.{}: {src}: {err}", sp.code));
            // Type errors are possible on odd data; on this bundle and its entries every expression
            // must run.
            e.evaluate(&EvalContext::new(&b))
                .unwrap_or_else(|err| panic!("{rt}.{}: {src}: {err}", sp.code));
            for entry in ["entry[0].resource", "entry[1].resource"] {
                let ctx = EvalContext::new(&b)
                    .with_focus_path(&NodePath::parse(entry).unwrap())
                    .unwrap();
                e.evaluate(&ctx)
                    .unwrap_or_else(|err| panic!("{rt}.{}: {src}: {err}", sp.code));
            }
            count += 1;
        }
    }
    assert!(count > 1000, "{count}");
}
