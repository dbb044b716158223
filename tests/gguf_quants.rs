//! GGUF quantization against llama.cpp itself (tests/fixtures/gguf/quants.gguf, made by
//! tests/fixtures/make_gguf_quant_fixtures.py with ggml's `ggml_quantize_chunk`, imatrix NULL):
//! our bytes equal llama.cpp's for every type on every row of an awkward input, our
//! dequantization of llama.cpp's bytes equals ggml's `to_float`, and bad shapes and values are
//! refused.

use std::path::PathBuf;

use qlora_rs::quant::ggml_quants::{quantize, QUANTIZE_TYPES};
use qlora_rs::quant::gguf::{self, GgmlType, GgufFile};

fn fixture() -> GgufFile {
    let p: PathBuf = qlora_rs::testing::project_root().join("tests/fixtures/gguf/quants.gguf");
    GgufFile::open(&p).unwrap()
}

/// The fixture's input rows and their descriptions.
fn input(g: &GgufFile) -> (Vec<f32>, usize, Vec<String>) {
    let t = g.tensor("input").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F32);
    let row_len = t.dims[0];
    let descs = g
        .get("qlora.rows")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    assert_eq!(descs.len(), t.dims[1]);
    (g.dequantize("input").unwrap(), row_len, descs)
}

/// The first difference between two quantized tensors, as row, block and byte within the block.
fn first_mismatch(
    ty: GgmlType,
    ours: &[u8],
    theirs: &[u8],
    row_len: usize,
    descs: &[String],
) -> Option<String> {
    let size = ty.type_size().unwrap();
    let row_bytes = row_len / ty.block_size().unwrap() * size;
    let i = ours.iter().zip(theirs).position(|(a, b)| a != b)?;
    let (row, in_row) = (i / row_bytes, i % row_bytes);
    let (block, byte) = (in_row / size, in_row % size);
    let b0 = row * row_bytes + block * size;
    let n_rows = (0..descs.len())
        .filter(|r| ours[r * row_bytes..][..row_bytes] != theirs[r * row_bytes..][..row_bytes])
        .count();
    Some(format!(
        "{ty}: row {row} ({}), block {block}, byte {byte}: ours {:#04x}, llama.cpp {:#04x} \
         ({n_rows} rows differ)\n  ours      {:02x?}\n  llama.cpp {:02x?}",
        descs[row],
        ours[i],
        theirs[i],
        &ours[b0..b0 + size],
        &theirs[b0..b0 + size]
    ))
}

#[test]
fn gguf_quantize_matches_llama_cpp_byte_for_byte() {
    let g = fixture();
    let (x, row_len, descs) = input(&g);
    let mut tested = vec![];
    let mut failures = vec![];
    for t in g.tensors.iter().filter(|t| t.name.starts_with("quant.")) {
        let ty = t.ggml_type;
        assert_eq!(t.name, format!("quant.{ty}"));
        assert_eq!(t.dims, [row_len, descs.len()], "{}", t.name);
        let ours = quantize(ty, &x, row_len).unwrap();
        let theirs = g.tensor_bytes(t);
        assert_eq!(ours.len(), theirs.len(), "{ty}");
        failures.extend(first_mismatch(ty, &ours, theirs, row_len, &descs));
        tested.push(ty);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // F32 is a copy of the input.
    let f32_bytes = quantize(GgmlType::F32, &x, row_len).unwrap();
    assert_eq!(f32_bytes, g.tensor_bytes(g.tensor("input").unwrap()));
    tested.push(GgmlType::F32);
    tested.sort_by_key(|t| t.0);
    let mut all = QUANTIZE_TYPES.to_vec();
    all.sort_by_key(|t| t.0);
    assert_eq!(
        tested, all,
        "the fixture must cover every type quantize writes"
    );
}

#[test]
fn gguf_quantize_is_row_local_and_thread_count_free() {
    // One row at a time (a different split into tasks) and one thread give the same bytes.
    let g = fixture();
    let (x, row_len, _) = input(&g);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q5_0] {
        let all = quantize(ty, &x, row_len).unwrap();
        let one_thread = pool.install(|| quantize(ty, &x, row_len).unwrap());
        assert!(all == one_thread, "{ty}");
        let by_row: Vec<u8> = x
            .chunks(row_len)
            .flat_map(|r| quantize(ty, r, row_len).unwrap())
            .collect();
        assert!(all == by_row, "{ty}");
    }
}

#[test]
fn gguf_dequantize_matches_ggml_on_llama_cpp_bytes() {
    let g = fixture();
    let (_, row_len, descs) = input(&g);
    let rows: Vec<usize> = g
        .get("qlora.dequant_rows")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut types = vec![];
    for t in g.tensors.iter().filter(|t| t.name.starts_with("dequant.")) {
        let ty_name = &t.name["dequant.".len()..];
        let q = g.tensor(&format!("quant.{ty_name}")).unwrap();
        let ty = q.ggml_type;
        assert!(ty.is_supported(), "{ty}");
        let want = g.dequantize(&t.name).unwrap();
        assert_eq!(want.len(), rows.len() * row_len);
        let bytes = g.tensor_bytes(q);
        let row_bytes = bytes.len() / descs.len();
        for (k, &r) in rows.iter().enumerate() {
            let mut ours = vec![0.0f32; row_len];
            gguf::dequantize(ty, &bytes[r * row_bytes..][..row_bytes], &mut ours).unwrap();
            let theirs = &want[k * row_len..][..row_len];
            for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits(),
                    "{ty}: row {r} ({}), value {i} (block {}): ours {a:e}, ggml {b:e}",
                    descs[r],
                    i / ty.block_size().unwrap()
                );
            }
        }
        // The whole tensor through the file reader, for the types import-gguf now reads.
        let all = g.dequantize(&q.name).unwrap();
        assert_eq!(&all[rows[0] * row_len..][..row_len], &want[..row_len]);
        types.push(ty);
    }
    types.sort_by_key(|t| t.0);
    let mut want: Vec<GgmlType> = QUANTIZE_TYPES
        .iter()
        .copied()
        .filter(|t| t.block_size() != Some(1))
        .collect();
    want.sort_by_key(|t| t.0);
    assert_eq!(types, want);
}

#[test]
fn gguf_quantize_rejects_bad_row_lengths_types_and_values() {
    let x = vec![0.5f32; 2048];
    for (ty, row_len, block) in [
        (GgmlType::Q4_K, 512 + 32, 256),
        (GgmlType::Q6_K, 128, 256),
        (GgmlType::Q5_K, 0, 256),
        (GgmlType::Q8_0, 48, 32),
        (GgmlType::Q5_1, 16, 32),
    ] {
        let e = quantize(ty, &x[..row_len * 2], row_len)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("rows of {row_len} values"))
                && e.contains(&format!("blocks of {block}"))
                && e.contains(&ty.name()),
            "{e}"
        );
    }
    let e = quantize(GgmlType::Q4_0, &x[..96], 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("96 values are not a whole number of rows of 64"),
        "{e}"
    );
    let e = quantize(GgmlType(10), &x[..256], 256)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot quantize to Q2_K") && e.contains("Q5_K"),
        "{e}"
    );

    let mut y = vec![0.25f32; 3 * 256];
    y[256 + 5] = f32::NAN;
    let e = quantize(GgmlType::Q4_K, &y, 256).unwrap_err().to_string();
    assert!(e.contains("row 1, column 5 is NaN"), "{e}");
    y[256 + 5] = 0.0;
    y[2 * 256 + 255] = f32::NEG_INFINITY;
    let e = quantize(GgmlType::Q8_0, &y, 256).unwrap_err().to_string();
    assert!(e.contains("row 2, column 255 is -inf"), "{e}");
    // The plain types convert any value (NaN as ggml writes it, a quiet NaN keeping the sign).
    let h = quantize(GgmlType::F16, &[f32::NAN, -f32::NAN, f32::INFINITY, 1e5], 4).unwrap();
    assert_eq!(h, [0x00, 0x7e, 0x00, 0xfe, 0x00, 0x7c, 0x00, 0x7c]);
    let b = quantize(GgmlType::BF16, &[f32::INFINITY, 1.0], 2).unwrap();
    assert_eq!(b, [0x80, 0x7f, 0x80, 0x3f]);
}
