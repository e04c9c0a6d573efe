//! A navigation index over the R4 model, built once: per type, its JSON keys (choice keys expanded)
//! and its ancestors, in maps with a cheap hash. Navigation runs these lookups for every node, so
//! they must not cost a SipHash of the type name each time.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// FNV-1a: keys are short ASCII names.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// One JSON key of a type.
#[derive(Debug)]
pub(crate) struct Child {
    /// Element name (`value` for `valueQuantity`).
    pub name: &'static str,
    /// Concrete type code of this key (`Quantity`, `string`, `Resource`, `Patient.contact`).
    pub ty: &'static str,
    /// Whether values of this key are FHIR primitives (and so may have a `_key` shadow).
    pub primitive: bool,
    /// The entry of `ty`, resolved on first use (entries cannot point at each other while the
    /// index is being built).
    ty_info: OnceLock<Option<&'static TypeInfo>>,
}

impl Child {
    pub(crate) fn info(&'static self) -> Option<&'static TypeInfo> {
        *self.ty_info.get_or_init(|| info(self.ty))
    }
}

#[derive(Debug)]
pub(crate) struct TypeInfo {
    /// Derives from `Resource`.
    pub is_resource: bool,
    /// The type itself, then its bases up to the root.
    pub ancestors: Vec<&'static str>,
    /// JSON key -> child.
    pub children: FnvMap<&'static str, Child>,
    /// Element names of choice elements (`value`, `onset`).
    pub choices: FnvMap<&'static str, ()>,
    /// [`subtypes_of`] this type, computed on first use (a scan of the whole index, which every
    /// compilation of `ofType(T)`, `is T` or `as T` would otherwise repeat).
    subtypes: OnceLock<Vec<usize>>,
}

fn index() -> &'static FnvMap<&'static str, TypeInfo> {
    static INDEX: OnceLock<FnvMap<&'static str, TypeInfo>> = OnceLock::new();
    INDEX.get_or_init(|| {
        let model = fhir_model::r4();
        let mut names: Vec<&'static str> = Vec::new();
        // The model has no iterator over types; collect names reachable from resources and elements.
        let mut stack: Vec<&'static str> =
            model.resource_types().iter().map(String::as_str).collect();
        stack.extend([
            "Resource",
            "DomainResource",
            "Element",
            "BackboneElement",
            "Extension",
            "Quantity",
            "Age",
            "Count",
            "Distance",
            "Duration",
            "Money",
            "SimpleQuantity",
            "MoneyQuantity",
        ]);
        let mut seen: FnvMap<&'static str, ()> = FnvMap::default();
        while let Some(n) = stack.pop() {
            if seen.insert(n, ()).is_some() {
                continue;
            }
            let Some(td) = model.type_def(n) else {
                continue;
            };
            names.push(td.name.as_str());
            if let Some(b) = td.base.as_deref() {
                stack.push(b);
            }
            for e in &td.elements {
                for t in &e.types {
                    stack.push(t.as_str());
                }
            }
        }
        let mut map = FnvMap::default();
        for n in names {
            let Some(td) = model.type_def(n) else {
                continue;
            };
            let mut ancestors = vec![td.name.as_str()];
            let mut cur = td.base.as_deref();
            while let Some(b) = cur {
                let Some(bd) = model.type_def(b) else { break };
                ancestors.push(bd.name.as_str());
                cur = bd.base.as_deref();
            }
            let mut children = FnvMap::default();
            let mut choices = FnvMap::default();
            for e in &td.elements {
                let is_prim = |t: &str| model.is_primitive(t);
                if e.choice {
                    choices.insert(e.name.as_str(), ());
                    for t in &e.types {
                        let key: &'static str = Box::leak(choice_key(&e.name, t).into_boxed_str());
                        children.insert(
                            key,
                            Child {
                                name: e.name.as_str(),
                                ty: t.as_str(),
                                primitive: is_prim(t),
                                ty_info: OnceLock::new(),
                            },
                        );
                    }
                } else if let Some(t) = e.types.first() {
                    children.insert(
                        e.name.as_str(),
                        Child {
                            name: e.name.as_str(),
                            ty: t.as_str(),
                            primitive: is_prim(t),
                            ty_info: OnceLock::new(),
                        },
                    );
                }
            }
            map.insert(
                td.name.as_str(),
                TypeInfo {
                    is_resource: ancestors.contains(&"Resource"),
                    ancestors,
                    children,
                    choices,
                    subtypes: OnceLock::new(),
                },
            );
        }
        map
    })
}

fn choice_key(name: &str, ty: &str) -> String {
    let mut chars = ty.chars();
    match chars.next() {
        Some(first) => format!("{name}{}{}", first.to_ascii_uppercase(), chars.as_str()),
        None => name.to_string(),
    }
}

/// The navigation index entry of a type, `None` for names outside the model.
pub(crate) fn info(name: &str) -> Option<&'static TypeInfo> {
    if name.is_empty() {
        return None;
    }
    index().get(name)
}

/// `Element`, whose children (`id`, `extension`) a primitive's shadow object holds.
pub(crate) fn element() -> Option<&'static TypeInfo> {
    static ELEMENT: OnceLock<Option<&'static TypeInfo>> = OnceLock::new();
    *ELEMENT.get_or_init(|| info("Element"))
}

/// The index entries (as addresses) of the types that are `name` or derive from it.
/// A name outside the index has none: every ancestor of an entry is itself an entry.
pub(crate) fn subtypes_of(name: &str) -> Vec<usize> {
    let Some(entry) = info(name) else {
        return Vec::new();
    };
    entry
        .subtypes
        .get_or_init(|| {
            index()
                .values()
                .filter(|i| i.is_a(name))
                .map(|i| std::ptr::from_ref(i) as usize)
                .collect()
        })
        .clone()
}

impl TypeInfo {
    pub(crate) fn is_a(&self, name: &str) -> bool {
        self.ancestors.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtypes_of_matches_a_scan_of_the_index() {
        let scan = |name: &str| -> Vec<usize> {
            let mut v: Vec<usize> = index()
                .values()
                .filter(|i| i.is_a(name))
                .map(|i| std::ptr::from_ref(i) as usize)
                .collect();
            v.sort_unstable();
            v
        };
        let names: Vec<&str> = index().keys().copied().chain(["NoSuchType", ""]).collect();
        for name in names {
            for _ in 0..2 {
                let mut got = subtypes_of(name);
                got.sort_unstable();
                assert_eq!(got, scan(name), "{name}");
            }
        }
        assert!(subtypes_of("Quantity").len() > 1);
    }

    /// `nodesByType` (registry.rs) relies on it: the name FHIRPath reports for a backbone element
    /// is `BackboneElement` or `Element`.
    #[test]
    fn backbone_elements_derive_from_backbone_element_or_element() {
        for (name, entry) in index() {
            if name.contains('.') {
                let base = entry.ancestors.get(1).copied().unwrap_or("BackboneElement");
                assert!(
                    matches!(base, "BackboneElement" | "Element"),
                    "{name}: {base}"
                );
            }
        }
    }

    #[test]
    fn index_covers_types() {
        let obs = info("Observation").unwrap();
        assert_eq!(obs.children.get("valueQuantity").unwrap().ty, "Quantity");
        assert!(obs.choices.contains_key("value"));
        assert!(obs.is_a("DomainResource"));
        assert!(info("Age").unwrap().is_a("Quantity"));
        assert!(info("Patient.contact").is_some());
        assert!(
            info("HumanName")
                .unwrap()
                .children
                .get("given")
                .unwrap()
                .primitive
        );
    }
}
