//! Data: records → examples (per format) → token ids with a loss mask → packed micro-batches.
//!
//! Labels follow transformers: `labels[t] = ids[t]` where the token is trained on, −100
//! elsewhere; the model scores the logits at t against `labels[t + 1]` within each sequence.
//! Sequences are truncated to `seq_len` (keeping the start) and packed, padding-free, into
//! micro-batches of at most `batch_tokens` tokens with positions restarting per sequence.
//!
//! Every record that cannot be used is found in one pass and reported together (file, line,
//! message and what was expected); the file is refused unless `skip_bad_records`, which leaves
//! them out and lists them in [`DataStats::skipped`]. Keys that nothing reads are counted in
//! [`DataStats::unused`] (see [`formats`]).

/// Chat templates: the model's Jinja template, rendered as transformers renders it.
pub mod chat;
/// Record layouts and how each becomes text with trained spans.
pub mod formats;
/// `qlora-rs data`: what training will see, record by record.
pub mod preview;
/// Reading JSON and JSON Lines files (plain or gzip) into records.
pub mod records;
/// The tokenizer and its special tokens.
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::ops::cross_entropy::IGNORE_INDEX;
use formats::{ChatOptions, Example, Format};
use records::{BadRecord, Record};
use tokenizer::TextTokenizer;

/// One tokenized sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids.
    pub ids: Vec<u32>,
    /// The id where the token is trained on, −100 where it is not (unshifted: the loss of token
    /// i + 1 is taken at position i).
    pub labels: Vec<i64>,
}

impl Sequence {
    /// Tokens the loss counts (labels after the shift).
    pub fn counted(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// What happened while building a dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Records in the file (bad ones included).
    pub records: usize,
    /// Sequences cut to `seq_len` tokens (their start kept).
    pub truncated: usize,
    /// Sequences dropped because no token was left to train on.
    pub empty: usize,
    /// Records whose text is empty (or only whitespace), dropped (counted in `empty` too).
    pub blank: usize,
    /// Tokens in the sequences kept.
    pub tokens: usize,
    /// Tokens the loss counts.
    pub counted_tokens: usize,
    /// The format the records were read as (named or detected).
    pub format: Option<Format>,
    /// Records read per layout (`messages`, `prompt-completion (conversational)`, …), in the
    /// order first seen; bad records not counted.
    pub kinds: Vec<(&'static str, usize)>,
    /// Keys that neither qlora-rs nor the chat template used, by label (`record key `id``,
    /// `messages[].name`), with how often each was met.
    pub unused: BTreeMap<String, usize>,
    /// The records left out with `skip_bad_records`, in file order.
    pub skipped: Vec<BadRecord>,
    /// Records rendered with the chat template.
    pub chat_records: usize,
    /// What the options that shape the data change nothing with, one line each (a
    /// `--chat-template-kwargs` key the chat template never reads, …): see [`option_warnings`].
    pub warnings: Vec<String>,
    /// The length in tokens of every sequence kept, in file order.
    pub lengths: Vec<usize>,
}

/// How records become sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// `None`: detect from the first record's keys.
    pub format: Option<Format>,
    /// Longest sequence in tokens; longer ones are cut.
    pub seq_len: usize,
    /// Train on prompts and user turns too.
    pub train_on_prompt: bool,
    /// Leave out the records that cannot be used (listed in [`DataStats::skipped`]) instead of
    /// refusing the file.
    pub skip_bad_records: bool,
}

/// Tokenizes one example: ids and which tokens are trained on.
pub fn tokenize(
    tok: &TextTokenizer,
    ex: &Example,
    train_on_prompt: bool,
) -> Result<(Vec<u32>, Vec<bool>)> {
    tokenize_first(tok, ex, train_on_prompt, usize::MAX)
}

/// The part of `text` that decides its first `keep` tokens, and a margin: `keep` tokens cover at
/// most `keep · max_token_bytes` bytes, and the tokenizer's pre-splitting (at spaces,
/// punctuation, digits) stops a token at the cut from reaching back past twice that. A 20 MB
/// record at `--seq-len 64` is encoded as a few kilobytes, with the same first 64 tokens.
fn prefix_for(text: &str, keep: usize, max_token_bytes: usize) -> &str {
    let bound = keep
        .saturating_add(1)
        .saturating_mul(max_token_bytes)
        .saturating_mul(2)
        .saturating_add(4096);
    if text.len() <= bound {
        return text;
    }
    let mut cut = bound;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// [`tokenize`] where only the first `keep` tokens matter (the rest is truncated away): text
/// past what decides them is not encoded, so memory stays bounded whatever a record's size. The
/// result still has more than `keep` tokens when the record does.
pub fn tokenize_first(
    tok: &TextTokenizer,
    ex: &Example,
    train_on_prompt: bool,
    keep: usize,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let mtb = tok.max_token_bytes;
    match ex {
        Example::Segments(parts) => {
            let (mut ids, mut train) = (Vec::new(), Vec::new());
            for (i, (text, trained)) in parts.iter().enumerate() {
                if ids.len() > keep {
                    break; // later pieces start past the kept window
                }
                let text = prefix_for(text, keep - ids.len(), mtb);
                let (seg, _) = tok.encode(text, i == 0)?;
                train.extend(std::iter::repeat_n(*trained || train_on_prompt, seg.len()));
                ids.extend(seg);
            }
            // End with EOS (trained when the last piece is) so the model learns to stop.
            if let Some(eos) = tok.eos_id {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                    train.push(parts.last().is_some_and(|p| p.1) || train_on_prompt);
                }
            }
            Ok((ids, train))
        }
        Example::Chat(conv) => {
            let template = tok.chat_template.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "chat data needs a chat template, and the model's tokenizer_config.json has none".into(),
                )
            })?;
            chat_tokens(tok, template, conv, train_on_prompt, keep)
                .map_err(|e| template.explain(&conv.input, e))
        }
    }
}

/// [`tokenize_first`] for a conversation rendered with `template`.
fn chat_tokens(
    tok: &TextTokenizer,
    template: &chat::ChatTemplate,
    conv: &formats::Conversation,
    train_on_prompt: bool,
    keep: usize,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let mtb = tok.max_token_bytes;
    if train_on_prompt {
        let text = template.render_input(&conv.input, false)?;
        let (ids, _) = tok.encode(prefix_for(&text, keep, mtb), false)?;
        let train = vec![true; ids.len()];
        return Ok((ids, train));
    }
    if let Some(n) = conv.prompt_len {
        // TRL's completion mask: the tokens past the common prefix of the prompt's
        // rendering (with the generation prompt) and the whole conversation's.
        let full = template.render_input(&conv.input, false)?;
        let prompt = template.render_input(&conv.input.first(n), true)?;
        let (ids, _) = tok.encode(prefix_for(&full, keep, mtb), false)?;
        let (pids, _) = tok.encode(prefix_for(&prompt, keep, mtb), false)?;
        let common = ids.iter().zip(&pids).take_while(|(a, b)| a == b).count();
        let train = (0..ids.len()).map(|t| t >= common).collect();
        return Ok((ids, train));
    }
    let (text, spans) = template.spans(&conv.input, &conv.trained)?;
    let (ids, offsets) = tok.encode(prefix_for(&text, keep, mtb), false)?;
    // A token is trained on when it overlaps an assistant span (transformers'
    // assistant-token mask does the same for tokens straddling a span's start).
    let train = offsets
        .iter()
        .map(|&(s, e)| spans.iter().any(|&(a, b)| s < b && e > a))
        .collect();
    Ok((ids, train))
}

/// Reads, converts, tokenizes and truncates a dataset file.
pub fn load(
    path: &Path,
    tok: &TextTokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Sequence>, DataStats)> {
    let (seqs, stats) = load_records(path, tok, opts, &ChatOptions::default())?;
    Ok((seqs.into_iter().map(|(_, s)| s).collect(), stats))
}

/// Records listed in an error or a summary; the rest are counted.
pub const BAD_RECORDS_SHOWN: usize = 20;

/// `bad` as indented lines, at most [`BAD_RECORDS_SHOWN`] of them and a count of the rest.
pub fn list_bad_records(bad: &[BadRecord]) -> String {
    let mut s = String::new();
    for b in bad.iter().take(BAD_RECORDS_SHOWN) {
        s.push_str(&format!("\n  {b}"));
    }
    if bad.len() > BAD_RECORDS_SHOWN {
        s.push_str(&format!("\n  … and {} more", bad.len() - BAD_RECORDS_SHOWN));
    }
    s
}

/// The message of an error about `r`, starting with where it is.
fn located(r: &Record, e: Error) -> String {
    match e {
        Error::Format { msg, .. } if msg.starts_with("record ") => msg,
        Error::Format { msg, .. } => format!("{}: {msg}", r.locate()),
        e => format!("{}: {e}", r.locate()),
    }
}

/// What became of one record.
enum Outcome {
    /// A sequence to train on.
    Kept(Sequence),
    /// No text at all.
    Blank,
    /// Nothing left to train on after masking and truncation.
    Empty,
}

/// Converts, tokenizes and truncates one record, counting what it did not use into `stats`.
fn one_record(
    path: &Path,
    r: &Record,
    tok: &TextTokenizer,
    opts: &DataOptions,
    chat_opts: &ChatOptions,
    format: Format,
    stats: &mut DataStats,
) -> std::result::Result<Outcome, String> {
    let converted = formats::convert(path, r, format, tok.chat_template.is_some(), chat_opts)
        .map_err(|e| located(r, e))?;
    let ex = &converted.example;
    let blank = match ex {
        Example::Segments(pieces) => pieces.iter().all(|(t, _)| t.trim().is_empty()),
        Example::Chat(c) => c.is_blank(),
    };
    let mut unused = converted.unused.clone();
    let outcome = if blank {
        Outcome::Blank
    } else {
        let (mut ids, mut train) = tokenize_first(tok, ex, opts.train_on_prompt, opts.seq_len)
            .map_err(|e| located(r, e))?;
        if let (Example::Chat(c), Some(t)) = (ex, tok.chat_template.as_ref()) {
            let more = c
                .unused_keys(t)
                .map_err(|what| format!("{}: {what}", r.locate()))?;
            unused.extend(more);
        }
        let truncated = ids.len() > opts.seq_len;
        ids.truncate(opts.seq_len);
        train.truncate(opts.seq_len);
        let labels = ids
            .iter()
            .zip(&train)
            .map(|(&id, &t)| if t { id as i64 } else { IGNORE_INDEX })
            .collect();
        let seq = Sequence { ids, labels };
        stats.truncated += usize::from(truncated);
        if seq.counted() == 0 {
            Outcome::Empty
        } else {
            Outcome::Kept(seq)
        }
    };
    stats.chat_records += usize::from(matches!(ex, Example::Chat(_)));
    match stats.kinds.iter_mut().find(|(k, _)| *k == converted.kind) {
        Some((_, n)) => *n += 1,
        None => stats.kinds.push((converted.kind, 1)),
    }
    for label in unused {
        *stats.unused.entry(label).or_default() += 1;
    }
    Ok(outcome)
}

/// [`load`] with `--tools` and `--chat-template-kwargs`, each sequence with the index of its
/// record in the file. Every record that cannot be used is found before any is refused: the
/// error lists them all (the first [`BAD_RECORDS_SHOWN`], and a count of the rest), unless
/// `opts.skip_bad_records`, which leaves them out and lists them in [`DataStats::skipped`].
pub fn load_records(
    path: &Path,
    tok: &TextTokenizer,
    opts: &DataOptions,
    chat_opts: &ChatOptions,
) -> Result<(Vec<(usize, Sequence)>, DataStats)> {
    let (records, mut bad) = records::read_all(path)?;
    let total = records.len() + bad.len();
    if total == 0 {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "the dataset has no records".into(),
        });
    }
    // Detected from the first record whose keys tell (the others, if any, are bad records).
    let format = match opts.format {
        Some(f) => Some(f),
        None => match records.iter().find_map(Format::detect) {
            Some(f) => Some(f),
            None if records.is_empty() => None,
            None => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "{}: cannot tell the format from its keys ({}); expected text, \
                         prompt+completion, messages, instruction+output (alpaca) or \
                         conversations (sharegpt), or pass --format",
                        records[0].locate(),
                        records[0]
                            .fields
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        },
    };
    if matches!(format, Some(Format::Messages | Format::ShareGpt)) && tok.chat_template.is_none() {
        // Said once, not once per record.
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "format {} is rendered with the model's chat template, and its \
                 tokenizer_config.json has none",
                format.map_or("auto", Format::name)
            ),
        });
    }
    let mut stats = DataStats {
        records: total,
        format,
        ..DataStats::default()
    };
    let mut out = Vec::with_capacity(records.len());
    if let Some(format) = format {
        for r in &records {
            match one_record(path, r, tok, opts, chat_opts, format, &mut stats) {
                Ok(Outcome::Kept(seq)) => {
                    stats.tokens += seq.ids.len();
                    stats.counted_tokens += seq.counted();
                    stats.lengths.push(seq.ids.len());
                    out.push((r.index, seq));
                }
                Ok(Outcome::Blank) => {
                    stats.blank += 1;
                    stats.empty += 1;
                }
                Ok(Outcome::Empty) => stats.empty += 1,
                Err(what) => bad.push(BadRecord {
                    index: r.index,
                    line: r.line,
                    what,
                }),
            }
        }
    }
    bad.sort_by_key(|b| b.index);
    if !bad.is_empty() && (!opts.skip_bad_records || bad.len() == total) {
        let n = bad.len();
        let what = if n == total {
            format!("none of the {total} records can be used:")
        } else {
            format!(
                "{n} of {total} records cannot be used (--skip-bad-records leaves {} out):",
                if n == 1 { "it" } else { "them" }
            )
        };
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!("{what}{}", list_bad_records(&bad)),
        });
    }
    stats.skipped = bad;
    stats.warnings = option_warnings(tok, chat_opts, stats.chat_records);
    let good = total - stats.skipped.len();
    if out.is_empty() && stats.blank == good {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!("every record's text is empty ({good} records): nothing to train on"),
        });
    }
    if out.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "no record has a token left to train on: {good} records, {} truncated to {} tokens, {} \
                 with nothing to train on after masking (try --train-on-prompt or a longer --seq-len)",
                stats.truncated, opts.seq_len, stats.empty
            ),
        });
    }
    Ok((out, stats))
}

/// What `--chat-template-kwargs` and `--tools` (or the config's `chat_template_kwargs` and
/// `tools`) change nothing with, so that a typo does not pass in silence: a kwarg the chat
/// template never reads (with the name it reads that is nearest), or either given where the
/// model has no chat template or no record is rendered with it. (`tools` with a template that
/// never reads them is an error of every chat record instead; a record's own
/// `chat_template_kwargs` are counted with the keys nothing read.)
pub fn option_warnings(
    tok: &TextTokenizer,
    chat_opts: &ChatOptions,
    chat_records: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let given: Vec<&str> = [
        (!chat_opts.kwargs.is_empty()).then_some("chat_template_kwargs"),
        chat_opts.tools.is_some().then_some("tools"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let Some(template) = tok.chat_template.as_ref() else {
        for what in given {
            out.push(format!(
                "{what}: the model has no chat template, so they change nothing"
            ));
        }
        return out;
    };
    for (k, _) in &chat_opts.kwargs {
        if template.uses_variable(k) {
            continue;
        }
        let hint = template
            .variables()
            .filter(|v| *v != k)
            .map(|v| (formats::edit_distance(k, v), v))
            .filter(|&(d, _)| d <= 2)
            .min()
            .map(|(_, v)| format!(" (did you mean `{v}`?)"))
            .unwrap_or_default();
        out.push(format!(
            "chat_template_kwargs.{k}: the chat template never reads it, so it changes \
             nothing{hint}"
        ));
    }
    if chat_records == 0 {
        for what in given {
            out.push(format!(
                "{what}: no record is rendered with the chat template, so they change nothing"
            ));
        }
    }
    out
}

/// A packed micro-batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MicroBatch {
    /// The sequences' ids, one after another.
    pub ids: Vec<u32>,
    /// Their labels, likewise (−100: not trained).
    pub labels: Vec<i64>,
    /// Sequence boundaries: sequence i is `cu_seqlens[i]..cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<usize>,
}

impl MicroBatch {
    /// Tokens the loss counts (after the shift within each sequence).
    pub fn counted(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| {
                self.labels[w[0] + 1..w[1]]
                    .iter()
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum()
    }
}

/// Packs sequences (in the given order) greedily into micro-batches of at most `batch_tokens`.
pub fn pack(seqs: &[&Sequence], batch_tokens: usize) -> Vec<MicroBatch> {
    let mut batches = Vec::new();
    let mut cur = MicroBatch {
        ids: Vec::new(),
        labels: Vec::new(),
        cu_seqlens: vec![0],
    };
    for s in seqs {
        if !cur.ids.is_empty() && cur.ids.len() + s.ids.len() > batch_tokens {
            batches.push(std::mem::replace(
                &mut cur,
                MicroBatch {
                    ids: Vec::new(),
                    labels: Vec::new(),
                    cu_seqlens: vec![0],
                },
            ));
        }
        cur.ids.extend_from_slice(&s.ids);
        cur.labels.extend_from_slice(&s.labels);
        cur.cu_seqlens.push(cur.ids.len());
    }
    if !cur.ids.is_empty() {
        batches.push(cur);
    }
    batches
}

/// The order of an epoch: a permutation of `0..n` drawn from `seed` and the epoch number.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ epoch);
    order.shuffle(&mut rng);
    order
}
