//! Validation errors name the element and the reason; rows carry typed values.

use serde_json::json;
use views::{Reason, RowReason, Value, ValueKind, View};

fn err(view: serde_json::Value) -> views::ViewError {
    View::compile(&view).expect_err("the view must be refused")
}

#[test]
fn invalid_views_name_the_element_and_the_reason() {
    let e = err(json!({"resource": "Patient", "select": [{"column": [
        {"name": "id", "path": "id"}, {"name": "x", "path": "name.fooBar()"}]}]}));
    assert_eq!(e.element, "select[0].column[1].path");
    assert!(
        matches!(&e.reason, Reason::UnknownFunction { function, .. } if function == "fooBar"),
        "{e}"
    );
    assert!(e.to_string().contains("unknown function 'fooBar'"), "{e}");

    let e = err(json!({"resource": "Patient", "select": [
        {"column": [{"name": "id", "path": "id"}]},
        {"forEach": "name", "column": [{"name": "id", "path": "family"}]}]}));
    assert_eq!(e.reason, Reason::ColumnCollision("id".into()), "{e}");
    assert_eq!(e.element, "select[1].column[0]");

    let e = err(json!({"resource": "Patient", "select": [{"unionAll": [
        {"column": [{"name": "a", "path": "id", "type": "id"}]},
        {"column": [{"name": "a", "path": "id", "type": "string"}]}]}]}));
    assert!(matches!(e.reason, Reason::UnionMismatch { .. }), "{e}");
    assert_eq!(e.element, "select[0].unionAll[1]");

    let e =
        err(json!({"resource": "Patient", "select": [{"forEach": "name.where(", "column": []}]}));
    assert_eq!(e.element, "select[0].forEach");
    assert!(matches!(e.reason, Reason::InvalidPath { .. }), "{e}");

    let e = err(
        json!({"resource": "Patient", "where": [{"path": "gender = %g"}],
        "select": [{"column": [{"name": "id", "path": "id"}]}]}),
    );
    assert_eq!(e.element, "where[0].path");
    assert!(
        matches!(&e.reason, Reason::UndefinedConstant { name, .. } if name == "g"),
        "{e}"
    );

    let e = err(
        json!({"resource": "Patient", "constant": [{"name": "d", "valueDate": "12/03/1978"}],
        "select": [{"column": [{"name": "id", "path": "id"}]}]}),
    );
    assert_eq!(e.element, "constant[0].valueDate");
    assert_eq!(e.reason, Reason::ConstantInvalid("date".into()));

    let e = err(
        json!({"resource": "Patient", "constant": [{"name": "d", "valueString": "a", "valueCode": "b"}],
        "select": [{"column": [{"name": "id", "path": "id"}]}]}),
    );
    assert_eq!(e.reason, Reason::ConstantValue);

    let e =
        err(json!({"resource": "Patinet", "select": [{"column": [{"name": "id", "path": "id"}]}]}));
    assert_eq!(e.reason, Reason::UnknownResourceType("Patinet".into()));

    let e = err(json!({"resource": "Patient", "select": [{"unionALL": []}]}));
    assert_eq!(e.reason, Reason::UnknownElement("unionALL".into()));
    assert_eq!(e.element, "select[0]");

    let e = err(
        json!({"resource": "Patient", "select": [{"column": [{"name": "1st", "path": "id"}]}]}),
    );
    assert_eq!(e.reason, Reason::InvalidName("1st".into()));

    let e = err(json!({"resource": "Patient", "name": "../../etc/x",
        "select": [{"column": [{"name": "id", "path": "id"}]}]}));
    assert_eq!(e.element, "name");
    assert_eq!(e.reason, Reason::InvalidName("../../etc/x".into()));

    let e =
        err(json!({"resource": "Patient", "select": [{"forEach": "name", "repeat": ["item"]}]}));
    assert_eq!(e.reason, Reason::ConflictingIteration);

    let e = err(
        json!({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "id", "type": "strnig"}]}]}),
    );
    assert_eq!(e.element, "select[0].column[0].type");

    assert!(matches!(
        View::from_json_str("{").unwrap_err().reason,
        Reason::Json(_)
    ));
    assert_eq!(err(json!([])).reason, Reason::WrongType("an object"));
    assert_eq!(err(json!({"resource": "Patient"})).reason, Reason::Missing);
}

#[test]
fn rows_carry_typed_values_with_exact_text() {
    let view = View::compile(&json!({"resource": "Observation",
        "constant": [{"name": "loinc", "valueUri": "http://loinc.org"}],
        "where": [{"path": "code.coding.exists(system = %loinc)"}],
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()", "type": "id"},
            {"name": "patient", "path": "subject.getReferenceKey(Patient)", "type": "string"},
            {"name": "group", "path": "subject.getReferenceKey(Group)", "type": "string"},
            {"name": "value", "path": "value.ofType(Quantity).value", "type": "decimal"},
            {"name": "when", "path": "effective.ofType(dateTime)", "type": "dateTime"},
            {"name": "count", "path": "component.count()", "type": "integer"},
            {"name": "coding", "path": "code.coding.first()", "type": "Coding"},
            {"name": "codes", "path": "code.coding.code", "collection": true}]}]}))
    .unwrap();
    assert_eq!(view.columns()[3].kind(), ValueKind::Decimal);
    assert_eq!(view.columns()[6].kind(), ValueKind::Complex);
    assert_eq!(view.columns()[7].kind(), ValueKind::String);
    // Parsed from text: the decimal keeps its digits (json! would make it an f64).
    let obs: serde_json::Value = serde_json::from_str(
        r#"{"resourceType": "Observation", "id": "o1",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"},
                            {"system": "http://loinc.org", "code": "x"}]},
        "subject": {"reference": "https://example.org/fhir/Patient/p1/_history/2"},
        "effectiveDateTime": "2021-03", "valueQuantity": {"value": 120.50}}"#,
    )
    .unwrap();
    let rows = view.rows(&obs).unwrap();
    assert_eq!(
        rows,
        vec![vec![
            Value::String("o1".into()),
            Value::String("p1".into()),
            Value::Null,
            Value::Decimal("120.50".into()),
            Value::DateTime("2021-03".into()),
            Value::Integer(0),
            Value::Json(json!({"system": "http://loinc.org", "code": "8480-6"})),
            Value::Collection(vec![
                Value::String("8480-6".into()),
                Value::String("x".into())
            ]),
        ]]
    );
    let line = views::ndjson::row_object(view.columns(), &rows[0]).to_string();
    assert!(line.contains(r#""value":120.50"#), "{line}");
    // Other resource types and resources the where excludes give no rows.
    assert!(
        view.rows(&json!({"resourceType": "Patient", "id": "p1"}))
            .unwrap()
            .is_empty()
    );
    let other = json!({"resourceType": "Observation", "id": "o2", "code": {"text": "x"}});
    assert!(view.rows(&other).unwrap().is_empty());
}

#[test]
fn a_repeat_that_never_descends_ends_with_an_error() {
    let view = View::compile(&json!({"resource": "Patient", "select": [
        {"repeat": ["%resource"], "column": [{"name": "id", "path": "id"}]}]}))
    .unwrap();
    let e = view
        .rows(&json!({"resourceType": "Patient", "id": "p"}))
        .unwrap_err();
    assert_eq!(e.reason, RowReason::RepeatTooDeep(views::MAX_REPEAT_DEPTH));
    assert_eq!(e.resource.as_deref(), Some("Patient/p"));
}

#[test]
fn a_cartesian_product_beyond_the_row_limit_is_an_error_not_an_exhausted_memory() {
    // 4 sibling forEach over 40 items each: 40^4 = 2.56 M rows from one resource.
    let each = |n: &str| json!({"forEach": "name", "column": [{"name": n, "path": "family"}]});
    let view = View::compile(&json!({"resource": "Patient",
        "select": [each("a"), each("b"), each("c"), each("d")]}))
    .unwrap();
    let names: Vec<_> = (0..40)
        .map(|i| json!({"family": format!("f{i}")}))
        .collect();
    let patient = json!({"resourceType": "Patient", "id": "p", "name": names});
    let e = view.rows(&patient).unwrap_err();
    assert_eq!(
        e.reason,
        RowReason::TooManyRows(views::MAX_ROWS_PER_RESOURCE)
    );
    // Three of them (64,000 rows) are fine.
    let view = View::compile(&json!({"resource": "Patient",
        "select": [each("a"), each("b"), each("c")]}))
    .unwrap();
    assert_eq!(view.rows(&patient).unwrap().len(), 64_000);
}

#[test]
fn get_resource_key_off_a_resource_is_an_error_and_resource_names_the_resource() {
    let view = View::compile(
        &json!({"resource": "Patient", "select": [{"forEach": "name",
        "column": [{"name": "k", "path": "getResourceKey()"}]}]}),
    )
    .unwrap();
    let patient = json!({"resourceType": "Patient", "id": "p", "name": [{"family": "F"}]});
    let e = view.rows(&patient).unwrap_err();
    assert!(e.to_string().contains("%resource.getResourceKey()"), "{e}");
    let view = View::compile(
        &json!({"resource": "Patient", "select": [{"forEach": "name",
        "column": [{"name": "k", "path": "%resource.getResourceKey()"}]}]}),
    )
    .unwrap();
    assert_eq!(
        view.rows(&patient).unwrap(),
        vec![vec![Value::String("p".into())]]
    );
}

#[test]
fn a_union_column_takes_the_type_any_branch_declares() {
    let view = View::compile(&json!({"resource": "Patient", "select": [{"unionAll": [
        {"column": [{"name": "d", "path": "birthDate"}]},
        {"column": [{"name": "d", "path": "birthDate", "type": "date"}]}]}]}))
    .unwrap();
    assert_eq!(view.columns()[0].ty.as_deref(), Some("date"));
    assert_eq!(view.columns()[0].kind(), ValueKind::Date);
}

/// `forEach` over every name of the resource, nested `depth` deep: `names ^ depth` rows.
fn nested_for_each(depth: usize) -> View {
    let mut select = serde_json::Value::Null;
    for level in (0..depth).rev() {
        let mut s = json!({"forEach": "%resource.name",
            "column": [{"name": format!("c{level}"), "path": "family"}]});
        if !select.is_null() {
            s["select"] = json!([select]);
        }
        select = s;
    }
    View::compile(&json!({"resource": "Patient", "select": [select]})).unwrap()
}

#[test]
fn nested_for_each_rows_are_generated_not_held() {
    let names: Vec<_> = (0..100)
        .map(|i| json!({"family": format!("f{i}")}))
        .collect();
    let patient = json!({"resourceType": "Patient", "id": "p", "name": names});
    // Three levels over 100 names: 1,000,000 rows (the bound), each made on its own.
    let (mut n, mut last) = (0usize, Vec::new());
    let count = nested_for_each(3)
        .for_each_row(&patient, |row| -> Result<(), ()> {
            n += 1;
            last = row.to_vec();
            Ok(())
        })
        .unwrap();
    assert_eq!((count, n), (1_000_000, 1_000_000));
    let f99 = Value::String("f99".into());
    assert_eq!(last, vec![f99.clone(), f99.clone(), f99]);
    // One level more is beyond the bound: an error, and no row before it.
    let mut handed = 0;
    let e = nested_for_each(4)
        .for_each_row(&patient, |_| -> Result<(), ()> {
            handed += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(&e, views::EachRowError::Row(r) if r.reason == RowReason::TooManyRows(views::MAX_ROWS_PER_RESOURCE)),
        "{e:?}"
    );
    assert_eq!(handed, 0);
    // The sink's own error ends the walk at once.
    let mut seen = 0;
    let e = nested_for_each(3)
        .for_each_row(&patient, |_| {
            seen += 1;
            if seen == 5 { Err("full") } else { Ok(()) }
        })
        .unwrap_err();
    assert!(matches!(e, views::EachRowError::Sink("full")));
    assert_eq!(seen, 5);
}
