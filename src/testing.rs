//! Test support shared by the unit tests, the integration tests and the benches: the tolerance
//! check and the GPU-or-skip rule.
//!
//! Tolerance: element `i` passes when `|got[i] − ref[i]| ≤ abs + rel·|ref[i]|` (NaN never passes,
//! except NaN against NaN). On failure the message names the worst index (by how far past its
//! bound it is), max-abs and max-rel errors, and a few pairs around the worst.

use crate::device::{cuda, Availability, Device};
use crate::tensor::DType;

/// `|got − ref| ≤ abs + rel·|ref|`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Absolute allowance.
    pub abs: f64,
    /// Allowance relative to `|ref|`.
    pub rel: f64,
}

impl Tolerance {
    /// No difference allowed (integer dtypes, bit-exact results).
    pub const EXACT: Tolerance = Tolerance { abs: 0.0, rel: 0.0 };
    /// For f64 results that should agree to rounding.
    pub const EXACT_F64: Tolerance = Tolerance {
        abs: 1e-14,
        rel: 1e-13,
    };

    /// Defaults for values computed in `dtype` and compared with a higher-precision reference:
    /// a few units of the dtype's rounding error.
    pub fn for_dtype(dtype: DType) -> Tolerance {
        match dtype {
            DType::F32 => Tolerance {
                abs: 1e-5,
                rel: 1e-4,
            },
            DType::BF16 => Tolerance {
                abs: 1e-2,
                rel: 1.6e-2,
            },
            DType::F16 => Tolerance {
                abs: 1e-3,
                rel: 2e-3,
            },
            DType::U8 | DType::I32 => Tolerance::EXACT,
        }
    }
}

/// Compares two slices; `Err` carries the report described in the module docs.
pub fn check_close(
    what: &str,
    got: &[f64],
    reference: &[f64],
    tol: Tolerance,
) -> Result<(), String> {
    if got.len() != reference.len() {
        return Err(format!(
            "{what}: length mismatch: got {} values, reference has {}",
            got.len(),
            reference.len()
        ));
    }
    let mut worst: Option<(usize, f64)> = None;
    let mut failures = 0usize;
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        if g == r || (g.is_nan() && r.is_nan()) {
            continue;
        }
        // NaN against a number, or inf against a different value, counts as an infinite error.
        let err = match (g - r).abs() {
            e if e.is_nan() => f64::INFINITY,
            e => e,
        };
        max_abs = max_abs.max(err);
        if r != 0.0 {
            max_rel = max_rel.max(err / r.abs());
        }
        let bound = tol.abs + tol.rel * r.abs();
        // A NaN bound (NaN reference) must fail too, so test "within", not "above".
        let within = err <= bound;
        if !within {
            failures += 1;
            let excess = err - bound;
            if worst.is_none_or(|(_, e)| excess > e) {
                worst = Some((i, excess));
            }
        }
    }
    let Some((wi, _)) = worst else {
        return Ok(());
    };
    let lo = wi.saturating_sub(2);
    let hi = (wi + 3).min(got.len());
    let pairs: Vec<String> = (lo..hi)
        .map(|i| format!("[{i}] got {:e} ref {:e}", got[i], reference[i]))
        .collect();
    Err(format!(
        "{what}: {failures} of {} values outside |got-ref| <= {:e} + {:e}*|ref|; worst at index {wi} \
         (got {:e}, ref {:e}); max abs err {:e}, max rel err {:e}; around the worst: {}",
        got.len(),
        tol.abs,
        tol.rel,
        got[wi],
        reference[wi],
        max_abs,
        max_rel,
        pairs.join(", ")
    ))
}

/// [`check_close`] that panics with the report; for tests.
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], reference: &[f64], tol: Tolerance) {
    if let Err(report) = check_close(what, got, reference, tol) {
        panic!("{report}");
    }
}

/// The project root for test fixtures: the source folder this was built from, or, when that
/// does not exist (test binaries copied to a GPU host), the current directory, from which
/// `.gpu/run.sh` runs them.
pub fn project_root() -> std::path::PathBuf {
    let built = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").is_dir() {
        built
    } else {
        std::env::current_dir().unwrap_or(built)
    }
}

/// Whether GPU tests must fail rather than skip (`QLORA_REQUIRE_GPU=1`, set on the GPU host).
pub fn gpu_required() -> bool {
    std::env::var("QLORA_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The CUDA device for a GPU test, or `None` after printing `SKIPPED (no CUDA device)` — unless
/// `QLORA_REQUIRE_GPU=1`, when a missing GPU panics.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    let avail = Availability::probe();
    match avail.cuda_unavailable_reason(0) {
        None => {
            // Make sure the context really comes up before handing the device out.
            if let Err(e) = cuda::CudaDevice::get(0) {
                panic!("{test}: CUDA looked available but failed to start: {e}");
            }
            Some(Device::Cuda(0))
        }
        Some(why) => {
            if gpu_required() {
                panic!("{test}: QLORA_REQUIRE_GPU=1 but no CUDA device: {why}");
            }
            eprintln!("{test}: SKIPPED (no CUDA device): {why}");
            None
        }
    }
}
