//! Property tests (fuzzing) of FHIRPath compile + evaluate: no input panics, overflows the stack
//! or runs without bound. Inputs are grammar-aware (expressions built from the FHIRPath grammar
//! with the real function names), hostile shapes (deep nesting, long chains, huge repetition
//! counts and numbers, long strings) and mutations of the HL7 suite's expressions.
//!
//! `PROPTEST_CASES` sets the cases per property, `FUZZ_SCALE` multiplies the small defaults
//! below (CI runs them as they are; the long run is `scripts/fuzz-long.sh`). Failures are not persisted: a failing case is printed, minimized, and
//! becomes a named regression test.

use fhirpath::{EvalContext, Expression, FunctionRegistry};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            // `FUZZ_SCALE` multiplies every property's own default (scripts/fuzz-long.sh).
            let scale: u32 = std::env::var("FUZZ_SCALE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            default_cases.saturating_mul(scale)
        });
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

fn resource(name: &str) -> Value {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/resources/r4");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

thread_local! {
    static PATIENT: &'static Value = Box::leak(Box::new(resource("patient-example.json")));
    static OBSERVATION: &'static Value = Box::leak(Box::new(resource("observation-example.json")));
}

const FUNCTIONS: &[(&str, usize)] = &[
    ("empty", 0),
    ("exists", 1),
    ("all", 1),
    ("allTrue", 0),
    ("subsetOf", 1),
    ("count", 0),
    ("distinct", 0),
    ("isDistinct", 0),
    ("where", 1),
    ("select", 1),
    ("repeat", 1),
    ("ofType", 1),
    ("single", 0),
    ("first", 0),
    ("last", 0),
    ("tail", 0),
    ("skip", 1),
    ("take", 1),
    ("intersect", 1),
    ("exclude", 1),
    ("union", 1),
    ("combine", 1),
    ("iif", 3),
    ("iif", 2),
    ("toBoolean", 0),
    ("toInteger", 0),
    ("toDate", 0),
    ("toDateTime", 0),
    ("toDecimal", 0),
    ("toQuantity", 1),
    ("toString", 0),
    ("toTime", 0),
    ("indexOf", 1),
    ("substring", 2),
    ("substring", 1),
    ("startsWith", 1),
    ("contains", 1),
    ("upper", 0),
    ("replace", 2),
    ("matches", 1),
    ("replaceMatches", 2),
    ("length", 0),
    ("toChars", 0),
    ("trim", 0),
    ("split", 1),
    ("join", 1),
    ("encode", 1),
    ("decode", 1),
    ("escape", 1),
    ("unescape", 1),
    ("abs", 0),
    ("ceiling", 0),
    ("exp", 0),
    ("ln", 0),
    ("log", 1),
    ("power", 1),
    ("round", 1),
    ("sqrt", 0),
    ("truncate", 0),
    ("children", 0),
    ("descendants", 0),
    ("trace", 1),
    ("aggregate", 2),
    ("sum", 0),
    ("min", 0),
    ("avg", 0),
    ("is", 1),
    ("as", 1),
    ("type", 0),
    ("not", 0),
    ("extension", 1),
    ("hasValue", 0),
    ("getValue", 0),
    ("resolve", 0),
    ("sort", 1),
    ("precision", 0),
    ("lowBoundary", 1),
    ("highBoundary", 0),
    ("comparable", 1),
    ("yearOf", 0),
    ("dateOf", 0),
    ("slice", 2),
    ("lastIndexOf", 1),
    ("nodesByType", 1),
    ("nodesByName", 1),
];

const NAMES: &[&str] = &[
    "Patient",
    "Observation",
    "name",
    "given",
    "family",
    "telecom",
    "value",
    "birthDate",
    "extension",
    "url",
    "code",
    "coding",
    "system",
    "id",
    "meta",
    "contained",
    "valueQuantity",
    "component",
    "Integer",
    "String",
    "HumanName",
    "FHIR.Patient",
    "System.Integer",
    "`div`",
    "`a b`",
    "and",
    "is",
];

const BINOPS: &[&str] = &[
    "*", "/", "div", "mod", "+", "-", "&", "|", "<", "<=", ">", ">=", "=", "~", "!=", "!~", "in",
    "contains", "and", "or", "xor", "implies",
];

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        (0u32..50).prop_map(|n| "9".repeat(n as usize + 1)),
        (any::<i32>(), 0u32..40).prop_map(|(i, d)| format!("{i}.{}", "7".repeat(d as usize + 1))),
        "[a-zA-Z0-9 \\\\'ü%{}.-]{0,12}".prop_map(|s| format!("'{}'", s.replace('\'', "\\'"))),
        Just("'\\u00e9\\t\\\\'".to_string()),
        Just("true".to_string()),
        Just("{}".to_string()),
        "@[0-9]{1,4}(-[0-9]{1,2}(-[0-9]{1,2}(T[0-9]{1,2}(:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,9})?)?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
            .prop_map(|s| s),
        "@T[0-9]{1,2}(:[0-9]{2}(:[0-9]{2}(\\.[0-9]{1,4})?)?)?".prop_map(|s| s),
        (any::<i32>(), prop::sample::select(&["'mg'", "days", "'wk'", "year", "'1/(mm[Hg].{s})'", "''"][..]))
            .prop_map(|(v, u)| format!("{v} {u}")),
        "[0-9]{1,20}L".prop_map(|s| s),
    ]
}

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => literal(),
        3 => prop::sample::select(NAMES).prop_map(str::to_string),
        1 => prop::sample::select(&["$this", "$index", "$total", "%resource", "%context", "%rootResource", "%ucum", "%`vs-x`", "%undefined"][..])
            .prop_map(str::to_string),
    ]
}

/// Expressions from the FHIRPath grammar, with the real function names and arities.
fn expression() -> impl Strategy<Value = String> {
    leaf().prop_recursive(6, 48, 3, |inner| {
        prop_oneof![
            (inner.clone(), prop::sample::select(BINOPS), inner.clone())
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            inner.clone().prop_map(|a| format!("({a})")),
            inner.clone().prop_map(|a| format!("-{a}")),
            (inner.clone(), prop::sample::select(NAMES)).prop_map(|(a, n)| format!("{a}.{n}")),
            (
                prop::option::of(inner.clone()),
                prop::sample::select(FUNCTIONS),
                prop::collection::vec(inner.clone(), 3)
            )
                .prop_map(|(base, (f, n), args)| {
                    let call = format!("{f}({})", args[..n].join(", "));
                    match base {
                        Some(b) => format!("{b}.{call}"),
                        None => call,
                    }
                }),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("{a}[{i}]")),
            (
                inner.clone(),
                prop::sample::select(&["is", "as"][..]),
                prop::sample::select(NAMES)
            )
                .prop_map(|(a, k, t)| format!("{a} {k} {t}")),
        ]
    })
}

/// Shapes built to exhaust a parser or evaluator: `n` copies of a piece around a core.
fn hostile() -> impl Strategy<Value = String> {
    let n = prop_oneof![0usize..8, 90usize..110, 290usize..310, 1000usize..20_000];
    (
        n,
        prop::sample::select(
            &[
                ("(", "1", ")"),
                ("", "1", " + 1"),
                ("", "1", " is Integer"),
                ("", "1", " as Integer"),
                ("", "Patient", ".name"),
                ("-", "1", ""),
                ("+", "1", ""),
                ("", "name", "[0]"),
                ("where(", "true", ")"),
                ("", "1", ".repeat($this)"),
                ("", "'a'", ".select($this & $this)"),
                ("", "%resource", ".descendants()"),
                (
                    "",
                    "%resource.descendants()",
                    ".select(%resource.descendants())",
                ),
                ("{", "", "}"),
                ("", "'", "\\"),
                ("", "@2020", "-01"),
                ("[", "1", ""),
                ("", "1", ".combine($this)"),
                ("iif(true, ", "1", ")"),
                ("", "'x'", ".replace('', 'xx')"),
                ("", "9", "9"),
                ("", "1", " 'mg'"),
                ("", "(1|2|3)", ".select($this | (1|2|3))"),
                ("", "{} ", "| {}"),
                ("", "%`", "a"),
                ("", "/*", "*/"),
                ("", "//", "\n1"),
            ][..],
        ),
    )
        .prop_map(|(n, (open, core, close))| {
            let mut s = open.repeat(n);
            s.push_str(core);
            s.push_str(&close.repeat(n));
            s
        })
}

/// Expressions of the HL7 FHIRPath suite, mutated.
fn suite_expressions() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let text = std::fs::read_to_string(dir.join("cases/fhir-r4.yaml")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("expression:") {
            let e = rest.trim().trim_matches('"').trim_matches('\'');
            if !e.is_empty() {
                out.push(e.to_string());
            }
        }
    }
    assert!(out.len() > 500, "{}", out.len());
    out
}

fn mutated_suite() -> impl Strategy<Value = String> {
    let exprs = suite_expressions();
    (
        prop::sample::select(exprs),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0u8..5,
                "[().,\\[\\]'`@%$ a-z0-9|&*/+-]{1,3}",
            ),
            1..4,
        ),
    )
        .prop_map(|(mut e, edits)| {
            for (at, kind, piece) in edits {
                let cuts: Vec<usize> = e.char_indices().map(|(i, _)| i).chain([e.len()]).collect();
                let i = cuts[at.index(cuts.len())];
                match kind {
                    0 => e.insert_str(i, &piece),
                    1 => {
                        let end = cuts.iter().copied().find(|&c| c > i).unwrap_or(i);
                        e.replace_range(i..end, "");
                    }
                    2 => {
                        // Repeat the tail from here: deeper nesting, longer chains.
                        let tail = e[i..].to_string();
                        e.push_str(&tail.repeat(3));
                    }
                    3 => e = format!("{}.{}", &e[..i], &e[i..]),
                    _ => e.truncate(i),
                }
            }
            e
        })
}

/// Compiles (with the anonymizer's functions) and, when it compiles, evaluates against a Patient
/// and an Observation. Errors are fine; a panic, a stack overflow or a hang fails the test.
fn check(src: &str) {
    let registry = FunctionRegistry::with_anonymizer_functions();
    let Ok(expr) = Expression::compile_with(src, &registry) else {
        return;
    };
    for r in [PATIENT.with(|p| *p), OBSERVATION.with(|o| *o)] {
        let now = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09+02:00").unwrap();
        let ctx = EvalContext::new(r).with_now(now);
        let _ = expr.evaluate(&ctx);
        let _ = expr.evaluate_bool(&ctx);
    }
}

/// What an expression gives, as text (results or error), for comparing two spellings.
fn outcome(src: &str, r: &Value) -> Option<String> {
    let registry = FunctionRegistry::with_anonymizer_functions();
    let expr = Expression::compile_with(src, &registry).ok()?;
    let now = chrono::DateTime::parse_from_rfc3339("2024-05-06T07:08:09+02:00").unwrap();
    let ctx = EvalContext::new(r).with_now(now);
    Some(format!("{:?}", expr.evaluate(&ctx)))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn grammar_expressions_never_panic(e in expression()) {
        check(&e);
    }

    #[test]
    fn mutated_suite_expressions_never_panic(e in mutated_suite()) {
        check(&e);
    }

    #[test]
    fn arbitrary_text_never_panics(e in "\\PC{0,40}") {
        check(&e);
    }

    /// Parentheses, surrounding whitespace and a trailing comment change nothing.
    #[test]
    fn parenthesized_and_commented_spellings_agree(e in expression()) {
        let p = PATIENT.with(|p| *p);
        if let Some(plain) = outcome(&e, p) {
            prop_assert_eq!(outcome(&format!(" ( {e} ) "), p), Some(plain.clone()));
            prop_assert_eq!(outcome(&format!("{e} // note"), p), Some(plain.clone()));
            prop_assert_eq!(outcome(&format!("/* c */{e}"), p), Some(plain));
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn hostile_shapes_never_panic_or_hang(e in hostile()) {
        check(&e);
    }
}

// Regressions found by the properties above, minimized.

/// `1 is Integer is Integer …`: type operators did not count towards the expression size limit,
/// so a long chain built a tree deep enough to overflow the stack when evaluated or dropped.
#[test]
fn long_chain_of_type_operators_is_refused_not_a_stack_overflow() {
    for op in ["is", "as"] {
        let src = format!("1{}", format!(" {op} Integer").repeat(20_000));
        check(&src);
        assert!(Expression::compile(&src).is_err(), "{op}");
    }
}

/// `repeat($this + 1)` never stops producing new items, and a string doubled by `select`s grows
/// exponentially: both ran without bound (hours, then out of memory). The evaluation budget ends
/// them with an error.
#[test]
fn results_growing_without_bound_end_with_a_budget_error() {
    let patient = PATIENT.with(|p| *p);
    for src in [
        "1.repeat($this + 1)",
        "'a'.repeat($this & 'a')",
        &format!("'ab'{}", ".select($this & $this)".repeat(64)),
        &format!("%resource{}", ".select(%resource.descendants())".repeat(8)),
        "%resource.descendants().select(%resource.descendants()).select(%resource.descendants()).distinct()",
    ] {
        let e = Expression::compile(src).unwrap();
        let r = e.evaluate(&EvalContext::new(patient));
        assert!(
            matches!(r, Err(fhirpath::EvalError::Budget(_))),
            "{src}: {r:?}"
        );
    }
    // Ordinary expressions stay far below the budget.
    let e = Expression::compile("%resource.descendants().select(%resource.descendants()).count()")
        .unwrap();
    assert!(e.evaluate(&EvalContext::new(patient)).is_ok());
}
