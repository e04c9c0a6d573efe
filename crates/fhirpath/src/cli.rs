//! The text behind `fhirhose fhirpath 'EXPR' FILE.json`: kept here so the binary stays a thin shell.

use thiserror::Error;

use crate::{EvalContext, EvalError, Expression, FunctionRegistry, Item, ParseError};

#[derive(Debug, Error)]
pub enum CliError {
    #[error("invalid JSON input: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("evaluation failed: {0}")]
    Eval(#[from] EvalError),
}

/// Evaluates `expr` (with the anonymizer functions available) over the resource in `json_text`.
/// Human form: one line per item, `TYPE PATH VALUE`; `as_json`: the values as one JSON array.
pub fn run(expr: &str, json_text: &str, as_json: bool) -> Result<String, CliError> {
    let expression =
        Expression::compile_with(expr, &FunctionRegistry::with_anonymizer_functions())?;
    let doc: serde_json::Value = serde_json::from_str(json_text)?;
    let items = expression.evaluate(&EvalContext::new(&doc))?;
    Ok(render(&items, as_json))
}

/// Renders a result collection the way [`run`] does.
pub fn render(items: &[Item<'_>], as_json: bool) -> String {
    if as_json {
        let arr: Vec<serde_json::Value> = items.iter().map(Item::as_json).collect();
        return serde_json::Value::Array(arr).to_string() + "\n";
    }
    let mut out = String::new();
    for item in items {
        let ty = format!("{}.{}", item.namespace(), item.type_name());
        let path = match item.path() {
            Some(p) if p.segments().is_empty() => "(root)".to_string(),
            Some(p) => p.to_string(),
            None => "(computed)".to_string(),
        };
        out.push_str(&format!("{ty}\t{path}\t{}\n", item.as_json()));
    }
    if items.is_empty() {
        out.push_str("(empty)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_types_and_paths() {
        let doc = r#"{"resourceType":"Patient","name":[{"family":"Chalmers","given":["Peter","James"]}]}"#;
        let text = run("Patient.name.given", doc, false).unwrap();
        assert_eq!(
            text,
            "FHIR.string\tname[0].given[0]\t\"Peter\"\nFHIR.string\tname[0].given[1]\t\"James\"\n"
        );
        assert_eq!(
            run("Patient.name.given.count()", doc, true).unwrap(),
            "[2]\n"
        );
        assert!(matches!(
            run("Patient.name.(", doc, false),
            Err(CliError::Parse(_))
        ));
        assert!(matches!(
            run(
                "Patient.name.single()",
                r#"{"resourceType":"Patient","name":[{},{}]}"#,
                false
            ),
            Err(CliError::Eval(_))
        ));
    }
}
