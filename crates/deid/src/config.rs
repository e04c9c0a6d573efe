//! Configuration parsing and validation (anonymizer.md §1).

use std::collections::HashSet;

use fhirpath::{Expression, FunctionRegistry};
use serde_json::Value as Json;

use crate::transforms::MAX_NOISE;

/// A configuration problem. `rule` is the zero-based index in `fhirPathRules` when one rule is at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{field}: {problem}", rule.map(|r| format!("fhirPathRules[{r}].")).unwrap_or_default())]
pub struct ConfigError {
    pub rule: Option<usize>,
    pub field: String,
    pub problem: String,
}

fn err(rule: Option<usize>, field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        rule,
        field: field.to_string(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessingErrors {
    Raise,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateShiftScope {
    Resource,
    File,
    Folder,
    /// Our extension: one shift per patient, for every resource of the patient's compartment
    /// (patient.rs); `resource` scope for the others.
    Patient,
}

/// `parameters` after defaults are filled.
#[derive(Debug, Clone)]
pub struct Parameters {
    pub date_shift_key: String,
    pub date_shift_scope: DateShiftScope,
    pub date_shift_fixed_offset_in_days: Option<i64>,
    pub crypto_hash_key: String,
    pub encrypt_key: String,
    pub enable_partial_ages_for_redact: bool,
    pub enable_partial_dates_for_redact: bool,
    pub enable_partial_zip_codes_for_redact: bool,
    pub restricted_zip_code_tabulation_areas: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Method {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Encrypt,
    /// The `replaceWith` value (null allowed).
    Substitute(Json),
    Perturb {
        span: f64,
        proportional: bool,
        round_to: u32,
    },
    Generalize {
        cases: Vec<(Expression, Expression)>,
        keep_other_values: bool,
    },
    /// Not built in: accepted with a warning, fails when a resource it applies to is processed.
    Unknown(String),
}

/// How a rule finds its nodes (§3.2).
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `nodesByType('T')[.child]` / `nodesByName('n')[.child]` over the resource's descendant cache.
    ByType(String, Option<String>),
    ByName(String, Option<String>),
    /// `"path": "Patient"`: the resource node itself.
    Resource,
    /// Full FHIRPath evaluated with the resource as focus.
    Expr(Expression),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub index: usize,
    pub path: String,
    /// Leading type; empty, `Resource` or `DomainResource` apply to every resource.
    pub resource_type: String,
    pub matcher: Matcher,
    pub method: Method,
}

impl Rule {
    pub fn applies_to(&self, ty: &str) -> bool {
        matches!(
            self.resource_type.as_str(),
            "" | "Resource" | "DomainResource"
        ) || self.resource_type == ty
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub processing_errors: ProcessingErrors,
    pub rules: Vec<Rule>,
    pub parameters: Parameters,
    /// Warnings the reference only logs (empty fhirVersion, unknown methods).
    pub warnings: Vec<String>,
}

/// Strips `//` and `/* */` comments and trailing commas (Newtonsoft accepts them) and rejects
/// duplicate keys in any object.
pub(crate) fn normalise_json(text: &str) -> Result<String, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    // (is_object, keys, expecting_key)
    let mut stack: Vec<(bool, HashSet<String>, bool)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            '"' => {
                let start = i;
                i += 1;
                let mut raw = String::new();
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' && i + 1 < b.len() {
                        raw.push(b[i]);
                        i += 1;
                    }
                    raw.push(b[i]);
                    i += 1;
                }
                let lit: String = b[start..(i + 1).min(b.len())].iter().collect();
                out.push_str(&lit);
                if let Some((true, keys, expecting)) = stack.last_mut()
                    && *expecting
                {
                    let key: String = serde_json::from_str(&lit).unwrap_or(raw);
                    if !keys.insert(key.clone()) {
                        return Err(err(
                            None,
                            "configuration",
                            format!("Failed to parse configuration file: duplicate key '{key}'"),
                        ));
                    }
                    *expecting = false;
                }
                i += 1;
                continue;
            }
            '/' if b.get(i + 1) == Some(&'/') => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            '/' if b.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
                continue;
            }
            '{' => stack.push((true, HashSet::new(), true)),
            '[' => stack.push((false, HashSet::new(), false)),
            '}' | ']' => {
                stack.pop();
                // A trailing comma: drop the last emitted comma if only whitespace follows it.
                let trimmed = out.trim_end().len();
                if out[..trimmed].ends_with(',') {
                    out.truncate(trimmed - 1);
                }
            }
            ',' => {
                if let Some((true, _, expecting)) = stack.last_mut() {
                    *expecting = true;
                }
            }
            _ => {}
        }
        out.push(c);
        i += 1;
    }
    Ok(out)
}

/// Case-insensitive member lookup after an exact one (Newtonsoft binding).
fn member<'a>(obj: &'a serde_json::Map<String, Json>, name: &str) -> Option<&'a Json> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

fn value_text(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

fn random_key() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_fail(detail: impl std::fmt::Display) -> ConfigError {
    err(
        None,
        "configuration",
        format!("Failed to parse configuration file: {detail}"),
    )
}

static NODES_FAST: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r#"^nodesBy(Type|Name)\(['"|]([A-Za-z0-9]+)['"|]\)(\.([A-Za-z0-9]+))?$"#)
        .expect("static regex")
});
static SPLIT: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"^(?<ty>[A-Z][a-zA-Z]*)?(\.)?(?<expr>.*?)$").expect("static regex")
});

impl Config {
    /// Parses and validates a configuration text; fills default (random) keys.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let text = normalise_json(text)?;
        let root: Json = serde_json::from_str(&text).map_err(parse_fail)?;
        let Json::Object(top) = &root else {
            return Err(parse_fail("not a JSON object"));
        };
        let mut warnings = Vec::new();
        match member(top, "fhirVersion") {
            None | Some(Json::Null) => warnings.push("fhirVersion is not specified".into()),
            Some(Json::String(s)) if s.is_empty() => {
                warnings.push("fhirVersion is not specified".into())
            }
            Some(Json::String(s)) if s.eq_ignore_ascii_case("R4") => {}
            Some(v) => {
                let s = value_text(v).unwrap_or_else(|| v.to_string());
                return Err(err(
                    None,
                    "fhirVersion",
                    format!(
                        "Configuration of fhirVersion {s} is not supported. Expected fhirVersion: R4"
                    ),
                ));
            }
        }
        let processing_errors = match member(top, "processingErrors") {
            None | Some(Json::Null) => ProcessingErrors::Raise,
            Some(Json::String(s)) if s.eq_ignore_ascii_case("raise") => ProcessingErrors::Raise,
            Some(Json::String(s)) if s.eq_ignore_ascii_case("skip") => ProcessingErrors::Skip,
            Some(v) => {
                return Err(parse_fail(format!(
                    "processingErrors {v} is not raise or skip"
                )));
            }
        };
        let rules_json = match member(top, "fhirPathRules") {
            Some(Json::Array(a)) => a,
            None | Some(Json::Null) => {
                return Err(err(
                    None,
                    "fhirPathRules",
                    "The configuration is invalid, please specify any fhirPathRules",
                ));
            }
            Some(_) => return Err(parse_fail("fhirPathRules is not an array")),
        };
        let registry = FunctionRegistry::with_anonymizer_functions();
        let mut rules = Vec::with_capacity(rules_json.len());
        for (i, r) in rules_json.iter().enumerate() {
            let Json::Object(r) = r else {
                return Err(parse_fail(format!("fhirPathRules[{i}] is not an object")));
            };
            let (Some(Json::String(path)), Some(Json::String(method))) =
                (r.get("path"), r.get("method"))
            else {
                return Err(err(
                    Some(i),
                    "path/method",
                    "Missing path or method in Fhir path rule config.",
                ));
            };
            let compiled = Expression::compile_with(path, &registry)
                .map_err(|e| err(Some(i), "path", format!("Invalid FHIR path {path}: {e}")))?;
            let caps = SPLIT.captures(path);
            let ty = caps
                .as_ref()
                .and_then(|c| c.name("ty"))
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            let expr_src = caps
                .as_ref()
                .and_then(|c| c.name("expr"))
                .map(|m| m.as_str())
                .unwrap_or("");
            let matcher =
                if let Some(c) = NODES_FAST.captures(path) {
                    let arg = c[2].to_string();
                    let child = c.get(4).map(|m| m.as_str().to_string());
                    if &c[1] == "Type" {
                        Matcher::ByType(arg, child)
                    } else {
                        Matcher::ByName(arg, child)
                    }
                } else if !ty.is_empty() && *path == ty {
                    Matcher::Resource
                } else if ty.is_empty() {
                    Matcher::Expr(compiled)
                } else {
                    Matcher::Expr(Expression::compile_with(expr_src, &registry).map_err(|e| {
                        err(Some(i), "path", format!("Invalid FHIR path {path}: {e}"))
                    })?)
                };
            let method = parse_method(i, method, r, &registry, &mut warnings)?;
            rules.push(Rule {
                index: i,
                path: path.clone(),
                resource_type: ty,
                matcher,
                method,
            });
        }
        let empty = serde_json::Map::new();
        let params = match member(top, "parameters") {
            Some(Json::Object(p)) => p,
            None | Some(Json::Null) => &empty,
            Some(_) => return Err(parse_fail("parameters is not an object")),
        };
        let text_param = |name: &str| -> Result<String, ConfigError> {
            match member(params, name) {
                None | Some(Json::Null) => Ok(String::new()),
                Some(v) => {
                    value_text(v).ok_or_else(|| parse_fail(format!("{name} is not a string")))
                }
            }
        };
        let bool_param = |name: &str| -> Result<bool, ConfigError> {
            match member(params, name) {
                None | Some(Json::Null) => Ok(false),
                Some(Json::Bool(b)) => Ok(*b),
                Some(Json::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
                Some(Json::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
                Some(_) => Err(parse_fail(format!("{name} is not a boolean"))),
            }
        };
        let encrypt_key = text_param("encryptKey")?;
        if !encrypt_key.is_empty() && ![16, 24, 32].contains(&encrypt_key.len()) {
            return Err(err(
                None,
                "parameters.encryptKey",
                format!(
                    "Invalid encrypt key size : {} bits! Please provide key sizes of 128, 192 or 256 bits.",
                    encrypt_key.len() * 8
                ),
            ));
        }
        let scope = text_param("dateShiftScope")?;
        let date_shift_scope = match scope.to_ascii_lowercase().as_str() {
            "" | "resource" => DateShiftScope::Resource,
            "file" => DateShiftScope::File,
            "folder" => DateShiftScope::Folder,
            "patient" => DateShiftScope::Patient,
            other => return Err(parse_fail(format!("dateShiftScope {other} is invalid"))),
        };
        let fixed = match member(params, "dateShiftFixedOffsetInDays") {
            None | Some(Json::Null) => None,
            Some(v) => {
                // The reference binds an Int32 (a larger number fails to parse). Within it, an
                // offset longer than the calendar (years 1 to 9999) can shift no date: the
                // reference throws on every date at run time, and refusing it here keeps every
                // shift inside the calendar, so none can overflow and leave a date as it was.
                let days = value_text(v)
                    .and_then(|t| t.parse::<i32>().ok())
                    .ok_or_else(|| parse_fail("dateShiftFixedOffsetInDays is not an integer"))?;
                if i64::from(days).abs() > MAX_FIXED_OFFSET_DAYS {
                    return Err(err(
                        None,
                        "parameters.dateShiftFixedOffsetInDays",
                        format!(
                            "dateShiftFixedOffsetInDays {days} is invalid: a shift can be at most {MAX_FIXED_OFFSET_DAYS} days (0001-01-01 to 9999-12-31)"
                        ),
                    ));
                }
                Some(i64::from(days))
            }
        };
        let zips = match member(params, "restrictedZipCodeTabulationAreas") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(a)) => a.iter().filter_map(value_text).collect(),
            Some(_) => {
                return Err(parse_fail(
                    "restrictedZipCodeTabulationAreas is not an array",
                ));
            }
        };
        // cryptoHashKey and encryptKey share one per-process random default in the reference.
        let shared_default = random_key();
        let mut date_shift_key = text_param("dateShiftKey")?;
        if date_shift_key.is_empty() {
            date_shift_key = random_key();
        }
        let mut crypto_hash_key = text_param("cryptoHashKey")?;
        if crypto_hash_key.is_empty() {
            crypto_hash_key = shared_default.clone();
        }
        let encrypt_key = if encrypt_key.is_empty() {
            shared_default
        } else {
            encrypt_key
        };
        Ok(Config {
            processing_errors,
            rules,
            parameters: Parameters {
                date_shift_key,
                date_shift_scope,
                date_shift_fixed_offset_in_days: fixed,
                crypto_hash_key,
                encrypt_key,
                enable_partial_ages_for_redact: bool_param("enablePartialAgesForRedact")?,
                enable_partial_dates_for_redact: bool_param("enablePartialDatesForRedact")?,
                enable_partial_zip_codes_for_redact: bool_param("enablePartialZipCodesForRedact")?,
                restricted_zip_code_tabulation_areas: zips,
            },
            warnings,
        })
    }
}

/// The largest fixed date shift, in days: 0001-01-01 to 9999-12-31, the calendar of the
/// reference's `DateTime`.
pub const MAX_FIXED_OFFSET_DAYS: i64 = 3_652_058;

/// Whether a perturb span draws noise that can be added. The reference converts the noise (up
/// to half the span; for a proportional span, half of it times the value) to a .NET decimal,
/// which throws beyond ±2^96 and fails the run; here such noise is an error too (never a
/// silent zero). A fixed span of 2^97 or more draws it (for 2^98, half the draws), and a
/// proportional one draws it even for the smallest non-zero decimal, 1e-28, when its product
/// does: refused at load, as a configuration error, rather than failing the export at run time.
fn span_applies(span: f64, proportional: bool) -> bool {
    let half = if proportional { span * 1e-28 } else { span } / 2.0;
    half < MAX_NOISE
}

impl Config {
    /// Refuses a rule whose method is not built in. The reference only warns at load, since a
    /// .NET host may register a custom processor of that name, and fails once a resource the
    /// rule applies to is processed, whatever `processingErrors` says (§1.2, §1.4). A host
    /// without custom processors (the server) knows at load that such a rule can never run.
    pub fn require_built_in_methods(&self) -> Result<(), ConfigError> {
        for rule in &self.rules {
            if let Method::Unknown(m) = &rule.method {
                return Err(err(
                    Some(rule.index),
                    "method",
                    format!(
                        "Anonymization method {m} not supported: the built-in methods are keep, redact, dateShift, cryptoHash, encrypt, substitute, perturb and generalize"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn parse_method(
    i: usize,
    method: &str,
    r: &serde_json::Map<String, Json>,
    registry: &FunctionRegistry,
    warnings: &mut Vec<String>,
) -> Result<Method, ConfigError> {
    Ok(match method.to_ascii_lowercase().as_str() {
        "keep" => Method::Keep,
        "redact" => Method::Redact,
        "dateshift" => Method::DateShift,
        "cryptohash" => Method::CryptoHash,
        "encrypt" => Method::Encrypt,
        "substitute" => match r.get("replaceWith") {
            Some(v) => Method::Substitute(v.clone()),
            None => {
                return Err(err(
                    Some(i),
                    "replaceWith",
                    format!("Missing replaceWith value in substitution rule at {}", i),
                ));
            }
        },
        "perturb" => {
            let proportional = match r.get("rangeType") {
                None | Some(Json::Null) => false,
                Some(Json::String(s)) if s.eq_ignore_ascii_case("fixed") => false,
                Some(Json::String(s)) if s.eq_ignore_ascii_case("proportional") => true,
                Some(v) => {
                    return Err(err(
                        Some(i),
                        "rangeType",
                        format!("RangeType value is invalid: {v}"),
                    ));
                }
            };
            let span = match r.get("span") {
                None | Some(Json::Null) => {
                    return Err(err(
                        Some(i),
                        "span",
                        "Span value is required in perturb rule.",
                    ));
                }
                Some(v) => value_text(v)
                    .and_then(|t| t.trim().parse::<f64>().ok())
                    .filter(|s| *s >= 0.0 && s.is_finite())
                    .ok_or_else(|| err(Some(i), "span", format!("Span value is invalid: {v}")))?,
            };
            if !span_applies(span, proportional) {
                return Err(err(
                    Some(i),
                    "span",
                    format!(
                        "Span value is invalid: {span:e} draws noise beyond the decimal range (at most {MAX_NOISE:e} either way{}), which cannot be added to any value",
                        if proportional {
                            ", for the smallest non-zero value 1e-28"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let round_to = match r.get("roundTo") {
                None | Some(Json::Null) => 2,
                Some(v) => value_text(v)
                    .and_then(|t| t.trim().parse::<i64>().ok())
                    .filter(|n| (0..=28).contains(n))
                    .map(|n| n as u32)
                    .ok_or_else(|| {
                        err(Some(i), "roundTo", format!("RoundTo value is invalid: {v}"))
                    })?,
            };
            Method::Perturb {
                span,
                proportional,
                round_to,
            }
        }
        "generalize" => {
            let cases = match r.get("cases") {
                Some(Json::Object(c)) => c,
                None | Some(Json::Null) => {
                    return Err(err(
                        Some(i),
                        "cases",
                        "Cases are required in generalize rule.",
                    ));
                }
                Some(_) => return Err(err(Some(i), "cases", "Cases must be a JSON object.")),
            };
            let mut compiled = Vec::with_capacity(cases.len());
            for (k, v) in cases {
                let cond = Expression::compile_with(k, registry)
                    .map_err(|e| err(Some(i), "cases", format!("Invalid FHIR path {k}: {e}")))?;
                let Json::String(vs) = v else {
                    return Err(err(
                        Some(i),
                        "cases",
                        format!("Case value for {k} is not a string"),
                    ));
                };
                let val = Expression::compile_with(vs, registry)
                    .map_err(|e| err(Some(i), "cases", format!("Invalid FHIR path {vs}: {e}")))?;
                compiled.push((cond, val));
            }
            let keep_other_values = match r.get("otherValues") {
                None | Some(Json::Null) => false,
                Some(Json::String(s)) if s.eq_ignore_ascii_case("redact") => false,
                Some(Json::String(s)) if s.eq_ignore_ascii_case("keep") => true,
                Some(v) => {
                    return Err(err(
                        Some(i),
                        "otherValues",
                        format!("OtherValues value is invalid: {v}"),
                    ));
                }
            };
            Method::Generalize {
                cases: compiled,
                keep_other_values,
            }
        }
        other => {
            warnings.push(format!(
                "fhirPathRules[{i}]: {other} is not a built-in method; make sure it is added as a custom processor"
            ));
            Method::Unknown(method.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerates_bom_comments_trailing_commas() {
        let c = Config::parse("\u{feff}{ // c\n \"fhirPathRules\": [ {\"path\":\"Patient\",\"method\":\"keep\",}, ], /* x */ }").unwrap();
        assert_eq!(c.rules.len(), 1);
    }

    #[test]
    fn rejects_duplicate_keys() {
        assert!(Config::parse(r#"{"fhirPathRules": [], "fhirPathRules": []}"#).is_err());
    }

    /// Security review: a perturb span of 1e300 was accepted and then added no noise. A span
    /// whose noise cannot be represented is a configuration error now; spans the reference
    /// applies stay accepted.
    #[test]
    fn regression_perturb_spans_that_cannot_add_noise_are_refused() {
        let cfg = |span: &str, range: &str| {
            Config::parse(&format!(
                r#"{{"fhirPathRules": [{{"path": "Observation.value", "method": "perturb", "span": {span}, "rangeType": "{range}"}}]}}"#
            ))
        };
        for (span, range) in [
            ("1e300", "fixed"),
            ("\"1e300\"", "fixed"),
            ("2e29", "fixed"),
            ("1e300", "proportional"),
            ("1e58", "proportional"),
        ] {
            let e = cfg(span, range).expect_err(span);
            assert_eq!((e.rule, e.field.as_str()), (Some(0), "span"), "{e}");
        }
        for (span, range) in [
            ("0", "fixed"),
            ("5", "fixed"),
            ("1e29", "fixed"),
            ("0.1", "proportional"),
            ("1e40", "proportional"),
        ] {
            cfg(span, range).expect(span);
        }
    }

    /// A fixed offset is an Int32 in the reference, and one beyond the calendar could shift no
    /// date: a shift that overflowed left the date as it was.
    #[test]
    fn fixed_date_shifts_must_fit_the_calendar() {
        let cfg = |days: &str| {
            Config::parse(&format!(
                r#"{{"fhirPathRules": [], "parameters": {{"dateShiftFixedOffsetInDays": {days}}}}}"#
            ))
        };
        for ok in ["0", "-21", "3652058", "-3652058", "\"40\""] {
            cfg(ok).expect(ok);
        }
        for bad in [
            "3652059",
            "-2147483648",
            "3000000000",
            "1000000000000000",
            "1.5",
        ] {
            assert!(cfg(bad).is_err(), "{bad}");
        }
    }

    /// The reference loads a configuration with an unknown method (only a warning: it may be a
    /// custom processor), and so does `parse` (the conformance corpus expects it); a host
    /// without custom processors refuses it with `require_built_in_methods`.
    #[test]
    fn regression_unknown_methods_are_refused_by_hosts_without_custom_processors() {
        let c = Config::parse(
            r#"{"fhirPathRules": [{"path": "Patient.id", "method": "keep"}, {"path": "Patient.name", "method": "scramble"}]}"#,
        )
        .expect("the reference only warns");
        assert!(c.warnings.iter().any(|w| w.contains("scramble")));
        let e = c.require_built_in_methods().expect_err("unknown method");
        assert_eq!((e.rule, e.field.as_str()), (Some(1), "method"));
        assert!(e.to_string().contains("scramble"), "{e}");
        Config::parse(r#"{"fhirPathRules": [{"path": "Patient.name", "method": "REDACT"}]}"#)
            .expect("built in, case-insensitive")
            .require_built_in_methods()
            .expect("built in");
    }

    #[test]
    fn names_rule_and_field() {
        let e = Config::parse(r#"{"fhirPathRules": [{"path":"Patient","method":"perturb"}]}"#)
            .unwrap_err();
        assert_eq!(e.rule, Some(0));
        assert_eq!(e.field, "span");
    }
}
