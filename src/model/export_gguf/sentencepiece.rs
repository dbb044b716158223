//! A reader for SentencePiece's `tokenizer.model`: the protobuf `ModelProto`, of which only the
//! pieces are read (`repeated SentencePiece pieces = 1`, each `piece = 1` (string),
//! `score = 2` (float), `type = 3` (enum: 1 normal, 2 unknown, 3 control, 4 user defined,
//! 5 unused, 6 byte; 1 when absent)), every other field skipped by its wire type. This is what
//! llama.cpp's converter takes from the file (`SentencePieceProcessor.IdToPiece`, `GetScore`,
//! `IsUnknown`/`IsControl`/`IsUnused`/`IsByte`).

use std::path::Path;

use crate::error::{Error, Result};

/// A normal piece (`ModelProto.SentencePiece.Type`).
pub const NORMAL: i32 = 1;
/// The unknown piece.
pub const UNKNOWN: i32 = 2;
/// A control piece (`<s>`, `</s>`, …).
pub const CONTROL: i32 = 3;
/// A user-defined piece (always one token).
pub const USER_DEFINED: i32 = 4;
/// An unused piece.
pub const UNUSED: i32 = 5;
/// A byte piece (`<0xAB>`, for byte fallback).
pub const BYTE: i32 = 6;

/// One piece of the model, by id.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its text (`▁` for a space; `<0xAB>` for a byte piece).
    pub piece: String,
    /// Its score (for BPE models, minus the merge rank).
    pub score: f32,
    /// Its type ([`NORMAL`] … [`BYTE`]).
    pub kind: i32,
}

/// A cursor over protobuf bytes, with errors naming the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: &str) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            msg: format!(
                "not a SentencePiece model (protobuf ModelProto): {msg} at byte {}",
                self.pos
            ),
        }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| self.err("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err("field runs past the end"))?;
        let b = &self.buf[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    /// The next (field number, wire type), or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some((k >> 3, (k & 7) as u8)))
    }

    /// A length-delimited field's bytes.
    fn delimited(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()?;
        self.bytes(usize::try_from(n).map_err(|_| self.err("length too large"))?)
    }

    /// Skips a field of wire type `wire`.
    fn skip(&mut self, wire: u8) -> Result<()> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.bytes(8).map(drop),
            2 => self.delimited().map(drop),
            5 => self.bytes(4).map(drop),
            w => Err(self.err(&format!("unsupported wire type {w}"))),
        }
    }
}

fn piece(buf: &[u8], path: &Path) -> Result<Piece> {
    let mut r = Reader { buf, pos: 0, path };
    let (mut text, mut score, mut kind) = (None, 0.0f32, NORMAL);
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 2) => {
                let b = r.delimited()?;
                text = Some(
                    std::str::from_utf8(b)
                        .map_err(|_| r.err("a piece is not UTF-8"))?
                        .to_string(),
                );
            }
            (2, 5) => score = f32::from_le_bytes(r.bytes(4)?.try_into().expect("4 bytes")),
            (3, 0) => {
                kind = i32::try_from(r.varint()?).map_err(|_| r.err("piece type out of range"))?
            }
            (_, w) => r.skip(w)?,
        }
    }
    if !(NORMAL..=BYTE).contains(&kind) {
        return Err(r.err(&format!("piece type {kind} (expected 1 to 6)")));
    }
    let piece = text.ok_or_else(|| r.err("a piece without its text"))?;
    Ok(Piece { piece, score, kind })
}

/// The pieces of the SentencePiece model `path`, by id.
pub fn read_pieces(path: &Path) -> Result<Vec<Piece>> {
    let buf = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut r = Reader {
        buf: &buf,
        pos: 0,
        path,
    };
    let mut pieces = Vec::new();
    while let Some((field, wire)) = r.key()? {
        if (field, wire) == (1, 2) {
            let b = r.delimited()?;
            pieces.push(piece(b, path)?);
        } else {
            r.skip(wire)?;
        }
    }
    if pieces.is_empty() {
        return Err(r.err("no pieces"));
    }
    Ok(pieces)
}
