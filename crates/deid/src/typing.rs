//! Node typing both walkers share: a nested resource's type, an element's type definition.
//! Depends on the model only.

use serde_json::{Map, Value as Json};

/// `o.get("resourceType")` without hashing the key (serde_json's maps hash with SipHash): a
/// resource names its type first as a rule, and other objects are small.
pub(crate) fn resource_type_of(o: &Map<String, Json>) -> Option<&Json> {
    o.iter()
        .find(|(k, _)| k.as_str() == "resourceType")
        .map(|(_, v)| v)
}

thread_local! {
    /// Type definitions by the address of a type name inside the model (element types).
    static ELEMENT_TYPES: std::cell::RefCell<
        rustc_hash::FxHashMap<(usize, usize), Option<&'static fhir_model::TypeDef>>,
    > = std::cell::RefCell::new(rustc_hash::FxHashMap::default());
}

/// `model.type_def(name)` for a type name borrowed from the model (`ChildRef::type_name`): the
/// same definition, found by the name's address instead of hashing its text.
pub(crate) fn element_type_def(name: &'static str) -> Option<&'static fhir_model::TypeDef> {
    let key = (name.as_ptr() as usize, name.len());
    ELEMENT_TYPES.with(|cell| {
        if let Some(d) = cell.borrow().get(&key) {
            return *d;
        }
        let d = fhir_model::r4().type_def(name);
        cell.borrow_mut().insert(key, d);
        d
    })
}

/// The definition of an element's declared type, for the complex types the walks descend into;
/// `None` for a primitive type (lower case: the walks need no definition) or one the model lacks.
pub(crate) fn declared_def(
    child: fhir_model::ChildRef<'static>,
) -> Option<&'static fhir_model::TypeDef> {
    if child
        .type_name
        .starts_with(|c: char| c.is_ascii_lowercase())
    {
        None
    } else {
        fhir_model::r4().child_def(child)
    }
}
