//! A small PNG encoder: 8-bit RGB, one zlib stream (flate2) in one IDAT chunk, every chunk
//! with its CRC-32.

use std::io::Write;

use flate2::write::ZlibEncoder;
use flate2::{Compression, Crc};

/// The eight bytes every PNG file starts with.
pub(crate) const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Appends a chunk: length, type, data, CRC-32 of type and data.
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// `rgb` (`width × height` pixels, row by row, 3 bytes each) as a PNG file. Each row is stored
/// with filter 2 ("up": the difference from the row above), which turns the chart's repeated
/// rows into zeros before compression.
pub(crate) fn encode_rgb(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    assert_eq!(rgb.len(), width * height * 3, "pixel count");
    let mut out = SIGNATURE.to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let stride = width * 3;
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    let mut row = vec![0u8; stride + 1];
    for y in 0..height {
        let cur = &rgb[y * stride..(y + 1) * stride];
        row[0] = 2;
        for (i, &b) in cur.iter().enumerate() {
            let up = if y > 0 { rgb[(y - 1) * stride + i] } else { 0 };
            row[i + 1] = b.wrapping_sub(up);
        }
        z.write_all(&row).expect("writing to memory");
    }
    let idat = z.finish().expect("writing to memory");
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}
