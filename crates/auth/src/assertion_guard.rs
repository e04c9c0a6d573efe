//! What bounds and evens out the signature checks of `POST /auth/token`, which anyone may call:
//!
//! - `DecoyKeys`: keys made at start, one per accepted algorithm (RSA: one per modulus length
//!   from 2048 to 4096 bits), that an assertion is checked against when its `iss` names no
//!   registered client or no single registered key fits it. Every assertion that reaches the
//!   signature stage costs exactly one signature check, whether its client exists or not, so
//!   the time of a refusal does not tell which client ids exist.
//! - `FailureThrottle`: a small token bucket per `iss` and client address (registered `iss` or
//!   not, the same way) that bounds how many signature checks that fail may cost:
//!   [`THROTTLE_BURST`] at once, then one every [`THROTTLE_REFILL_S`] seconds. A check that
//!   verifies gives its token back, so a client whose assertions verify is never held back by
//!   its own requests; and since the address is part of the key, failures sent from elsewhere
//!   naming a client's id do not hold that client back either (unless both reach the server
//!   from one address, e.g. through one proxy).
//! - a semaphore (in [`crate::SmartAuth`]) bounding the signature checks in progress at once
//!   ([`max_concurrent_signature_checks`]).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};

use crate::jwk::{VerificationKey, parse_jwk};

/// Failed signature checks one `iss` may cost at once, before the throttle holds it back.
pub const THROTTLE_BURST: u32 = 20;
/// Seconds after which a throttled `iss` may cost one more signature check (the `Retry-After`
/// of a throttled answer).
pub const THROTTLE_REFILL_S: u64 = 2;
/// Buckets of the throttle: an `iss` is hashed (with a key made at start) onto one of them, so
/// memory is fixed whatever the number of `iss` values sent, and a registered client id is
/// treated exactly as an unknown one.
pub const THROTTLE_SLOTS: usize = 1 << 15;
/// How long a token request waits for a signature-check slot before it is answered 503.
pub const SIGNATURE_CHECK_WAIT: Duration = Duration::from_millis(200);
/// Smallest and largest RSA modulus (bytes) a decoy is made for: the sizes a registered RSA key
/// may have (at least 2048 bits; the verifier takes at most 4096).
const RSA_DECOY_BYTES: std::ops::RangeInclusive<usize> = 256..=512;

/// Signature checks in progress at once, over every token request: the number of cores, at
/// least 2 and at most 8.
pub fn max_concurrent_signature_checks() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// Public keys nobody registered, made at start, to check an assertion against when no
/// registered key is to be used. The private halves are dropped.
pub(crate) struct DecoyKeys {
    /// Index: modulus length in bytes minus 256.
    rsa: Vec<VerificationKey>,
    es256: VerificationKey,
    es384: VerificationKey,
}

impl DecoyKeys {
    pub(crate) fn generate() -> DecoyKeys {
        let rsa = RSA_DECOY_BYTES.map(rsa_decoy).collect();
        DecoyKeys {
            rsa,
            es256: ec_decoy(Algorithm::ES256).0,
            es384: ec_decoy(Algorithm::ES384).0,
        }
    }

    /// The decoy for an assertion of `alg` whose signature is `signature_len` bytes: for RSA the
    /// key of that modulus length, so that the check costs what a registered key of that length
    /// costs (a signature whose length fits no registered key is checked against the decoy too:
    /// `VerificationKey::fits_signature`); for a length no RSA key of an accepted size has, the
    /// 2048-bit one, which refuses it before any arithmetic as every key would.
    pub(crate) fn for_assertion(&self, alg: Algorithm, signature_len: usize) -> &VerificationKey {
        match alg {
            Algorithm::ES256 => &self.es256,
            Algorithm::ES384 => &self.es384,
            _ => {
                let i = if RSA_DECOY_BYTES.contains(&signature_len) {
                    signature_len - RSA_DECOY_BYTES.start()
                } else {
                    0
                };
                &self.rsa[i]
            }
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::Rng::fill_bytes(&mut rand::rng(), &mut b);
    b
}

/// An RSA public key of a random odd modulus of `len` bytes (top bit set) and e = 65537: the
/// verifier does the same modular exponentiation for it as for a registered key of that size.
fn rsa_decoy(len: usize) -> VerificationKey {
    use base64::Engine;
    let mut n = random_bytes(len);
    n[0] |= 0x80;
    n[len - 1] |= 1;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = serde_json::json!({"kty": "RSA", "n": b64.encode(&n), "e": "AQAB"});
    parse_jwk(&jwk)
        .ok()
        .flatten()
        .expect("a decoy RSA key is a valid JWK")
}

/// An EC key pair of a random scalar on the curve of `alg` (P-256 or P-384): the public key as
/// a verification key, and the private key (used by tests only, to show the decoy is a real
/// point of the curve).
pub(crate) fn ec_decoy(alg: Algorithm) -> (VerificationKey, EncodingKey) {
    // PKCS#8 PrivateKeyInfo { version 0, {id-ecPublicKey, curve}, ECPrivateKey { 1, scalar } }.
    let (prefix, size): (&[u8], usize) = match alg {
        Algorithm::ES256 => (
            &[
                0x30, 0x41, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
                0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x27,
                0x30, 0x25, 0x02, 0x01, 0x01, 0x04, 0x20,
            ],
            32,
        ),
        _ => (
            &[
                0x30, 0x4e, 0x02, 0x01, 0x00, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
                0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x04, 0x37, 0x30, 0x35, 0x02,
                0x01, 0x01, 0x04, 0x30,
            ],
            48,
        ),
    };
    // A random scalar is out of range (zero or beyond the group order) with a probability
    // below 2^-32: try again then.
    for _ in 0..64 {
        let mut der = prefix.to_vec();
        der.extend(random_bytes(size));
        let private = EncodingKey::from_ec_der(&der);
        let Ok(jwk) = Jwk::from_encoding_key(&private, alg) else {
            continue;
        };
        let Ok(value) = serde_json::to_value(&jwk) else {
            continue;
        };
        if let Ok(Some(public)) = parse_jwk(&value) {
            return (public, private);
        }
    }
    panic!("no decoy {alg:?} key could be made");
}

#[derive(Clone, Copy)]
struct Slot {
    tokens: f32,
    /// Unix seconds of the last update.
    at: i64,
}

/// A token bucket per `iss` and client address (hashed together onto [`THROTTLE_SLOTS`]
/// buckets) bounding the failed signature checks they may cost. The address is `None` when the
/// caller does not know it (the bucket is then the `iss`'s alone).
pub(crate) struct FailureThrottle {
    slots: Mutex<Vec<Slot>>,
    hasher: std::collections::hash_map::RandomState,
}

impl FailureThrottle {
    pub(crate) fn new(slots: usize) -> FailureThrottle {
        FailureThrottle {
            slots: Mutex::new(vec![
                Slot {
                    tokens: THROTTLE_BURST as f32,
                    at: i64::MIN,
                };
                slots.max(1)
            ]),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn with_slot<T>(
        &self,
        iss: &str,
        from: Option<IpAddr>,
        now: i64,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let i = (self.hasher.hash_one((iss, from)) % slots.len() as u64) as usize;
        let slot = &mut slots[i];
        // A clock that goes back refills nothing and does not move the bucket back.
        let elapsed = now.saturating_sub(slot.at).max(0);
        let refill = (elapsed as f64 / THROTTLE_REFILL_S as f64).min(THROTTLE_BURST as f64);
        slot.tokens = (slot.tokens + refill as f32).min(THROTTLE_BURST as f32);
        slot.at = slot.at.max(now);
        f(slot)
    }

    /// Takes one signature check for `iss` from `from` at `now` (unix seconds); `false` when
    /// its bucket is empty.
    pub(crate) fn take(&self, iss: &str, from: Option<IpAddr>, now: i64) -> bool {
        self.with_slot(iss, from, now, |s| {
            if s.tokens >= 1.0 {
                s.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Gives back a check taken by [`FailureThrottle::take`]: it verified, or never ran.
    pub(crate) fn give_back(&self, iss: &str, from: Option<IpAddr>, now: i64) {
        self.with_slot(iss, from, now, |s| {
            s.tokens = (s.tokens + 1.0).min(THROTTLE_BURST as f32);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_decoys_are_points_of_their_curve() {
        for alg in [Algorithm::ES256, Algorithm::ES384] {
            let (public, private) = ec_decoy(alg);
            assert!(public.accepts(alg));
            let claims = serde_json::json!({"iss": "x"});
            let jwt = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &private)
                .expect("the decoy's private key signs");
            let mut v = jsonwebtoken::Validation::new(alg);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            jsonwebtoken::decode::<serde_json::Value>(&jwt, &public.decoding, &v)
                .expect("the decoy's public key verifies its own signature");
        }
    }

    #[test]
    fn decoys_fit_the_assertion() {
        let d = DecoyKeys::generate();
        assert_eq!(d.rsa.len(), 257);
        for alg in [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::ES256,
            Algorithm::ES384,
        ] {
            assert!(d.for_assertion(alg, 256).accepts(alg), "{alg:?}");
        }
        // Two decoys made at different starts differ (the key is random): one's signature
        // does not verify with the other.
        let (_, a) = ec_decoy(Algorithm::ES384);
        let (b, _) = ec_decoy(Algorithm::ES384);
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::ES384),
            &serde_json::json!({"iss": "x"}),
            &a,
        )
        .unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::ES384);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        assert!(jsonwebtoken::decode::<serde_json::Value>(&jwt, &b.decoding, &v).is_err());
    }

    #[test]
    fn throttle_bounds_failures_per_iss_and_refills() {
        let t = FailureThrottle::new(THROTTLE_SLOTS);
        let now = 1_000_000;
        for _ in 0..THROTTLE_BURST {
            assert!(t.take("victim", None, now));
        }
        assert!(!t.take("victim", None, now), "the burst is spent");
        // Another iss (registered or not: the throttle cannot tell) has its own bucket.
        assert!(t.take("someone-else", None, now));
        // One more check after the refill period, not two.
        let later = now + THROTTLE_REFILL_S as i64;
        assert!(t.take("victim", None, later));
        assert!(!t.take("victim", None, later));
        // A check that verified gives its token back.
        t.give_back("victim", None, later);
        assert!(t.take("victim", None, later));
        // A clock going back refills nothing.
        assert!(!t.take("victim", None, now));
        // After a pause the whole burst is back, no more.
        let much_later = later + 3600;
        for _ in 0..THROTTLE_BURST {
            assert!(t.take("victim", None, much_later));
        }
        assert!(!t.take("victim", None, much_later));
        // The same iss from another address has a bucket of its own: failures sent from
        // elsewhere do not hold a client back.
        let (a, b) = (
            Some(IpAddr::from([10, 0, 0, 1])),
            Some(IpAddr::from([10, 0, 0, 2])),
        );
        for _ in 0..THROTTLE_BURST {
            assert!(t.take("victim", a, much_later));
        }
        assert!(!t.take("victim", a, much_later));
        assert!(t.take("victim", b, much_later));
    }
}
