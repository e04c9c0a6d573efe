//! `_elements` and `_summary` as parameters: the element names `_elements` lists, the subset a
//! read asks for. The cutting itself is [`crate::subset`]'s, over stored bytes.

use crate::error::SearchError;
use crate::subset::{Subset, Summary};

/// The element names of one `_elements` value: comma-separated, blanks dropped, and a name
/// with a type (`Patient.name`) cut to the element (`name`). Search and read both take
/// `_elements` through it.
pub fn parse_elements(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| e.split_once('.').map_or(e, |(_, el)| el).to_string())
        .collect()
}

/// The value of a `_summary` parameter (`param`: its name as written, for the error).
fn parse_summary(param: &str, value: &str) -> Result<Summary, SearchError> {
    Summary::parse(value).ok_or_else(|| {
        SearchError::invalid(
            param,
            format!("'{value}' is not one of true, text, data, count, false"),
        )
    })
}

/// The `_summary` of a request's parameters, one rule for reads and searches: `false` when
/// absent; a value given more than once must be the same each time (`_summary=false&_summary=data`
/// is refused as `_summary=data&_summary=false` is: which one was meant is the client's to say).
pub fn summary_of(params: &[(String, String)]) -> Result<Summary, SearchError> {
    let mut summary: Option<Summary> = None;
    for (name, value) in params.iter().filter(|(n, _)| n == "_summary") {
        let s = parse_summary(name, value)?;
        if summary.is_some_and(|earlier| earlier != s) {
            return Err(SearchError::invalid(
                name,
                "given twice, with different values",
            ));
        }
        summary = Some(s);
    }
    Ok(summary.unwrap_or_default())
}

/// `_summary` other than `false` with `_elements`: refused, as HAPI FHIR refuses it (FHIR
/// lets a server refuse the pair or let `_elements` win).
pub(crate) fn check_combination(
    summary: Summary,
    elements: Option<&[String]>,
) -> Result<(), SearchError> {
    if summary != Summary::False && elements.is_some() {
        return Err(SearchError::invalid(
            "_summary",
            format!(
                "_summary={} cannot be combined with _elements",
                summary.as_str()
            ),
        ));
    }
    Ok(())
}

/// The subset a read or vread asks for with `_elements` and `_summary` (`params`: the
/// request's query parameters), taken as a search takes them: `None` for the whole resource
/// (`_summary=false`, or neither). Refused: `_summary=count` (searches only), a value that is
/// not a `_summary` value, two different `_summary` values, and `_summary` with `_elements`.
pub fn read_subset(params: &[(String, String)]) -> Result<Option<Subset>, SearchError> {
    let summary = summary_of(params)?;
    if summary == Summary::Count {
        return Err(SearchError::invalid(
            "_summary",
            "_summary=count applies to searches, not to reads",
        ));
    }
    let mut elements: Option<Vec<String>> = None;
    for (_, value) in params.iter().filter(|(n, _)| n == "_elements") {
        elements
            .get_or_insert_with(Vec::new)
            .extend(parse_elements(value));
    }
    check_combination(summary, elements.as_deref())?;
    Ok(match elements {
        Some(names) => Some(Subset::Elements(names)),
        None => summary.subset(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value as Json, json};

    #[test]
    fn keeps_requested_and_mandatory() {
        let obs = json!({"resourceType":"Observation","id":"1","status":"final","code":{"text":"x"},
            "valueQuantity":{"value":1},"subject":{"reference":"Patient/1"},"note":[{"text":"n"}]});
        let subset = Subset::Elements(vec!["value".into(), "subject".into()]);
        let cut = subset.apply(&serde_json::to_vec(&obs).unwrap()).unwrap();
        let out: Json = serde_json::from_slice(&cut).unwrap();
        let keys: Vec<&String> = out.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "resourceType",
                "id",
                "status",
                "code",
                "valueQuantity",
                "subject",
                "meta"
            ]
        );
        assert_eq!(out["meta"]["tag"][0]["code"], "SUBSETTED");
    }

    #[test]
    fn element_lists() {
        assert_eq!(
            parse_elements(" name, Patient.birthDate,,_id ,"),
            ["name", "birthDate", "_id"]
        );
        assert!(parse_elements("").is_empty());
    }

    fn pairs(text: &str) -> Vec<(String, String)> {
        crate::query::parse_query_string(text)
    }

    #[test]
    fn read_subsets() {
        assert_eq!(read_subset(&pairs("")).unwrap(), None);
        assert_eq!(read_subset(&pairs("_summary=false")).unwrap(), None);
        assert_eq!(
            read_subset(&pairs("_summary=true")).unwrap(),
            Some(Subset::Summary)
        );
        assert_eq!(
            read_subset(&pairs("_summary=text&_summary=text")).unwrap(),
            Some(Subset::Text)
        );
        assert_eq!(
            read_subset(&pairs("_summary=data&_format=json")).unwrap(),
            Some(Subset::Data)
        );
        assert_eq!(
            read_subset(&pairs("_elements=Patient.name,gender&_elements=birthDate")).unwrap(),
            Some(Subset::Elements(vec![
                "name".into(),
                "gender".into(),
                "birthDate".into()
            ]))
        );
        assert_eq!(
            read_subset(&pairs("_summary=false&_elements=name")).unwrap(),
            Some(Subset::Elements(vec!["name".into()]))
        );
        for bad in [
            "_summary=count",
            "_summary=yes",
            "_summary=true&_summary=data",
            "_summary=true&_elements=name",
            "_elements=name&_summary=text",
        ] {
            let e = read_subset(&pairs(bad)).unwrap_err();
            assert!(
                matches!(&e, SearchError::InvalidValue { param, .. } if param == "_summary"),
                "{bad}: {e:?}"
            );
        }
    }
}
