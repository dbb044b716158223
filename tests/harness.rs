//! The tolerance check itself: it must pass what is within bounds and fail, with a useful report,
//! what is not.

use qlora_rs::testing::{check_close, Tolerance};
use qlora_rs::DType;

#[test]
fn harness_passes_values_within_abs_plus_rel() {
    let tol = Tolerance {
        abs: 1e-3,
        rel: 1e-2,
    };
    // |1.0109 - 1.0| = 0.0109 <= 0.001 + 0.01 * 1.0
    check_close("t", &[1.0109, -2.0, 0.0], &[1.0, -2.02, 0.0009], tol).unwrap();
}

#[test]
fn harness_reports_worst_index_and_pairs() {
    let tol = Tolerance {
        abs: 1e-3,
        rel: 0.0,
    };
    let reference = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
    let got = [0.0, 1.002, 2.0, 3.5, 4.0, 5.0];
    let report = check_close("weights", &got, &reference, tol).unwrap_err();
    assert!(report.contains("weights"), "{report}");
    assert!(report.contains("2 of 6 values"), "{report}");
    assert!(report.contains("worst at index 3"), "{report}");
    assert!(report.contains("[3] got 3.5e0 ref 3e0"), "{report}");
}

#[test]
fn harness_treats_nan_as_failure_unless_both_nan() {
    let tol = Tolerance { abs: 1.0, rel: 1.0 };
    check_close("t", &[f64::NAN], &[f64::NAN], tol).unwrap();
    assert!(check_close("t", &[f64::NAN], &[1.0], tol).is_err());
    assert!(check_close("t", &[1.0], &[f64::NAN], tol).is_err());
    assert!(check_close("t", &[f64::INFINITY], &[1.0], tol).is_err());
    check_close("t", &[f64::INFINITY], &[f64::INFINITY], tol).unwrap();
}

#[test]
fn harness_catches_uniformly_too_large_values() {
    // A signed max would hide this; the per-element bound does not.
    let reference: Vec<f64> = (0..100).map(|i| i as f64 * 0.01).collect();
    let got: Vec<f64> = reference.iter().map(|r| r * 1.1).collect();
    let report = check_close("grad", &got, &reference, Tolerance::for_dtype(DType::F32));
    assert!(report.is_err());
}

#[test]
fn harness_rejects_length_mismatch() {
    let report = check_close("t", &[1.0], &[1.0, 2.0], Tolerance::EXACT).unwrap_err();
    assert!(report.contains("length mismatch"), "{report}");
}

#[test]
fn harness_dtype_defaults_order_by_precision() {
    let f32t = Tolerance::for_dtype(DType::F32);
    let f16t = Tolerance::for_dtype(DType::F16);
    let bf16t = Tolerance::for_dtype(DType::BF16);
    assert!(f32t.rel < f16t.rel && f16t.rel < bf16t.rel);
    assert_eq!(Tolerance::for_dtype(DType::U8), Tolerance::EXACT);
}
