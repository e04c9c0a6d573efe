//! Value-level transforms: HMAC, AES, date shift/redaction, postal codes, perturbation (§2).

use std::sync::LazyLock;

use base64::Engine as _;
use chrono::{Datelike, NaiveDate};
use hmac::{KeyInit, Mac};
use regex::Regex;
use rust_decimal::{Decimal, RoundingStrategy};

/// Lower-case hex HMAC-SHA256 of `text` with `key` (§2.4). Empty text hashes to empty.
pub fn crypto_hash(key: &str, text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    // The keyed state (two SHA-256 blocks of key padding) is computed once per thread and key,
    // then cloned: half the compressions of a short value.
    let keyed = KEYED.with(|cell| {
        let mut slot = cell.borrow_mut();
        match &*slot {
            Some((k, mac)) if k == key => Some(mac.clone()),
            _ => {
                let mac = HmacSha256::new_from_slice(key.as_bytes()).ok()?;
                *slot = Some((key.to_string(), mac.clone()));
                Some(mac)
            }
        }
    });
    // HMAC accepts any key length; `None` is unreachable in practice.
    let Some(mut mac) = keyed else {
        return String::new();
    };
    mac.update(text.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(digest.len() * 2);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

thread_local! {
    /// The last key used on this thread, keyed.
    static KEYED: std::cell::RefCell<Option<(String, HmacSha256)>> =
        const { std::cell::RefCell::new(None) };
}

const HEX: &[u8; 16] = b"0123456789abcdef";

static REF_URL: LazyLock<Regex> = LazyLock::new(|| {
    let types = fhir_model::r4().resource_types().join("|");
    Regex::new(&format!(
        r"^(?<prefix>((http|https)://[A-Za-z0-9\/.:%$]*)?({types})/)(?<id>[A-Za-z0-9\-\.]{{1,64}})(?<suffix>/_history/[A-Za-z0-9\-\.]{{1,64}})?$"
    ))
    .expect("reference regex")
});
static OID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^urn:oid:(?<id>[0-2](\.(0|[1-9][0-9]*))+)$").expect("oid regex"));
static UUID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^urn:uuid:(?<id>[A-Fa-f0-9]{8}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{4}-[A-Fa-f0-9]{12})$")
        .expect("uuid regex")
});

/// Slots of the per-thread cache of hashed references (a power of two).
const REFERENCE_SLOTS: usize = 256;
/// Longer references are not kept (a thread keeps at most 256 × (2 × 256 + 64) bytes of them).
const REFERENCE_MAX_LEN: usize = 256;

/// The hashed references this thread computed last, by the reference's text: direct-mapped,
/// fixed size, for one key at a time.
struct ReferenceCache {
    key: String,
    /// (reference text, its transform): both buffers are reused when a slot is replaced.
    slots: Vec<Option<(String, String)>>,
}

thread_local! {
    static REFERENCES: std::cell::RefCell<ReferenceCache> =
        const { std::cell::RefCell::new(ReferenceCache { key: String::new(), slots: Vec::new() }) };
}

/// `transform_reference(text, crypto_hash(key, ·))`, the same text: the references of a scan
/// recur (the same patient, encounter, practitioner in consecutive resources), so each thread
/// remembers the last ones it hashed (256 slots, references up to 256 bytes).
pub fn hash_reference(key: &str, text: &str) -> String {
    let compute = |t: &str| transform_reference(t, &|s| crypto_hash(key, s));
    if text.len() > REFERENCE_MAX_LEN {
        return compute(text);
    }
    REFERENCES.with(|cell| {
        let Ok(mut cache) = cell.try_borrow_mut() else {
            return compute(text);
        };
        if cache.key != key || cache.slots.is_empty() {
            cache.key.clear();
            cache.key.push_str(key);
            cache.slots.clear();
            cache.slots.resize(REFERENCE_SLOTS, None);
        }
        let mut h = rustc_hash::FxHasher::default();
        std::hash::Hasher::write(&mut h, text.as_bytes());
        let ix = (std::hash::Hasher::finish(&h) >> 32) as usize & (REFERENCE_SLOTS - 1);
        match &mut cache.slots[ix] {
            Some((t, out)) if t == text => out.clone(),
            Some((t, out)) => {
                let fresh = compute(text);
                t.clear();
                t.push_str(text);
                out.clone_from(&fresh);
                fresh
            }
            slot @ None => {
                let fresh = compute(text);
                *slot = Some((text.to_string(), fresh.clone()));
                fresh
            }
        }
    })
}

/// `Reference.reference`: only the id part is transformed (§2.4 `TransformReferenceId`).
pub fn transform_reference(text: &str, f: &dyn Fn(&str) -> String) -> String {
    if let Some(rest) = text.strip_prefix('#') {
        return format!("#{}", f(rest));
    }
    if let Some(out) = transform_common_reference(text, f) {
        return out;
    }
    if let Some(c) = REF_URL.captures(text) {
        return format!(
            "{}{}{}",
            &c["prefix"],
            f(&c["id"]),
            c.name("suffix").map(|m| m.as_str()).unwrap_or("")
        );
    }
    if let Some(c) = OID.captures(text) {
        return format!("urn:oid:{}", f(&c["id"]));
    }
    if let Some(c) = UUID.captures(text) {
        return format!("urn:uuid:{}", f(&c["id"]));
    }
    f(text)
}

/// The two forms most references take, without the regular expressions (same results):
/// `Type/id[/_history/vid]` and `urn:uuid:<uuid>`. `None`: let the expressions decide.
fn transform_common_reference(text: &str, f: &dyn Fn(&str) -> String) -> Option<String> {
    let id_ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if let Some(uuid) = text.strip_prefix("urn:uuid:") {
        let b = uuid.as_bytes();
        let ok = b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        return ok.then(|| concat3("urn:uuid:", &f(uuid), ""));
    }
    if text.contains(':') {
        return None; // absolute URLs, OIDs, other URNs
    }
    let mut parts = text.split('/');
    let (ty, id) = (parts.next()?, parts.next()?);
    let suffix = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => "",
        (Some("_history"), Some(v), None) if id_ok(v) => &text[ty.len() + 1 + id.len()..],
        _ => return None,
    };
    // One of `resource_types()` (a concrete resource type): one hash lookup, not a binary
    // search of string compares.
    let is_type = fhir_model::r4()
        .type_def(ty)
        .is_some_and(|d| d.kind == fhir_model::TypeKind::Resource && !d.is_abstract);
    (is_type && id_ok(id)).then(|| {
        let mut out = concat3(ty, "/", &f(id));
        out.push_str(suffix);
        out
    })
}

/// `a ‖ b ‖ c` in one allocation.
fn concat3(a: &str, b: &str, c: &str) -> String {
    let mut out = String::with_capacity(a.len() + b.len() + c.len() + 24);
    out.push_str(a);
    out.push_str(b);
    out.push_str(c);
    out
}

type Aes128Enc = cbc::Encryptor<aes::Aes128>;
type Aes192Enc = cbc::Encryptor<aes::Aes192>;
type Aes256Enc = cbc::Encryptor<aes::Aes256>;
type Aes128Dec = cbc::Decryptor<aes::Aes128>;
type Aes192Dec = cbc::Decryptor<aes::Aes192>;
type Aes256Dec = cbc::Decryptor<aes::Aes256>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CryptoError {
    #[error("invalid encrypt key size: {0} bits (need 128, 192 or 256)")]
    KeySize(usize),
    #[error("not base64: {0}")]
    Base64(String),
    #[error("ciphertext too short or badly padded")]
    Cipher,
    #[error("plaintext is not UTF-8")]
    Utf8,
}

/// AES-CBC/PKCS7 with a random IV; output `Base64(IV ‖ ciphertext)` (§2.5).
pub fn encrypt(key: &str, text: &str) -> Result<String, CryptoError> {
    encrypt_with_iv(key, text, rand::random())
}

pub fn encrypt_with_iv(key: &str, text: &str, iv: [u8; 16]) -> Result<String, CryptoError> {
    use cbc::cipher::{BlockModeEncrypt, KeyIvInit, block_padding::Pkcs7};
    let k = key.as_bytes();
    let ct = match k.len() {
        16 => Aes128Enc::new_from_slices(k, &iv)
            .map_err(|_| CryptoError::KeySize(128))?
            .encrypt_padded_vec::<Pkcs7>(text.as_bytes()),
        24 => Aes192Enc::new_from_slices(k, &iv)
            .map_err(|_| CryptoError::KeySize(192))?
            .encrypt_padded_vec::<Pkcs7>(text.as_bytes()),
        32 => Aes256Enc::new_from_slices(k, &iv)
            .map_err(|_| CryptoError::KeySize(256))?
            .encrypt_padded_vec::<Pkcs7>(text.as_bytes()),
        n => return Err(CryptoError::KeySize(n * 8)),
    };
    let mut all = iv.to_vec();
    all.extend_from_slice(&ct);
    Ok(base64::engine::general_purpose::STANDARD.encode(all))
}

/// Inverse of [`encrypt`], for holders of the key.
pub fn decrypt(key: &str, b64: &str) -> Result<String, CryptoError> {
    use cbc::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::Pkcs7};
    let all = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| CryptoError::Base64(e.to_string()))?;
    if all.len() < 32 {
        return Err(CryptoError::Cipher);
    }
    let (iv, ct) = all.split_at(16);
    let k = key.as_bytes();
    let pt = match k.len() {
        16 => Aes128Dec::new_from_slices(k, iv)
            .map_err(|_| CryptoError::Cipher)?
            .decrypt_padded_vec::<Pkcs7>(ct),
        24 => Aes192Dec::new_from_slices(k, iv)
            .map_err(|_| CryptoError::Cipher)?
            .decrypt_padded_vec::<Pkcs7>(ct),
        32 => Aes256Dec::new_from_slices(k, iv)
            .map_err(|_| CryptoError::Cipher)?
            .decrypt_padded_vec::<Pkcs7>(ct),
        n => return Err(CryptoError::KeySize(n * 8)),
    }
    .map_err(|_| CryptoError::Cipher)?;
    String::from_utf8(pt).map_err(|_| CryptoError::Utf8)
}

/// The parts of a FHIR date/dateTime/instant text the reference reads: the first match of its
/// date (or dateTime) regular expression anywhere in the text, read by hand (same result as
/// the expressions kept in the tests, `DATE_RE` / `DATETIME_RE`).
struct DateParts<'a> {
    /// The four year digits as written (`0012`).
    year_text: &'a str,
    year: i32,
    month: Option<u32>,
    day: Option<u32>,
    /// `T…` through the zone, when the whole time part matches (dateTime/instant only).
    time: Option<&'a str>,
}

/// Two ASCII digits at `i` as a number.
fn two_digits(b: &[u8], i: usize) -> Option<u32> {
    match (b.get(i), b.get(i + 1)) {
        (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
            Some(u32::from(x - b'0') * 10 + u32::from(y - b'0'))
        }
        _ => None,
    }
}

/// `-MM` (01–12) or `-DD` (01–31) at `i`.
fn dash_two(b: &[u8], i: usize, max: u32) -> Option<u32> {
    if b.get(i) != Some(&b'-') {
        return None;
    }
    two_digits(b, i + 1).filter(|v| (1..=max).contains(v))
}

/// `T hh:mm:ss(.f+)? (Z|±hh:mm)` at `i` (hours 00–23, seconds up to 60, zone hours up to 13 or
/// exactly 14:00): the end of the match.
fn time_end(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) != Some(&b'T') {
        return None;
    }
    two_digits(b, i + 1).filter(|h| *h <= 23)?;
    (b.get(i + 3) == Some(&b':')).then_some(())?;
    two_digits(b, i + 4).filter(|m| *m <= 59)?;
    (b.get(i + 6) == Some(&b':')).then_some(())?;
    two_digits(b, i + 7).filter(|s| *s <= 60)?;
    let mut p = i + 9;
    if b.get(p) == Some(&b'.') && b.get(p + 1).is_some_and(u8::is_ascii_digit) {
        p += 1;
        while b.get(p).is_some_and(u8::is_ascii_digit) {
            p += 1;
        }
    }
    match b.get(p) {
        Some(b'Z') => Some(p + 1),
        Some(b'+' | b'-') => {
            let h = two_digits(b, p + 1)?;
            (b.get(p + 3) == Some(&b':')).then_some(())?;
            let m = two_digits(b, p + 4)?;
            let ok = (h <= 13 && m <= 59) || (h == 14 && m == 0);
            ok.then_some(p + 6)
        }
        _ => None,
    }
}

/// The match starting at `i`, if one does (a year: four digits, not `0000`).
fn date_at(text: &str, i: usize, is_date: bool) -> Option<DateParts<'_>> {
    let b = text.as_bytes();
    let y = b.get(i..i + 4)?;
    if !y.iter().all(u8::is_ascii_digit) || y == b"0000" {
        return None;
    }
    let year = y.iter().fold(0i32, |a, d| a * 10 + i32::from(d - b'0'));
    let mut parts = DateParts {
        year_text: &text[i..i + 4],
        year,
        month: None,
        day: None,
        time: None,
    };
    let Some(m) = dash_two(b, i + 4, 12) else {
        return Some(parts);
    };
    parts.month = Some(m);
    let Some(d) = dash_two(b, i + 7, 31) else {
        return Some(parts);
    };
    parts.day = Some(d);
    if !is_date && let Some(end) = time_end(b, i + 10) {
        parts.time = Some(&text[i + 10..end]);
    }
    Some(parts)
}

fn parse_date(text: &str, is_date: bool) -> Option<DateParts<'_>> {
    // Unanchored, like the reference's expression: the leftmost position where a year starts.
    (0..text.len()).find_map(|i| date_at(text, i, is_date))
}

/// Age-over-89 test against `today` (§2.2).
fn over_89(p: &DateParts, today: NaiveDate) -> bool {
    let (m, d) = (p.month.unwrap_or(1), p.day.unwrap_or(1));
    let mut age = today.year() - p.year;
    if (today.month(), today.day()) < (m, d) {
        age -= 1;
    }
    age > 89
}

/// Redaction of a date/dateTime/instant text: `None` removes the value (§2.2 rules 1-2).
pub fn redact_date(text: &str, is_date: bool, partial: bool, today: NaiveDate) -> Option<String> {
    if !partial {
        return None;
    }
    let p = parse_date(text, is_date)?;
    if over_89(&p, today) {
        return None;
    }
    Some(p.year_text.to_string())
}

/// Result of a date shift.
#[derive(Debug, PartialEq)]
pub enum Shifted {
    Value(String),
    /// Fallback to redaction (no day, or over 89): the redaction result.
    Redacted(Option<String>),
    /// Not a date text: unchanged.
    Unchanged,
    /// A date whose shift leaves years 0001–9999 (the reference's `DateTime` throws): never
    /// written, never kept as it was.
    OutOfRange,
}

/// Offset in days from prefix and key (§2.3 step 3).
pub fn date_shift_offset(prefix: &str, key: &str) -> i64 {
    // The reference's fold, `acc = (acc * 131 + byte) % 101` over the bytes of prefix then
    // key, computed eight bytes per reduction (131 ≡ 30 mod 101; every term is non-negative,
    // so the residue is the same): the prefix is usually a 64-character hashed id, and one
    // division per byte made this a few percent of a de-identified resource.
    let mut acc = 0u32;
    for part in [prefix.as_bytes(), key.as_bytes()] {
        let mut chunks = part.chunks_exact(8);
        for c in &mut chunks {
            let mut sum = acc * POW30[8];
            for (j, &b) in c.iter().enumerate() {
                sum += u32::from(b) * POW30[7 - j];
            }
            acc = sum % 101;
        }
        for &b in chunks.remainder() {
            acc = (acc * 30 + u32::from(b)) % 101;
        }
    }
    i64::from(acc) - 50
}

/// `30^k mod 101` for k = 0..=8 (sums of eight bytes times these stay far below `u32::MAX`).
const POW30: [u32; 9] = {
    let mut p = [1u32; 9];
    let mut k = 1;
    while k < 9 {
        p[k] = p[k - 1] * 30 % 101;
        k += 1;
    }
    p
};

/// The date-shift offset of a patient for `dateShiftScope: "patient"` (our extension): days in
/// [-50, -1] or [1, 50] from HMAC-SHA256(key, "patient|" + patient id). Unlike
/// [`date_shift_offset`] (a fold modulo 101, affine in the prefix), knowing the offsets of some
/// patients tells nothing about another's; and it is never 0 (the reference's range includes 0:
/// about one patient in a hundred kept true dates).
pub fn patient_shift_offset(key: &str, patient_id: &str) -> i64 {
    let Ok(mut mac) = HmacSha256::new_from_slice(key.as_bytes()) else {
        return date_shift_offset(patient_id, key);
    };
    mac.update(b"patient|");
    mac.update(patient_id.as_bytes());
    let d = mac.finalize().into_bytes();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    let v = (u64::from_be_bytes(first) % 100) as i64 - 50;
    if v >= 0 { v + 1 } else { v }
}

pub fn shift_date(
    text: &str,
    is_date: bool,
    offset: i64,
    partial: bool,
    today: NaiveDate,
) -> Shifted {
    let Some(p) = parse_date(text, is_date) else {
        return Shifted::Unchanged;
    };
    let (Some(m), Some(d)) = (p.month, p.day) else {
        return Shifted::Redacted(redact_date(text, is_date, partial, today));
    };
    if over_89(&p, today) {
        return Shifted::Redacted(redact_date(text, is_date, partial, today));
    }
    let Some(original) = NaiveDate::from_ymd_opt(p.year, m, d) else {
        // Day 31 of a 30-day month and the like: not a date.
        return Shifted::Unchanged;
    };
    let Some(date) = chrono::Duration::try_days(offset)
        .and_then(|by| original.checked_add_signed(by))
        .filter(|shifted| (1..=9999).contains(&shifted.year()))
    else {
        return Shifted::OutOfRange;
    };
    let mut out = String::with_capacity(text.len());
    push_date(&mut out, date);
    if let Some(t) = p.time {
        let zone_len = if t.ends_with('Z') { 1 } else { 6 };
        let split = t.len().saturating_sub(zone_len);
        let (clock, zone) = t.split_at(split);
        out.extend(
            clock
                .chars()
                .map(|c| if c.is_ascii_digit() { '0' } else { c }),
        );
        out.push_str(zone);
    }
    Shifted::Value(out)
}

/// `date` (years 1–9999) as chrono's `%Y-%m-%d` writes it.
fn push_date(out: &mut String, date: NaiveDate) {
    let (y, m, d) = (date.year(), date.month(), date.day());
    debug_assert!((1..=9999).contains(&y), "a four-digit year");
    let digit = |v: u32| char::from(b'0' + (v % 10) as u8);
    let y = y as u32;
    for v in [y / 1000, y / 100, y / 10, y] {
        out.push(digit(v));
    }
    out.push('-');
    out.push(digit(m / 10));
    out.push(digit(m));
    out.push('-');
    out.push(digit(d / 10));
    out.push(digit(d));
}

/// Partial postal code (§2.2 rule 4, partial zip on).
pub fn redact_postal_code(text: &str, restricted: &[String]) -> String {
    if restricted.iter().any(|r| text.starts_with(r.as_str())) {
        return text
            .chars()
            .map(|c| if c.is_numeric() { '0' } else { c })
            .collect();
    }
    if text.chars().count() >= 3 {
        return text
            .chars()
            .enumerate()
            .map(|(i, c)| if i >= 3 && c.is_numeric() { '0' } else { c })
            .collect();
    }
    text.to_string()
}

/// Why a value could not be perturbed. The texts never carry the value: they reach error files,
/// job status and logs of de-identified exports.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PerturbError {
    #[error("the value is not a number")]
    NotNumber,
    #[error("a proportional span on a negative value gives an empty range")]
    NegativeRange,
    /// The noise drawn is beyond ±2^96 ([`MAX_NOISE`]), where the reference's conversion to
    /// decimal throws.
    #[error("the noise drawn is beyond the decimal range (±2^96); the span is too large")]
    NoiseOutOfRange,
    /// The value plus the noise is beyond the decimal range (the reference throws too).
    #[error("the perturbed value is beyond the decimal range")]
    ResultOutOfRange,
}

/// The largest noise magnitude a decimal holds (2^96, exclusive): every double below it is an
/// integer or finer and fits the decimal's 96-bit mantissa.
pub const MAX_NOISE: f64 = 79_228_162_514_264_337_593_543_950_336.0;

/// FHIR numeric primitive kinds perturb distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberKind {
    Decimal,
    Integer,
    PositiveInt,
    UnsignedInt,
}

/// `round(value + U(-span/2, span/2), roundTo)` with banker's rounding (§2.7). `unit` in [0,1).
pub fn perturb(
    text: &str,
    kind: NumberKind,
    span: f64,
    proportional: bool,
    round_to: u32,
    unit: f64,
) -> Result<Decimal, PerturbError> {
    let v: Decimal = text
        .trim()
        .parse()
        .or_else(|_| Decimal::from_scientific(text.trim()))
        .map_err(|_| PerturbError::NotNumber)?;
    let vf: f64 = text.trim().parse().map_err(|_| PerturbError::NotNumber)?;
    let span = if proportional { vf * span } else { span };
    if span < 0.0 {
        return Err(PerturbError::NegativeRange);
    }
    let noise = -span / 2.0 + unit * span;
    // Noise the decimal cannot hold is an error for the resource, never a zero: a silent zero
    // wrote values unchanged and labelled PERTURBED (fail open). Noise too small for the
    // decimal's 28 places becomes 0, as the reference's conversion does.
    if noise.is_nan() || noise.abs() >= MAX_NOISE {
        return Err(PerturbError::NoiseOutOfRange);
    }
    let noise = Decimal::from_f64_retain(noise).ok_or(PerturbError::NoiseOutOfRange)?;
    let sum = v.checked_add(noise).ok_or(PerturbError::ResultOutOfRange)?;
    let round_to = if kind == NumberKind::Decimal {
        round_to
    } else {
        0
    };
    let mut r = sum.round_dp_with_strategy(round_to, RoundingStrategy::MidpointNearestEven);
    match kind {
        NumberKind::PositiveInt if r <= Decimal::ZERO => r = Decimal::ONE,
        NumberKind::UnsignedInt if r < Decimal::ZERO => r = Decimal::ZERO,
        _ => {}
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_references_take_the_expressions_result() {
        let f = |s: &str| format!("<{s}>");
        let by_expressions = |text: &str| -> String {
            if let Some(c) = REF_URL.captures(text) {
                let suffix = c.name("suffix").map(|m| m.as_str()).unwrap_or("");
                return format!("{}{}{suffix}", &c["prefix"], f(&c["id"]));
            }
            if let Some(c) = UUID.captures(text) {
                return format!("urn:uuid:{}", f(&c["id"]));
            }
            f(text)
        };
        let long = "a".repeat(65);
        let cases = [
            "Patient/123",
            "Patient/a.b-c",
            "Medication/1",
            "MedicationRequest/2",
            "Patient/123/_history/4",
            "Patient/123/_history/",
            "Patient/123/extra",
            "Patient/",
            "/123",
            "Unknown/123",
            "patient/123",
            "Patient/12_3",
            &format!("Patient/{long}"),
            "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2",
            "urn:uuid:6C5D9CA9-54D7-42F5-BFAE-A7C19CD217F2",
            "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f",
            "urn:uuid:6c5d9ca9x54d7-42f5-bfae-a7c19cd217f2",
            "urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2/x",
            "123",
            "",
        ];
        for text in cases {
            if let Some(fast) = transform_common_reference(text, &f) {
                assert_eq!(fast, by_expressions(text), "{text}");
            }
            assert_eq!(
                transform_reference(text, &f),
                by_expressions(text),
                "{text}"
            );
        }
        // Every concrete resource type is one the regular expression takes; the abstract
        // ones, data types and backbone paths are not.
        let model = fhir_model::r4();
        let others = [
            "Resource",
            "DomainResource",
            "HumanName",
            "Patient.contact",
            "string",
        ];
        for ty in model
            .resource_types()
            .iter()
            .map(String::as_str)
            .chain(others)
        {
            let text = format!("{ty}/1");
            assert_eq!(
                transform_common_reference(&text, &f),
                REF_URL.is_match(&text).then(|| by_expressions(&text)),
                "{text}"
            );
        }
        assert!(transform_common_reference("Patient/123", &f).is_some());
        assert!(
            transform_common_reference("urn:uuid:6c5d9ca9-54d7-42f5-bfae-a7c19cd217f2", &f)
                .is_some()
        );
    }

    const YEAR: &str = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)";
    /// The reference's expressions, which the hand-written parser replaces.
    static DATE_RE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(&format!(
            r"{YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?"
        ))
        .expect("date regex")
    });
    static DATETIME_RE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(&format!(
            r"{YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
        ))
        .expect("dateTime regex")
    });

    type Parts = (String, i32, Option<u32>, Option<u32>, Option<String>);

    fn by_regex(text: &str, is_date: bool) -> Option<Parts> {
        let re = if is_date { &*DATE_RE } else { &*DATETIME_RE };
        let c = re.captures(text)?;
        Some((
            c.get(1)?.as_str().to_string(),
            c.get(1)?.as_str().parse().ok()?,
            c.get(5).and_then(|m| m.as_str().parse().ok()),
            c.get(7).and_then(|m| m.as_str().parse().ok()),
            if is_date {
                None
            } else {
                c.get(8).map(|m| m.as_str().to_string())
            },
        ))
    }

    fn by_hand(text: &str, is_date: bool) -> Option<Parts> {
        parse_date(text, is_date).map(|p| {
            (
                p.year_text.to_string(),
                p.year,
                p.month,
                p.day,
                p.time.map(str::to_string),
            )
        })
    }

    #[test]
    fn date_parser_matches_the_expressions() {
        let cases = [
            "2015",
            "0000",
            "0001",
            "0010",
            "0100",
            "1000",
            "00000",
            "x0000-01-01",
            "2015-02",
            "2015-13",
            "2015-00",
            "2015-1",
            "2015-02-07",
            "2015-02-00",
            "2015-02-31",
            "2015-02-32",
            "2015-02-3",
            "2015-02-07T13:28:17Z",
            "2015-02-07T13:28:17.12345-05:00",
            "2015-02-07T13:28:17.-05:00",
            "2015-02-07T13:28:17.5",
            "2015-02-07T24:00:00Z",
            "2015-02-07T23:59:60Z",
            "2015-02-07T23:59:61Z",
            "2015-02-07T23:60:00Z",
            "2015-02-07T13:28:17+14:00",
            "2015-02-07T13:28:17+14:01",
            "2015-02-07T13:28:17+13:59",
            "2015-02-07T13:28:17-00:00",
            "2015-02-07T13:28:17+1:00",
            "2015-02-07T13:28Z",
            "2015-02-07T13:28:17",
            "2015-02-07 13:28:17Z",
            "2015-02-07t13:28:17Z",
            "abc 1999-12-31 def",
            "é2015-02-07T01:02:03Z…",
            "12-2015-01",
            "000002015",
            "2015-02-07T13:28:17Z trailing",
            "",
            "T",
            "--",
        ];
        for text in cases {
            for is_date in [true, false] {
                assert_eq!(
                    by_hand(text, is_date),
                    by_regex(text, is_date),
                    "{text} {is_date}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn date_parser_matches_the_expressions_on_generated_texts(
            text in "[0-9T:+\\-.Z a]{0,40}|[0-9]{1,4}(-[0-3][0-9](-[0-3][0-9](T[0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,3})?(Z|[+-][01][0-9]:[0-6][0-9])?)?)?)?",
            is_date: bool,
        ) {
            proptest::prop_assert_eq!(by_hand(&text, is_date), by_regex(&text, is_date));
        }
    }

    #[test]
    fn dates_written_as_chrono_writes_them() {
        for (y, m, d) in [
            (1, 1, 1),
            (9, 12, 31),
            (99, 2, 28),
            (999, 7, 4),
            (2024, 2, 29),
            (9999, 12, 31),
        ] {
            let date = NaiveDate::from_ymd_opt(y, m, d).unwrap();
            let mut out = String::new();
            push_date(&mut out, date);
            assert_eq!(out, date.format("%Y-%m-%d").to_string());
        }
    }

    #[test]
    fn patient_offsets_are_never_zero() {
        let offsets: std::collections::BTreeSet<i64> = (0..5000)
            .map(|i| patient_shift_offset("k", &format!("patient-{i}")))
            .collect();
        assert!(!offsets.contains(&0));
        assert_eq!(offsets.len(), 100);
        assert_eq!((offsets.first(), offsets.last()), (Some(&-50), Some(&50)));
    }

    #[test]
    fn hmac_vector() {
        assert!(crypto_hash("123", "example").starts_with("698d54f0"));
        assert!(crypto_hash("123", "example").ends_with("d84ba"));
    }

    #[test]
    fn hmac_with_changing_keys_uses_each_key() {
        let fresh = |key: &str, text: &str| {
            let mut mac = HmacSha256::new_from_slice(key.as_bytes()).unwrap();
            mac.update(text.as_bytes());
            let d = mac.finalize().into_bytes();
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let long = "k".repeat(100);
        for key in ["", "123", "other", &long, "123", ""] {
            for text in ["example", "a", &"x".repeat(200)] {
                assert_eq!(crypto_hash(key, text), fresh(key, text), "{key} {text}");
            }
        }
    }

    #[test]
    fn cached_references_are_what_transform_reference_gives() {
        // More distinct references than slots, repeated, under changing keys: every answer is
        // the uncached one.
        let refs: Vec<String> = (0..600)
            .map(|i| match i % 4 {
                0 => format!("Patient/p{i}"),
                1 => format!("urn:uuid:{i:08}-0000-0000-0000-000000000000"),
                2 => format!("#c{i}"),
                _ => format!("http://x.org/fhir/Encounter/e{i}/_history/2"),
            })
            .collect();
        for key in ["k1", "k2", "k1"] {
            for round in 0..3 {
                for r in refs.iter().skip(round * 7).chain([&"Patient/".repeat(100)]) {
                    let plain = transform_reference(r, &|s| crypto_hash(key, s));
                    assert_eq!(hash_reference(key, r), plain, "{key} {r}");
                }
            }
        }
    }

    #[test]
    fn offsets() {
        assert_eq!(date_shift_offset("", "dummy"), -21);
        assert_eq!(date_shift_offset("example", "123"), 41);
    }

    #[test]
    fn offsets_are_the_byte_by_byte_fold() {
        let fold = |prefix: &str, key: &str| {
            let mut acc: i64 = 0;
            for b in prefix.bytes().chain(key.bytes()) {
                acc = (acc * 131 + b as i64) % 101;
            }
            acc - 50
        };
        // Every length from 0 to 80 on each side, ASCII and multi-byte text, high bytes.
        let text: String = (0..200u32)
            .map(|i| char::from_u32(0x20 + (i * 37) % 0x2000).unwrap_or('é'))
            .collect();
        for a in 0..80 {
            for b in [0, 1, 7, 8, 9, 15, 16, 17, 33] {
                let prefix: String = text.chars().skip(a).take(a).collect();
                let key: String = text.chars().rev().skip(b).take(b).collect();
                assert_eq!(
                    date_shift_offset(&prefix, &key),
                    fold(&prefix, &key),
                    "{prefix:?} {key:?}"
                );
            }
        }
        let id = crypto_hash("k", "some-id");
        assert_eq!(
            date_shift_offset(&id, "bench-shift-key"),
            fold(&id, "bench-shift-key")
        );
    }

    #[test]
    fn shift_time_zeroed() {
        let today = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        let s = shift_date("2015-02-07T13:28:17.12345-05:00", false, -21, true, today);
        assert_eq!(s, Shifted::Value("2015-01-17T00:00:00.00000-05:00".into()));
    }

    #[test]
    fn a_shift_out_of_the_calendar_is_neither_written_nor_kept() {
        let today = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(
            shift_date("9999-12-20", true, 30, true, today),
            Shifted::OutOfRange
        );
        // (Before year 1 is out of reach: such dates are over 89 and redacted first.)
        assert_eq!(
            shift_date("2020-01-01", true, i64::MAX, true, today),
            Shifted::OutOfRange
        );
        assert_eq!(
            shift_date("9999-12-01", true, 30, true, today),
            Shifted::Value("9999-12-31".into())
        );
        // Not a calendar date at all: left to the other rules, as before.
        assert_eq!(
            shift_date("2021-02-30", true, 3, true, today),
            Shifted::Unchanged
        );
    }

    #[test]
    fn zip() {
        assert_eq!(redact_postal_code("98028-1830", &[]), "98000-0000");
        assert_eq!(redact_postal_code("03601", &["036".into()]), "00000");
    }

    #[test]
    fn reference() {
        let f = |s: &str| format!("<{s}>");
        assert_eq!(
            transform_reference(
                "http://example.org/fhir/Observation/apo89654/_history/2",
                &f
            ),
            "http://example.org/fhir/Observation/<apo89654>/_history/2"
        );
        assert_eq!(transform_reference("#", &|s| crypto_hash("k", s)), "#");
    }

    /// Security review: a span of 1e300 left most values byte-identical, labelled PERTURBED
    /// (noise beyond the decimal range became 0). Such noise is an error now, never a zero.
    #[test]
    fn regression_noise_beyond_the_decimal_range_is_an_error_not_zero() {
        for unit in [0.0, 0.1, 0.49, 0.51, 0.99] {
            assert_eq!(
                perturb("42.5", NumberKind::Decimal, 1e300, false, 2, unit),
                Err(PerturbError::NoiseOutOfRange),
                "unit {unit}"
            );
        }
        // A proportional span whose product is infinite.
        assert_eq!(
            perturb("1e10", NumberKind::Decimal, 1e300, true, 2, 0.9),
            Err(PerturbError::NoiseOutOfRange)
        );
        // Noise that fits, on a value it pushes past the largest decimal (no panic).
        assert_eq!(
            perturb(
                "79228162514264337593543950000",
                NumberKind::Decimal,
                1e28,
                false,
                0,
                0.99
            ),
            Err(PerturbError::ResultOutOfRange)
        );
        // Noise finer than the decimal's 28 places is 0, as in the reference.
        assert_eq!(
            perturb("1.5", NumberKind::Decimal, 1e-300, false, 2, 0.9),
            Ok(Decimal::new(15, 1))
        );
        // The largest noise that fits is added.
        let r = perturb("0", NumberKind::Decimal, 1.5e29, false, 0, 0.0).expect("fits");
        let bound: Decimal = "-70000000000000000000000000000".parse().expect("decimal");
        assert!(r < bound, "{r}");
    }

    /// Error texts reach error files and job status: they never carry the value.
    #[test]
    fn perturb_errors_leave_the_value_out() {
        for e in [
            perturb("1234.5678x", NumberKind::Decimal, 1.0, false, 2, 0.5),
            perturb("-1234.5678", NumberKind::Decimal, 0.5, true, 2, 0.5),
            perturb("1234.5678", NumberKind::Decimal, 1e300, false, 2, 0.1),
        ] {
            let text = e.expect_err("an error").to_string();
            assert!(!text.contains("1234"), "{text}");
        }
    }

    #[test]
    fn aes_round_trip() {
        let key = "0123456789abcdef0123456789abcdef";
        let c = encrypt(key, "hello").unwrap();
        assert_eq!(decrypt(key, &c).unwrap(), "hello");
    }
}
