//! Type functions (`type()`, `hasValue()`, `getValue()`, `conformsTo()`), the type test of
//! `is`/`as`/`ofType`, and the functions that need terminology services or profiles.

use std::borrow::Cow;

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::{Expr, TypeSpec};
use crate::value::SystemValue;

use super::{Env, R, b, eval, misrouted, single, single_string};

/// `type()`, `hasValue()`, `getValue()`, `conformsTo()` and the unsupported functions.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    use SystemValue as S;
    match f {
        F::Is | F::As | F::OfType => {
            Err(EvalError::ty(format!("{}() needs a type name", f.name())))
        }
        F::Type => Ok(focus
            .iter()
            .map(|i| {
                Item::Value(S::TypeInfo {
                    namespace: i.namespace(),
                    name: Cow::Owned(i.type_name().to_string()),
                })
            })
            .collect()),
        F::HasValue => b(match focus.as_slice() {
            [Item::Node(n)] => n.is_primitive() && n.json().is_some() && n.fhir_type() != "xhtml",
            [Item::Value(v)] => !matches!(v, S::Quantity(_) | S::TypeInfo { .. }),
            _ => false,
        }),
        F::GetValue => Ok(match focus.as_slice() {
            [i @ Item::Node(n)] if n.is_primitive() && n.fhir_type() != "xhtml" => {
                i.to_system().map(Item::Value).into_iter().collect()
            }
            [Item::Value(v)] if !matches!(v, S::Quantity(_) | S::TypeInfo { .. }) => focus.clone(),
            _ => Vec::new(),
        }),
        F::ConformsTo => {
            let Some(url) = single_string(&eval(&args[0], env, input)?, "conformsTo")? else {
                return Ok(Vec::new());
            };
            // Only the core definitions are known: a profile URL needs a profile registry.
            let Some(ty) = url.strip_prefix("http://hl7.org/fhir/StructureDefinition/") else {
                return Err(EvalError::Unsupported(format!(
                    "conformsTo('{url}'): profiles are not available"
                )));
            };
            if fhir_model::r4().type_def(ty).is_none() {
                return Err(EvalError::Unsupported(format!(
                    "conformsTo('{url}'): profiles are not available"
                )));
            }
            let Some(item) = single(&focus, "conformsTo")? else {
                return Ok(Vec::new());
            };
            b(match item {
                Item::Node(n) => fhir_model::r4().is_subtype_of(n.fhir_type(), ty),
                Item::Value(_) => false,
            })
        }
        F::MemberOf
        | F::Subsumes
        | F::SubsumedBy
        | F::HtmlChecks
        | F::ElementDefinition
        | F::Slice
        | F::CheckModifiers => Err(EvalError::Unsupported(format!(
            "{}() needs terminology services or profiles, which this engine does not have",
            f.name()
        ))),
        _ => Err(misrouted(f)),
    }
}

const SYSTEM_TYPES: [&str; 9] = [
    "Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity", "Long",
];

pub(crate) fn is_type(item: &Item<'_>, spec: &TypeSpec) -> bool {
    let ns = spec.namespace.as_deref();
    let name = spec.name.as_str();
    match item {
        Item::Node(n) if !n.ty.is_empty() => {
            if ns == Some("System") {
                return false;
            }
            match (&spec.subtypes, n.info) {
                (Some(list), Some(i)) => list.contains(&(std::ptr::from_ref(i) as usize)),
                (None, Some(i)) => i.is_a(name),
                (_, None) => n.ty == name,
            }
        }
        _ => {
            if ns == Some("FHIR") {
                return false;
            }
            if ns.is_none() && !SYSTEM_TYPES.contains(&name) {
                return false;
            }
            item.to_system().is_some_and(|v| v.type_name() == name)
        }
    }
}
