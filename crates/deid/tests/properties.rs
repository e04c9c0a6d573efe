//! Property tests: perturb bounds and rounding, encrypt round trip.

use deid::transforms::{NumberKind, decrypt, encrypt, perturb};
use proptest::prelude::*;
use rust_decimal::Decimal;

proptest! {
    #[test]
    fn perturb_fixed_stays_within_half_span(v in -1.0e6f64..1.0e6, span in 0.0f64..100.0, unit in 0.0f64..1.0, round_to in 0u32..6) {
        let text = format!("{v:.4}");
        let r = perturb(&text, NumberKind::Decimal, span, false, round_to, unit).unwrap();
        let orig: Decimal = text.parse().unwrap();
        let half = Decimal::from_f64_retain(span / 2.0).unwrap();
        // Rounding can move the value by at most half a unit in the last kept place.
        let slack = Decimal::new(5, round_to + 1) + Decimal::new(1, 9);
        prop_assert!((r - orig).abs() <= half + slack);
        prop_assert!(r.scale() <= round_to);
    }

    #[test]
    fn perturb_integer_kinds(v in 0i64..100000, span in 0.0f64..50.0, unit in 0.0f64..1.0) {
        let text = v.to_string();
        let r = perturb(&text, NumberKind::PositiveInt, span, false, 4, unit).unwrap();
        prop_assert_eq!(r.scale(), 0);
        prop_assert!(r >= Decimal::ONE);
        let u = perturb(&text, NumberKind::UnsignedInt, span, false, 4, unit).unwrap();
        prop_assert!(u >= Decimal::ZERO);
    }

    #[test]
    fn perturb_proportional_bounds(v in 0.0f64..1.0e4, span in 0.0f64..1.0, unit in 0.0f64..1.0) {
        let text = format!("{v:.2}");
        let r = perturb(&text, NumberKind::Decimal, span, true, 2, unit).unwrap();
        let orig: f64 = text.parse().unwrap();
        let rf: f64 = r.to_string().parse().unwrap();
        prop_assert!((rf - orig).abs() <= orig * span / 2.0 + 0.0051);
    }

    #[test]
    fn encrypt_round_trip(text in "\\PC{0,64}", key_len in prop::sample::select(vec![16usize, 24, 32])) {
        let key: String = "k".repeat(key_len);
        let c = encrypt(&key, &text).unwrap();
        prop_assert_eq!(decrypt(&key, &c).unwrap(), text);
    }
}

#[test]
fn banker_rounding_with_zero_span() {
    assert_eq!(
        perturb("2.5", NumberKind::Decimal, 0.0, false, 0, 0.5)
            .unwrap()
            .to_string(),
        "2"
    );
    assert_eq!(
        perturb("3.5", NumberKind::Decimal, 0.0, false, 0, 0.5)
            .unwrap()
            .to_string(),
        "4"
    );
}

#[test]
fn proportional_on_negative_is_an_error() {
    assert!(perturb("-3", NumberKind::Decimal, 0.5, true, 2, 0.5).is_err());
}
