//! SMART system scopes, v1 (`system/Patient.read`) and v2 (`system/Patient.rs`) syntax.
//!
//! A scope string is parsed into [`Scopes`]: a permission set that applies to every type (from
//! `system/*.…`) plus per-type permission sets. Both syntaxes map onto the five v2 permissions
//! `c r u d s`: v1 `read` = `rs`, v1 `write` = `cud`, v1 `*` = `cruds`.
//!
//! Only the `system/` context exists for backend services; `patient/`, `user/`, launch scopes,
//! v2 search-parameter constraints (`?category=…`) and unknown resource types are refused, so a
//! client never receives less protection than it asked for by accident.

use std::collections::BTreeMap;
use std::fmt;

/// One of the SMART v2 permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    /// All permissions, in the order their letters must appear (`cruds`).
    pub const ALL: [Permission; 5] = [
        Permission::Create,
        Permission::Read,
        Permission::Update,
        Permission::Delete,
        Permission::Search,
    ];

    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }

    fn bit(self) -> u8 {
        match self {
            Permission::Create => 1,
            Permission::Read => 2,
            Permission::Update => 4,
            Permission::Delete => 8,
            Permission::Search => 16,
        }
    }
}

/// A set of [`Permission`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct PermSet(u8);

impl PermSet {
    pub const EMPTY: PermSet = PermSet(0);
    /// `cruds`, v1 `*`.
    pub const ALL: PermSet = PermSet(31);
    /// v1 `read`: reading and searching.
    pub const V1_READ: PermSet = PermSet(2 | 16);
    /// v1 `write`: creating, updating and deleting.
    pub const V1_WRITE: PermSet = PermSet(1 | 4 | 8);

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn union(self, other: PermSet) -> PermSet {
        PermSet(self.0 | other.0)
    }
    pub fn intersect(self, other: PermSet) -> PermSet {
        PermSet(self.0 & other.0)
    }
    /// The permissions in `self` that are not in `other`.
    pub fn minus(self, other: PermSet) -> PermSet {
        PermSet(self.0 & !other.0)
    }
    pub fn with(self, p: Permission) -> PermSet {
        PermSet(self.0 | p.bit())
    }

    /// The v2 letters, in `cruds` order.
    pub fn letters(self) -> String {
        Permission::ALL
            .iter()
            .filter(|p| self.contains(**p))
            .map(|p| p.letter())
            .collect()
    }

    /// The v1 action naming exactly this set, when there is one.
    fn v1_action(self) -> Option<&'static str> {
        match self {
            PermSet::ALL => Some("*"),
            PermSet::V1_READ => Some("read"),
            PermSet::V1_WRITE => Some("write"),
            _ => None,
        }
    }

    /// Parses v2 letters: a non-empty subsequence of `cruds`, each letter at most once, in order.
    fn parse_v2(letters: &str) -> Option<PermSet> {
        let mut set = PermSet::EMPTY;
        let mut next = 0usize;
        for ch in letters.chars() {
            let idx = Permission::ALL[next..]
                .iter()
                .position(|p| p.letter() == ch)?;
            set = set.with(Permission::ALL[next + idx]);
            next += idx + 1;
        }
        (!set.is_empty()).then_some(set)
    }
}

/// Which SMART syntax a scope was written in; the granted scope is rendered in the same one when it can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeSyntax {
    V1,
    V2,
}

/// A scope string that cannot be accepted. The offending token is quoted: scopes are not secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("the scope is empty")]
    Empty,
    #[error("scope `{scope}`: only `system/` scopes are supported by backend services")]
    UnsupportedContext { scope: String },
    #[error("scope `{scope}`: expected `system/<Type or *>.<action>`")]
    Malformed { scope: String },
    #[error("scope `{scope}`: `{resource_type}` is not a FHIR R4 resource type")]
    UnknownResourceType {
        scope: String,
        resource_type: String,
    },
    #[error(
        "scope `{scope}`: unknown action `{action}` (v1: read, write, *; v2: letters from `cruds` in that order)"
    )]
    UnknownAction { scope: String, action: String },
    #[error("scope `{scope}`: search-parameter constraints on scopes are not supported")]
    ConstraintsUnsupported { scope: String },
}

/// Granted permissions: some for every type, some per type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes {
    all_types: PermSet,
    per_type: BTreeMap<String, PermSet>,
    /// Every token was written in v1 syntax (affects rendering only).
    v1_only: bool,
    /// Mode `none`: everything is allowed, including types outside the R4 list.
    unrestricted: bool,
}

impl Scopes {
    /// Parses a space-separated SMART scope string. Every token must be a valid `system/` scope.
    pub fn parse(scope: &str) -> Result<Scopes, ScopeError> {
        let mut scopes = Scopes {
            v1_only: true,
            ..Scopes::default()
        };
        let mut any = false;
        for token in scope.split_ascii_whitespace() {
            any = true;
            let (target, perms, syntax) = parse_token(token)?;
            if syntax == ScopeSyntax::V2 {
                scopes.v1_only = false;
            }
            scopes.add(target, perms);
        }
        if !any {
            return Err(ScopeError::Empty);
        }
        Ok(scopes)
    }

    /// Everything allowed, for mode `none`.
    pub fn unrestricted() -> Scopes {
        Scopes {
            all_types: PermSet::ALL,
            unrestricted: true,
            ..Scopes::default()
        }
    }

    fn add(&mut self, target: Option<String>, perms: PermSet) {
        match target {
            None => self.all_types = self.all_types.union(perms),
            Some(ty) => {
                let entry = self.per_type.entry(ty).or_default();
                *entry = entry.union(perms);
            }
        }
    }

    /// The permissions held on `resource_type`.
    pub fn permissions(&self, resource_type: &str) -> PermSet {
        let specific = self
            .per_type
            .get(resource_type)
            .copied()
            .unwrap_or_default();
        self.all_types.union(specific)
    }

    pub fn allows(&self, resource_type: &str, p: Permission) -> bool {
        if self.unrestricted {
            return true;
        }
        is_concrete_type(resource_type) && self.permissions(resource_type).contains(p)
    }

    /// Reading an instance (read, vread, instance history): the `r` permission (v1 `read`).
    pub fn can_read(&self, resource_type: &str) -> bool {
        self.allows(resource_type, Permission::Read)
    }

    /// Searching (and, with `r`, type and system history): the `s` permission (v1 `read`).
    pub fn can_search(&self, resource_type: &str) -> bool {
        self.allows(resource_type, Permission::Search)
    }

    /// Bulk export reads a whole population, so it takes both `r` and `s` (v1 `read`), as the
    /// Microsoft FHIR server also requires.
    pub fn can_export(&self, resource_type: &str) -> bool {
        self.can_read(resource_type) && self.can_search(resource_type)
    }

    /// v1 `write` semantics: create, update and delete. Handlers that know the exact interaction
    /// should ask [`Scopes::allows`] with `Create`, `Update` or `Delete` instead.
    pub fn can_write(&self, resource_type: &str) -> bool {
        [Permission::Create, Permission::Update, Permission::Delete]
            .iter()
            .all(|p| self.allows(resource_type, *p))
    }

    /// Whether `p` is held on every type the server stores: each concrete R4 resource type and
    /// `ViewDefinition` (what a system-level interaction, e.g. system `_history`, may return).
    pub fn allows_on_every_type(&self, p: Permission) -> bool {
        self.unrestricted
            || (self.allows(VIEW_DEFINITION, p)
                && fhir_model::r4()
                    .resource_types()
                    .iter()
                    .all(|t| self.allows(t, p)))
    }

    /// The concrete R4 resource types that may be read (`r`), sorted.
    pub fn readable_types(&self) -> Vec<String> {
        self.types_where(|s, t| s.can_read(t))
    }

    /// The concrete R4 resource types that may be exported (`r` and `s`), sorted. This is the
    /// `$export` type list when the request has no `_type`.
    pub fn exportable_types(&self) -> Vec<String> {
        self.types_where(|s, t| s.can_export(t))
    }

    fn types_where(&self, keep: impl Fn(&Scopes, &str) -> bool) -> Vec<String> {
        fhir_model::r4()
            .resource_types()
            .iter()
            .filter(|t| keep(self, t))
            .cloned()
            .collect()
    }

    /// The all-allowing scopes of mode `none`.
    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    pub fn is_empty(&self) -> bool {
        !self.unrestricted
            && self.all_types.is_empty()
            && self.per_type.values().all(|p| p.is_empty())
    }

    /// The part of `requested` that `self` (a client's registered maximum) covers. Requested
    /// permissions beyond the registration are dropped; the caller refuses an empty result.
    pub fn intersect(&self, requested: &Scopes) -> Scopes {
        let mut out = Scopes {
            v1_only: requested.v1_only,
            ..Scopes::default()
        };
        out.all_types = requested.all_types.intersect(self.all_types);
        // Types named on either side can gain permissions beyond the wildcard part.
        let mut types: Vec<&String> = requested.per_type.keys().collect();
        types.extend(self.per_type.keys());
        for ty in types {
            let granted = requested
                .permissions(ty)
                .intersect(self.permissions(ty))
                .minus(out.all_types);
            if !granted.is_empty() {
                out.add(Some(ty.clone()), granted);
            }
        }
        out
    }

    /// Renders the scopes as a space-separated string: the wildcard first, then types in order,
    /// each listing only what the wildcard does not already give. v1 syntax is kept when every
    /// token of the request was v1 and every set has a v1 name.
    pub fn render(&self) -> String {
        if self.unrestricted {
            return "system/*.cruds".to_owned();
        }
        let mut parts: Vec<(String, PermSet)> = Vec::new();
        if !self.all_types.is_empty() {
            parts.push(("*".to_owned(), self.all_types));
        }
        for (ty, perms) in &self.per_type {
            let extra = perms.minus(self.all_types);
            if !extra.is_empty() {
                parts.push((ty.clone(), extra));
            }
        }
        let v1 = self.v1_only && parts.iter().all(|(_, p)| p.v1_action().is_some());
        parts
            .iter()
            .map(|(ty, p)| {
                let action = match (v1, p.v1_action()) {
                    (true, Some(a)) => a.to_owned(),
                    _ => p.letters(),
                };
                format!("system/{ty}.{action}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// SQL on FHIR v2's logical model, stored by the server like a resource.
const VIEW_DEFINITION: &str = "ViewDefinition";

/// A concrete R4 resource type (not `Resource` or `DomainResource`), or `ViewDefinition` (SQL on
/// FHIR v2's logical model, stored by the server like a resource).
fn is_concrete_type(name: &str) -> bool {
    name == VIEW_DEFINITION
        || fhir_model::r4()
            .resource_types()
            .binary_search_by(|t| t.as_str().cmp(name))
            .is_ok()
}

/// One `system/<target>.<action>` token: target `None` is `*`.
fn parse_token(token: &str) -> Result<(Option<String>, PermSet, ScopeSyntax), ScopeError> {
    // Errors quote the token, escaped and shortened: it is echoed to the client and logged.
    let scope = || crate::log_safe(token);
    let Some((context, rest)) = token.split_once('/') else {
        return Err(if token.contains('.') {
            ScopeError::Malformed { scope: scope() }
        } else {
            // `launch`, `openid`, `offline_access`, …: meaningless for backend services.
            ScopeError::UnsupportedContext { scope: scope() }
        });
    };
    if context != "system" {
        return Err(ScopeError::UnsupportedContext { scope: scope() });
    }
    if rest.contains('?') {
        return Err(ScopeError::ConstraintsUnsupported { scope: scope() });
    }
    let Some((target, action)) = rest.split_once('.') else {
        return Err(ScopeError::Malformed { scope: scope() });
    };
    if target.is_empty() || action.is_empty() {
        return Err(ScopeError::Malformed { scope: scope() });
    }
    let target = if target == "*" {
        None
    } else if is_concrete_type(target) {
        Some(target.to_owned())
    } else {
        return Err(ScopeError::UnknownResourceType {
            scope: scope(),
            resource_type: crate::log_safe(target),
        });
    };
    let (perms, syntax) = match action {
        "read" => (PermSet::V1_READ, ScopeSyntax::V1),
        "write" => (PermSet::V1_WRITE, ScopeSyntax::V1),
        "*" => (PermSet::ALL, ScopeSyntax::V1),
        letters => match PermSet::parse_v2(letters) {
            Some(p) => (p, ScopeSyntax::V2),
            None => {
                return Err(ScopeError::UnknownAction {
                    scope: scope(),
                    action: crate::log_safe(action),
                });
            }
        },
    };
    Ok((target, perms, syntax))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_letters_must_be_ordered_and_unique() {
        assert_eq!(PermSet::parse_v2("cruds"), Some(PermSet::ALL));
        assert_eq!(PermSet::parse_v2("rs"), Some(PermSet::V1_READ));
        assert_eq!(PermSet::parse_v2("sr"), None);
        assert_eq!(PermSet::parse_v2("rr"), None);
        assert_eq!(PermSet::parse_v2("x"), None);
        assert_eq!(PermSet::parse_v2(""), None);
    }

    #[test]
    fn every_type_includes_view_definition() {
        let every_r4: Vec<String> = fhir_model::r4()
            .resource_types()
            .iter()
            .map(|t| format!("system/{t}.rs"))
            .collect();
        let s = Scopes::parse(&every_r4.join(" ")).unwrap();
        assert!(!s.allows_on_every_type(Permission::Read));
        let s = Scopes::parse(&format!("{} system/ViewDefinition.rs", every_r4.join(" "))).unwrap();
        assert!(s.allows_on_every_type(Permission::Read));
        assert!(s.allows_on_every_type(Permission::Search));
        assert!(!s.allows_on_every_type(Permission::Create));
        assert!(
            Scopes::parse("system/*.rs")
                .unwrap()
                .allows_on_every_type(Permission::Search)
        );
        assert!(Scopes::unrestricted().allows_on_every_type(Permission::Delete));
    }

    #[test]
    fn render_keeps_v1_when_possible() {
        let s = Scopes::parse("system/Patient.read system/*.write").unwrap();
        assert_eq!(s.render(), "system/*.write system/Patient.read");
        let s = Scopes::parse("system/Patient.rs system/Observation.r").unwrap();
        assert_eq!(s.render(), "system/Observation.r system/Patient.rs");
    }
}
