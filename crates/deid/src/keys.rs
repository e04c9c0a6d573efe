//! Key sets (issue 21): the three keys of a configuration's `parameters` (`cryptoHashKey`,
//! `encryptKey`, `dateShiftKey`) supplied from a named, stored set for the keys a configuration
//! leaves empty, so that every export and command run naming the set hashes ids and shifts dates
//! the same way. Storage is the caller's (the server's database); this module only generates,
//! fingerprints and applies keys.

use serde_json::Value;
use sha2::Digest;

/// The three keys. `Debug` shows none of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub crypto_hash_key: String,
    /// 32 characters: an AES-256 key as the reference reads it (the text's bytes).
    pub encrypt_key: String,
    pub date_shift_key: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({})", self.fingerprint())
    }
}

fn random_hex<const N: usize>() -> String {
    let bytes: [u8; N] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keys {
    /// Fresh random keys: 256-bit hash and date-shift keys, a 128-bit-entropy 32-character
    /// encrypt key (AES-256 over its text, as the reference uses the key).
    pub fn generate() -> Keys {
        Keys {
            crypto_hash_key: random_hex::<32>(),
            encrypt_key: random_hex::<16>(),
            date_shift_key: random_hex::<32>(),
        }
    }

    /// The first 16 hex digits of a SHA-256 over the three keys: tells sets and versions apart
    /// without revealing a key.
    pub fn fingerprint(&self) -> String {
        let mut h = sha2::Sha256::new();
        for k in [
            &self.crypto_hash_key,
            &self.encrypt_key,
            &self.date_shift_key,
        ] {
            h.update((k.len() as u64).to_be_bytes());
            h.update(k.as_bytes());
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Why keys cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("keys cannot be filled into the configuration: {0}")]
pub struct ApplyError(String);

/// The configuration text with every key it leaves empty (absent, `null` or `""`) taken from
/// `keys`; keys the configuration sets stay as they are. Returns the text and which keys were
/// supplied (by their parameter names).
pub fn fill_empty(
    config_text: &str,
    keys: &Keys,
) -> Result<(String, Vec<&'static str>), ApplyError> {
    // Comments and trailing commas (which Newtonsoft, and so `Config::parse`, accepts) removed.
    let text = crate::config::normalise_json(config_text).map_err(|e| ApplyError(e.to_string()))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| ApplyError(e.to_string()))?;
    let Some(root) = v.as_object_mut() else {
        return Err(ApplyError("not a JSON object".into()));
    };
    let params = root
        .entry("parameters")
        .or_insert_with(|| Value::Object(Default::default()));
    if params.is_null() {
        *params = Value::Object(Default::default());
    }
    let Some(params) = params.as_object_mut() else {
        return Err(ApplyError("`parameters` is not an object".into()));
    };
    let mut supplied = Vec::new();
    for (name, key) in [
        ("cryptoHashKey", &keys.crypto_hash_key),
        ("encryptKey", &keys.encrypt_key),
        ("dateShiftKey", &keys.date_shift_key),
    ] {
        let empty = match params.get(name) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if empty {
            params.insert(name.to_string(), Value::String(key.clone()));
            supplied.push(name);
        }
    }
    Ok((v.to_string(), supplied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_empty_keys_are_supplied_and_the_result_compiles() {
        let keys = Keys::generate();
        assert_ne!(keys, Keys::generate());
        assert_eq!(keys.encrypt_key.len(), 32);
        assert!(!format!("{keys:?}").contains(&keys.crypto_hash_key));
        let config = r#"{"fhirPathRules": [{"path": "Resource.id", "method": "cryptoHash"}],
            "parameters": {"cryptoHashKey": "", "dateShiftKey": "mine", "dateShiftScope": "patient"}}"#;
        let (text, supplied) = fill_empty(config, &keys).unwrap();
        assert_eq!(supplied, ["cryptoHashKey", "encryptKey"]);
        let c = crate::Config::parse(&text).unwrap();
        assert_eq!(c.parameters.crypto_hash_key, keys.crypto_hash_key);
        assert_eq!(c.parameters.encrypt_key, keys.encrypt_key);
        assert_eq!(c.parameters.date_shift_key, "mine");
        let (_, supplied) = fill_empty(r#"{"fhirPathRules": []}"#, &keys).unwrap();
        assert_eq!(supplied.len(), 3);
        // Comments and trailing commas, as the configuration parser accepts them.
        let (text, supplied) = fill_empty("// comment\n{\"fhirPathRules\": [],}", &keys).unwrap();
        assert_eq!(supplied.len(), 3);
        crate::Config::parse(&text).unwrap();
        assert!(fill_empty("[]", &keys).is_err());
    }
}
