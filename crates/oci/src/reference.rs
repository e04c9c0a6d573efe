//! Image references (`registry/name:tag`, `registry/name@sha256:…`) and allow-list entries,
//! validated strictly after the OCI distribution spec grammar. A registry is always explicit: there
//! is no implicit `docker.io`, so `library/ubuntu:22.04` is rejected rather than guessed.

use std::fmt;
use std::str::FromStr;

use crate::OciError;

/// Longest accepted `registry/repository` (the distribution spec's usual bound on names).
const MAX_NAME_LEN: usize = 255;
/// Longest accepted tag (from the distribution spec).
const MAX_TAG_LEN: usize = 128;

/// A parsed OCI image reference. `registry` is lower-cased (host names are case-insensitive);
/// at least one of `tag` and `digest` is present, and when both are, the digest decides what is
/// fetched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `host[:port]`, e.g. `myregistry.azurecr.io` or `127.0.0.1:5001`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `deid/configs`.
    pub repository: String,
    /// Tag, e.g. `v1`.
    pub tag: Option<String>,
    /// Manifest digest `sha256:<64 lowercase hex>`.
    pub digest: Option<String>,
}

impl FromStr for ImageRef {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| OciError::InvalidReference(format!("'{s}': {why}"));
        if s.is_empty() {
            return Err(invalid("empty reference"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((name_tag, digest)) => {
                check_digest(digest).map_err(|why| invalid(&why))?;
                (name_tag, Some(digest.to_string()))
            }
            None => (s, None),
        };
        // A ':' after the last '/' separates the tag; one before it is the registry's port.
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&name_tag[..colon], Some(&name_tag[colon + 1..]))
            }
            _ => (name_tag, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|why| invalid(&why))?;
        }
        if tag.is_none() && digest.is_none() {
            return Err(invalid(
                "a tag (':tag') or a digest ('@sha256:…') is required",
            ));
        }
        let Some((registry, repository)) = name.split_once('/') else {
            return Err(invalid(
                "the registry is missing (expected 'registry/name:tag' or 'registry/name@sha256:…')",
            ));
        };
        check_registry(registry).map_err(|why| invalid(&why))?;
        if !looks_like_registry(registry) {
            return Err(invalid(&format!(
                "'{registry}' is not a registry host: it needs a '.', a ':port' or to be 'localhost'"
            )));
        }
        check_repository(repository).map_err(|why| invalid(&why))?;
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(&format!(
                "the name is longer than {MAX_NAME_LEN} characters"
            )));
        }
        Ok(ImageRef {
            registry: registry.to_ascii_lowercase(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    /// The canonical form: `registry/repository[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// One entry of the server's allow-list: a whole registry (`host[:port]`), one repository in it
/// (`host[:port]/repo`), or one image pinned by digest (`host[:port]/repo@sha256:…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowEntry {
    /// `host[:port]`, lower-cased.
    pub registry: String,
    /// Repository that must match exactly, if any.
    pub repository: Option<String>,
    /// Manifest digest the reference must be pinned to, if any.
    pub digest: Option<String>,
}

impl FromStr for AllowEntry {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| OciError::InvalidReference(format!("'{s}': {why}"));
        if s.is_empty() {
            return Err(invalid("empty allow-list entry"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => {
                check_digest(digest).map_err(|why| invalid(&why))?;
                (name, Some(digest.to_string()))
            }
            None => (s, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((registry, repository)) => {
                check_repository(repository).map_err(|why| invalid(&why))?;
                (registry, Some(repository.to_string()))
            }
            None => (name, None),
        };
        check_registry(registry).map_err(|why| invalid(&why))?;
        if digest.is_some() && repository.is_none() {
            return Err(invalid(
                "a digest needs a repository ('host/repo@sha256:…')",
            ));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(&format!(
                "the name is longer than {MAX_NAME_LEN} characters"
            )));
        }
        Ok(AllowEntry {
            registry: registry.to_ascii_lowercase(),
            repository,
            digest,
        })
    }
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.registry)?;
        if let Some(repository) = &self.repository {
            write!(f, "/{repository}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl AllowEntry {
    /// Whether this entry admits `image`: same registry, and the same repository and pinned digest
    /// where the entry names them (an entry with a digest admits only references pinned to it).
    pub fn allows(&self, image: &ImageRef) -> bool {
        self.registry.eq_ignore_ascii_case(&image.registry)
            && self
                .repository
                .as_ref()
                .is_none_or(|repository| *repository == image.repository)
            && self
                .digest
                .as_ref()
                .is_none_or(|digest| image.digest.as_ref() == Some(digest))
    }
}

/// `sha256:` followed by exactly 64 lowercase hex digits.
pub(crate) fn check_digest(digest: &str) -> Result<(), String> {
    let Some(hex) = digest.strip_prefix("sha256:") else {
        return Err(format!(
            "digest '{digest}' is not of the form 'sha256:<64 lowercase hex digits>'"
        ));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "digest '{digest}' is not of the form 'sha256:<64 lowercase hex digits>'"
        ));
    }
    Ok(())
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag '{tag}' is invalid (1–128 of letters, digits, '.', '_', '-', not starting with '.' or '-')"
        ))
    }
}

/// `host[:port]` where host is dot-separated DNS labels (letters, digits, inner '-') and port is
/// 1–65535. IPv4 addresses are accepted as labels; IPv6 literals are not.
fn check_registry(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("registry host '{registry}' is invalid"));
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err(format!("registry port in '{registry}' is invalid"));
        }
    }
    Ok(())
}

/// Docker's rule for telling a registry from a first path component.
fn looks_like_registry(registry: &str) -> bool {
    registry.contains('.') || registry.contains(':') || registry.eq_ignore_ascii_case("localhost")
}

/// `component ('/' component)*`, each `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("the repository name is empty".to_string());
    }
    for component in repository.split('/') {
        if !path_component_ok(component) {
            return Err(format!(
                "repository '{repository}' is invalid: component '{component}' must be lowercase \
                 letters and digits, separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

fn path_component_ok(component: &str) -> bool {
    let b = component.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut i = 0;
    // Alternating: a run of [a-z0-9]+, then a separator, then a run again, …, ending on a run.
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep_start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &b[sep_start..i];
        let sep_ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&c| c == b'-');
        if !sep_ok {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(s: &str) -> ImageRef {
        s.parse()
            .unwrap_or_else(|e| panic!("{s} should parse: {e}"))
    }

    fn bad(s: &str) -> String {
        match s.parse::<ImageRef>() {
            Ok(r) => panic!("{s} should be rejected, got {r:?}"),
            Err(OciError::InvalidReference(m)) => m,
            Err(e) => panic!("{s}: wrong error {e:?}"),
        }
    }

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = ok("myregistry.azurecr.io/deid/configs:v1");
        assert_eq!(r.registry, "myregistry.azurecr.io");
        assert_eq!(r.repository, "deid/configs");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "myregistry.azurecr.io/deid/configs:v1");

        let r = ok(&format!("127.0.0.1:5001/cfg@{D}"));
        assert_eq!(r.registry, "127.0.0.1:5001");
        assert_eq!(r.repository, "cfg");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));

        let r = ok(&format!("localhost:5000/a/b/c:1.0_rc-2@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1.0_rc-2"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_string(), format!("localhost:5000/a/b/c:1.0_rc-2@{D}"));

        let r = ok("localhost/x:latest");
        assert_eq!(r.registry, "localhost");
        let r = ok("MyRegistry.AzureCR.io/a:_t");
        assert_eq!(r.registry, "myregistry.azurecr.io");
        ok("r.io/a.b/c_d/e__f/g---h/i-j:T");
        ok(&format!("r.io/a:{}", "x".repeat(128)));
    }

    #[test]
    fn rejects_malformed_references() {
        for s in [
            "",
            "r.io/a",                 // neither tag nor digest
            "library/ubuntu:22.04",   // no registry host
            "ubuntu:22.04",           // no registry at all
            "r.io/A:1",               // uppercase repository
            "r.io/a//b:1",            // empty component
            "r.io/a/:1",              // trailing slash
            "r.io/-a:1",              // leading separator
            "r.io/a-:1",              // trailing separator
            "r.io/a..b:1",            // double dot
            "r.io/a___b:1",           // triple underscore
            "r.io/a._b:1",            // mixed separator
            "r.io/a:",                // empty tag
            "r.io/a:.x",              // tag starting with '.'
            "r.io/a:-x",              // tag starting with '-'
            "r.io/a:x/y",             // tag with slash (read as repo + invalid tag)
            "r.io/a:x y",             // space
            "r.io/a@sha256:abc",      // short digest
            "r.io/a@sha512:00",       // other algorithm
            "r.io/a@",                // empty digest
            "r.io/a:1@",              // empty digest after tag
            "r.io:0/a:1",             // port 0
            "r.io:65536/a:1",         // port out of range
            "r.io:/a:1",              // empty port
            "r.io:12a/a:1",           // non-numeric port
            "-r.io/a:1",              // bad host label
            "r..io/a:1",              // empty host label
            "r_io.com/a:1",           // underscore in host
            "[::1]:5000/a:1",         // IPv6 not supported
            "r.io/a:1@sha256:ABCDEF", // uppercase / short digest
            "r.io/a\u{e9}:1",         // non-ASCII
            "r.io/a:1\n",             // newline
            " r.io/a:1",              // leading space
            "r.io/a@b@sha256:00",     // two '@'
            "/a:1",                   // empty registry
            "https://r.io/a:1",       // URL, not a reference
            "r.io/../etc:1",          // traversal
        ] {
            bad(s);
        }
        let long_tag = format!("r.io/a:{}", "x".repeat(129));
        bad(&long_tag);
        let long_name = format!("r.io/{}:1", "a".repeat(260));
        assert!(bad(&long_name).contains("longer"));
        let upper_digest = format!("r.io/a@{}", D.to_uppercase().replace("SHA256", "sha256"));
        bad(&upper_digest);
        assert!(bad("r.io/a").contains("tag"));
        assert!(bad("library/ubuntu:22.04").contains("registry"));
    }

    #[test]
    fn allow_entries_parse_and_match() {
        let any: AllowEntry = "Registry.IO".parse().unwrap();
        assert_eq!(any.registry, "registry.io");
        assert_eq!(any.repository, None);
        let repo: AllowEntry = "registry.io:443/deid/configs".parse().unwrap();
        assert_eq!(repo.registry, "registry.io:443");
        assert_eq!(repo.repository.as_deref(), Some("deid/configs"));
        let pinned: AllowEntry = format!("registry.io/deid/configs@{D}").parse().unwrap();
        assert_eq!(pinned.digest.as_deref(), Some(D));
        assert_eq!(pinned.to_string(), format!("registry.io/deid/configs@{D}"));
        // A single-label host is fine in an allow-list entry (nothing to confuse it with).
        let single: AllowEntry = "registry".parse().unwrap();
        assert_eq!(single.registry, "registry");

        for s in [
            "",
            "r.io/",
            "r.io/A",
            "r.io@sha256:00",
            &format!("r.io@{D}"),
            "r.io/a:tag",
            "r.io:99999",
            "http://r.io",
        ] {
            assert!(s.parse::<AllowEntry>().is_err(), "{s} should be rejected");
        }

        let by_tag = ok("registry.io/deid/configs:v1");
        let by_digest = ok(&format!("registry.io/deid/configs@{D}"));
        let other_repo = ok("registry.io/other:v1");
        let other_registry = ok("registry.io:5000/deid/configs:v1");
        assert!(any.allows(&by_tag) && any.allows(&other_repo) && !any.allows(&other_registry));
        assert!(repo.allows(&ok("registry.io:443/deid/configs:v1")));
        assert!(!repo.allows(&by_tag)); // port is part of the registry
        let repo: AllowEntry = "registry.io/deid/configs".parse().unwrap();
        assert!(repo.allows(&by_tag) && repo.allows(&by_digest) && !repo.allows(&other_repo));
        // Pinned entries admit only references pinned to that digest.
        assert!(pinned.allows(&by_digest));
        assert!(!pinned.allows(&by_tag));
        let other_digest = ok(&format!(
            "registry.io/deid/configs@sha256:{}",
            "f".repeat(64)
        ));
        assert!(!pinned.allows(&other_digest));
        assert!(pinned.allows(&ok(&format!("registry.io/deid/configs:v1@{D}"))));
        // Case-insensitive registry match.
        assert!(any.allows(&ok("REGISTRY.io/x:1")));
    }

    #[test]
    fn path_components() {
        for c in [
            "a",
            "a0",
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a.b_c__d-e",
        ] {
            assert!(path_component_ok(c), "{c}");
        }
        for c in ["", "A", ".a", "a.", "a..b", "a___b", "a.-b", "a-_b", "é"] {
            assert!(!path_component_ok(c), "{c}");
        }
    }
}
