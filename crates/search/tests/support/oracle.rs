//! A brute-force search oracle: evaluates each parameter's FHIRPath expression over every
//! resource and compares the selected items with the search value directly, with its own
//! (deliberately simple) parsing, date arithmetic and matching — independent of the crate's
//! extraction, index tables and SQL.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use fhir_model::{SearchParamType, r4};
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

pub struct Oracle<'a> {
    by_type: HashMap<&'a str, Vec<&'a Value>>,
    by_ref: HashMap<String, &'a Value>,
}

fn norm(s: &str) -> String {
    s.nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c))
        .collect::<String>()
        .to_lowercase()
}

/// [lo, hi) in ms for a FHIR date/dateTime/instant string.
fn range(s: &str) -> Option<(i64, i64)> {
    let day = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
    };
    match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            Some((
                day(NaiveDate::from_ymd_opt(y, 1, 1)?)?,
                day(NaiveDate::from_ymd_opt(y + 1, 1, 1)?)?,
            ))
        }
        7 => {
            let y: i32 = s[..4].parse().ok()?;
            let m: u32 = s[5..7].parse().ok()?;
            let next = if m == 12 {
                NaiveDate::from_ymd_opt(y + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(y, m + 1, 1)
            };
            Some((day(NaiveDate::from_ymd_opt(y, m, 1)?)?, day(next?)?))
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some((day(d)?, day(d)? + 86_400_000))
        }
        _ => {
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                let lo = t.timestamp_millis();
                let width = if s.contains('.') { 1 } else { 1000 };
                return Some((lo, lo + width));
            }
            let t = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").ok()?;
            let lo = t.and_utc().timestamp_millis();
            Some((lo, lo + 1000))
        }
    }
}

fn item_ranges(item: &Value) -> Vec<(i64, i64)> {
    match item {
        Value::String(s) => range(s).into_iter().collect(),
        Value::Object(o) if o.contains_key("start") || o.contains_key("end") => {
            let lo = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(range)
                .map_or(i64::MIN / 2, |r| r.0);
            let hi = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(range)
                .map_or(i64::MAX / 2, |r| r.1);
            vec![(lo, hi)]
        }
        _ => vec![],
    }
}

fn date_match(item: &Value, v: &str) -> bool {
    let (p, d) = split_prefix(v);
    let (plo, phi) = range(d).expect("oracle date");
    item_ranges(item).into_iter().any(|(lo, hi)| match p {
        "eq" => plo <= lo && hi <= phi,
        "ne" => !(plo <= lo && hi <= phi),
        "gt" => hi > phi,
        "lt" => lo < plo,
        "ge" => hi > plo,
        "le" => lo < phi,
        "sa" => lo >= phi,
        "eb" => hi <= plo,
        "ap" => lo < phi && hi > plo,
        other => panic!("oracle prefix {other}"),
    })
}

fn split_prefix(v: &str) -> (&str, &str) {
    if v.len() > 2 && v.as_bytes()[0].is_ascii_lowercase() && v.as_bytes()[1].is_ascii_lowercase() {
        (&v[..2], &v[2..])
    } else {
        ("eq", v)
    }
}

fn number_match(n: f64, v: &str) -> bool {
    let (p, d) = split_prefix(v);
    let x: f64 = d.parse().expect("oracle number");
    let decimals = d.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
    let half = 0.5 * 10f64.powi(-decimals);
    match p {
        "eq" => n >= x - half && n < x + half,
        "ne" => !(n >= x - half && n < x + half),
        "gt" => n > x,
        "lt" => n < x,
        "ge" => n >= x,
        "le" => n <= x,
        other => panic!("oracle prefix {other}"),
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.to_string().parse().ok())
}

fn token_pairs(item: &Value) -> Vec<(Option<String>, String)> {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    match item {
        Value::String(t) => vec![(None, t.clone())],
        Value::Bool(b) => vec![(None, b.to_string())],
        Value::Object(o) if o.contains_key("coding") => o["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((s(c, "system"), s(c, "code")?)))
            .collect(),
        Value::Object(o) if o.contains_key("code") => {
            vec![(s(item, "system"), s(item, "code").unwrap_or_default())]
        }
        Value::Object(o) if o.contains_key("value") => {
            // Identifier (system|value) or ContactPoint (value only: its system is not a URI)
            let is_contact = matches!(
                o.get("system").and_then(Value::as_str),
                Some("phone" | "email" | "fax" | "url" | "sms" | "pager" | "other")
            );
            vec![(
                if is_contact { None } else { s(item, "system") },
                s(item, "value").unwrap_or_default(),
            )]
        }
        _ => vec![],
    }
}

fn token_match(item: &Value, v: &str) -> bool {
    let (sys, code) = match v.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, v),
    };
    token_pairs(item).iter().any(|(s, c)| {
        let sys_ok = match sys {
            None => true,
            Some("") => s.is_none(),
            Some(x) => s.as_deref() == Some(x),
        };
        sys_ok && (code.is_empty() || c == code)
    })
}

fn strings(item: &Value) -> Vec<String> {
    match item {
        Value::String(s) => vec![s.clone()],
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "use" | "period" | "extension" | "type" | "id"))
            .flat_map(|(_, v)| match v {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                _ => vec![],
            })
            .collect(),
        _ => vec![],
    }
}

impl<'a> Oracle<'a> {
    pub fn new(resources: &'a [Value]) -> Self {
        let mut by_type: HashMap<&str, Vec<&Value>> = HashMap::new();
        let mut by_ref = HashMap::new();
        for r in resources {
            let t = r["resourceType"].as_str().unwrap_or_default();
            by_type.entry(t).or_default().push(r);
            by_ref.insert(format!("{t}/{}", r["id"].as_str().unwrap_or_default()), r);
        }
        Oracle { by_type, by_ref }
    }

    /// Ids of the resources of `ty` that satisfy every `name=value` of the query.
    pub fn ids(&self, ty: &str, query: &str) -> BTreeSet<String> {
        let conds: Vec<(&str, &str)> = query
            .split('&')
            .map(|p| p.split_once('=').expect("name=value"))
            .collect();
        // `_has` is answered from the source side once per query: the references of every
        // matching source resource.
        let has_sets: Vec<Option<BTreeSet<String>>> = conds
            .iter()
            .map(|(n, v)| {
                let rest = n.strip_prefix("_has:")?;
                let mut parts = rest.splitn(3, ':');
                let (st, rc, pname) = (parts.next()?, parts.next()?, parts.next()?);
                let mut set = BTreeSet::new();
                for s in self.by_type.get(st).into_iter().flatten() {
                    if self.cond(st, s, pname, v) {
                        let (_, refs) = self.items(st, rc, s);
                        set.extend(
                            refs.iter()
                                .filter_map(|i| i.get("reference").and_then(Value::as_str))
                                .map(str::to_string),
                        );
                    }
                }
                Some(set)
            })
            .collect();
        self.by_type
            .get(ty)
            .into_iter()
            .flatten()
            .filter(|r| {
                conds.iter().zip(&has_sets).all(|((n, v), has)| match has {
                    Some(set) => {
                        set.contains(&format!("{ty}/{}", r["id"].as_str().unwrap_or_default()))
                    }
                    None => self.cond(ty, r, n, v),
                })
            })
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The items the parameter's expression selects, with `resolve() is T` honoured by
    /// looking the reference's target up in the data set.
    fn items(&self, ty: &str, code: &str, r: &Value) -> (SearchParamType, Vec<Value>) {
        let p = r4()
            .search_param(ty, code)
            .unwrap_or_else(|| panic!("oracle: {ty}.{code}"));
        let expr = p.expression.as_deref().expect("expression");
        let mut out = Vec::new();
        for branch in expr.split(" | ") {
            let (path, want) = match branch.find(".where(resolve() is ") {
                Some(i) => (&branch[..i], Some(branch[i + 20..].trim_end_matches(')'))),
                None => (branch, None),
            };
            for item in super::fhirpath_eval(path, r) {
                if let Some(t) = want {
                    let target = item
                        .get("reference")
                        .and_then(Value::as_str)
                        .and_then(|rf| self.by_ref.get(rf));
                    if target.is_none_or(|tr| tr["resourceType"] != t) {
                        continue;
                    }
                }
                out.push(item);
            }
        }
        (p.kind, out)
    }

    fn cond(&self, ty: &str, r: &Value, name: &str, value: &str) -> bool {
        if let Some(rest) = name.strip_prefix("_has:") {
            let mut parts = rest.splitn(3, ':');
            let (st, rc, pname) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            let me = format!("{ty}/{}", r["id"].as_str().unwrap_or_default());
            return self.by_type.get(st).into_iter().flatten().any(|s| {
                let (_, refs) = self.items(st, rc, s);
                refs.iter()
                    .any(|i| i.get("reference").and_then(Value::as_str) == Some(me.as_str()))
                    && self.cond(st, s, pname, value)
            });
        }
        if let Some((head, chained)) = name.split_once('.') {
            let (code, only) = match head.split_once(':') {
                Some((c, t)) => (c, Some(t)),
                None => (head, None),
            };
            let (_, refs) = self.items(ty, code, r);
            return refs.iter().any(|i| {
                let Some(t) = i
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(|rf| self.by_ref.get(rf))
                else {
                    return false;
                };
                let tt = t["resourceType"].as_str().unwrap_or_default();
                only.is_none_or(|o| o == tt)
                    && r4()
                        .search_param(tt, chained.split(':').next().unwrap())
                        .is_some()
                    && self.cond(tt, t, chained, value)
            });
        }
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name, None),
        };
        let (kind, items) = self.items(ty, code, r);
        if modifier == Some("missing") {
            return items.is_empty() == (value == "true");
        }
        let any = value.split(',').any(|v| {
            items.iter().any(|item| match (kind, modifier) {
                (SearchParamType::Token, None | Some("not")) => token_match(item, v),
                (SearchParamType::Token, Some("text")) => {
                    let texts: Vec<&str> = item
                        .get("coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.get("display").and_then(Value::as_str))
                        .chain(item.get("text").and_then(Value::as_str))
                        .collect();
                    texts.iter().any(|t| norm(t).starts_with(&norm(v)))
                }
                (SearchParamType::String, None) => {
                    strings(item).iter().any(|s| norm(s).starts_with(&norm(v)))
                }
                (SearchParamType::String, Some("contains")) => {
                    strings(item).iter().any(|s| norm(s).contains(&norm(v)))
                }
                (SearchParamType::String, Some("exact")) => strings(item).iter().any(|s| s == v),
                (SearchParamType::Date, None) => date_match(item, v),
                (SearchParamType::Number, None) => as_f64(item).is_some_and(|n| number_match(n, v)),
                (SearchParamType::Quantity, None) => {
                    let mut parts = v.splitn(3, '|');
                    let num = parts.next().unwrap();
                    let sys = parts.next().filter(|s| !s.is_empty());
                    let unit = parts.next().filter(|s| !s.is_empty());
                    item.get("value")
                        .and_then(as_f64)
                        .is_some_and(|n| number_match(n, num))
                        && sys.is_none_or(|s| item.get("system").and_then(Value::as_str) == Some(s))
                        && unit.is_none_or(|u| {
                            item.get("code").and_then(Value::as_str) == Some(u)
                                || (sys.is_none()
                                    && item.get("unit").and_then(Value::as_str) == Some(u))
                        })
                }
                (SearchParamType::Reference, None) => {
                    let rf = item
                        .get("reference")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    rf == v || rf.rsplit('/').next() == Some(v) && !v.contains('/')
                }
                (SearchParamType::Reference, Some(t)) => {
                    item.get("reference").and_then(Value::as_str)
                        == Some(format!("{t}/{v}").as_str())
                }
                (SearchParamType::Uri, None) => item.as_str() == Some(v),
                other => panic!("oracle does not know {other:?}"),
            })
        });
        any != (modifier == Some("not"))
    }
}
