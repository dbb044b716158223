//! `qlora-rs data`: what training will see, from the model folder's tokenizer and chat template
//! alone (no weights): the summary of the dataset, a few records with the trained tokens
//! highlighted, or (`--json`) every sequence's ids and labels exactly as training uses them,
//! before packing.

use std::io::Write;
use std::path::PathBuf;

use super::formats::{ChatOptions, Format};
use super::tokenizer::TextTokenizer;
use super::{list_bad_records, load_records, DataOptions, DataStats, Sequence};
use crate::error::{Error, Result};
use crate::ops::cross_entropy::IGNORE_INDEX;
use crate::train::TrainConfig;

/// The flags of `qlora-rs data` (those of `train` that shape the data).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DataArgs {
    /// A training config (TOML, the keys of `train`): its model, data, format, seq_len,
    /// train_on_prompt, tools, chat_template_kwargs and skip_bad_records, under the flags given
    /// here.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hugging Face model folder (tokenizer.json, tokenizer_config.json; weights are not read).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Data file (JSON array or JSON Lines).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Data format: auto, text, prompt-completion, messages, alpaca, sharegpt.
    #[arg(long)]
    pub format: Option<String>,
    /// Longest sequence in tokens (default 2048, as train).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Train on prompts and user turns too.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Extra chat template variables, a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    pub chat_template_kwargs: Option<String>,
    /// A JSON file with a list of tool definitions, the `tools` of records that have none.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Leave out the records that cannot be used (listed in the summary) instead of refusing the
    /// file, as train does with the same flag.
    #[arg(long)]
    pub skip_bad_records: bool,
    /// Records to print with their trained tokens highlighted.
    #[arg(long, default_value_t = 3)]
    pub show: usize,
    /// Print one JSON object per sequence, {"record": i, "ids": […], "labels": […]} (labels
    /// -100 where no loss is taken), instead of the preview; the summary goes to stderr.
    #[arg(long)]
    pub json: bool,
}

/// The settings `data` runs with: flags over the config file over train's defaults.
fn settings(a: &DataArgs) -> Result<(PathBuf, PathBuf, DataOptions, ChatOptions)> {
    let cfg = a
        .config
        .as_deref()
        .map(TrainConfig::from_toml_file)
        .transpose()?;
    let given = |p: &Option<PathBuf>, from_cfg: Option<&PathBuf>, name: &str| {
        p.clone()
            .or_else(|| from_cfg.filter(|p| !p.as_os_str().is_empty()).cloned())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--{name} is required (on the command line or as `{name}` in --config)"
                ))
            })
    };
    let model = given(&a.model, cfg.as_ref().map(|c| &c.model), "model")?;
    let data = given(&a.data, cfg.as_ref().map(|c| &c.data), "data")?;
    let format = a
        .format
        .clone()
        .or_else(|| cfg.as_ref().map(|c| c.format.clone()))
        .unwrap_or_else(|| "auto".into());
    let seq_len = a
        .seq_len
        .or_else(|| cfg.as_ref().map(|c| c.seq_len))
        .unwrap_or(2048);
    if seq_len < 2 {
        return Err(Error::InvalidArgument(format!(
            "--seq-len must be at least 2, got {seq_len}"
        )));
    }
    let opts = DataOptions {
        format: Format::parse(&format)?,
        seq_len,
        train_on_prompt: a.train_on_prompt || cfg.as_ref().is_some_and(|c| c.train_on_prompt),
        skip_bad_records: a.skip_bad_records || cfg.as_ref().is_some_and(|c| c.skip_bad_records),
    };
    let tools = a
        .tools
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.tools.clone()));
    let kwargs = a
        .chat_template_kwargs
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.chat_template_kwargs.clone()));
    let chat = ChatOptions::parse(tools.as_deref(), kwargs.as_deref())?;
    Ok((model, data, opts, chat))
}

/// Runs `qlora-rs data`, writing to stdout (and, with `--json`, the summary to stderr).
pub fn run(a: &DataArgs) -> Result<()> {
    use std::io::IsTerminal;
    let (model, data, opts, chat) = settings(a)?;
    let tok = TextTokenizer::load(&model)?;
    let (seqs, stats) = load_records(&data, &tok, &opts, &chat)?;
    let summary = summary(&data, &opts, &stats);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let io = |e: std::io::Error| Error::InvalidArgument(format!("cannot write the output: {e}"));
    if a.json {
        eprint!("{summary}");
        for (i, s) in &seqs {
            writeln!(out, "{}", json_line(*i, s)).map_err(io)?;
        }
        return Ok(());
    }
    write!(out, "{summary}").map_err(io)?;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    for (i, s) in seqs.iter().take(a.show) {
        writeln!(
            out,
            "\nrecord {i}: {} tokens, {} trained on{}",
            s.ids.len(),
            s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
            if colour {
                " (trained text in green)"
            } else {
                " (trained text in [[…]])"
            }
        )
        .map_err(io)?;
        writeln!(out, "{}", highlight(&tok, s, colour)?).map_err(io)?;
    }
    Ok(())
}

/// `{"record": i, "ids": […], "labels": […]}`.
pub fn json_line(record: usize, s: &Sequence) -> String {
    let list = |v: &[String]| format!("[{}]", v.join(","));
    format!(
        "{{\"record\":{record},\"ids\":{},\"labels\":{}}}",
        list(&s.ids.iter().map(u32::to_string).collect::<Vec<_>>()),
        list(&s.labels.iter().map(i64::to_string).collect::<Vec<_>>())
    )
}

/// The text of a sequence with its trained runs marked: `[[…]]`, or green on a terminal.
pub fn highlight(tok: &TextTokenizer, s: &Sequence, colour: bool) -> Result<String> {
    let mut out = String::new();
    let mut t = 0;
    while t < s.ids.len() {
        let trained = s.labels[t] != IGNORE_INDEX;
        let end = (t..s.ids.len())
            .find(|&u| (s.labels[u] != IGNORE_INDEX) != trained)
            .unwrap_or(s.ids.len());
        let text = tok.decode(&s.ids[t..end], false)?;
        match (trained, colour) {
            (false, _) => out.push_str(&text),
            (true, false) => out.push_str(&format!("[[{text}]]")),
            (true, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
        }
        t = end;
    }
    Ok(out)
}

/// The data summary, as `train` prints it before it starts (and `data` and `eval` print it):
/// records per layout, records skipped (`--skip-bad-records`) and sequences dropped or truncated
/// and why, tokens and trained tokens, keys nothing used, options that change nothing
/// (`warning: …`), and a histogram of sequence lengths (powers of two up to the sequence
/// length).
pub fn summary(data: &std::path::Path, opts: &DataOptions, stats: &DataStats) -> String {
    let mut s = String::new();
    let format = stats.format.map_or("auto", Format::name);
    let kinds = if stats.kinds.len() > 1 {
        let each: Vec<String> = stats
            .kinds
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        format!(": {}", each.join(", "))
    } else {
        String::new()
    };
    s.push_str(&format!(
        "data: {} — {} records, format {format}{kinds}\n",
        data.display(),
        stats.records
    ));
    if !stats.skipped.is_empty() {
        s.push_str(&format!(
            "skipped: {} bad record{} (--skip-bad-records):{}\n",
            stats.skipped.len(),
            if stats.skipped.len() == 1 { "" } else { "s" },
            list_bad_records(&stats.skipped)
        ));
    }
    s.push_str(&format!(
        "sequences: {} kept; {} dropped with nothing to train on{}; {} truncated to {} tokens\n",
        stats.lengths.len(),
        stats.empty,
        if stats.blank > 0 {
            format!(" ({} of them with empty text)", stats.blank)
        } else {
            String::new()
        },
        stats.truncated,
        opts.seq_len
    ));
    let pct = if stats.tokens > 0 {
        100.0 * stats.counted_tokens as f64 / stats.tokens as f64
    } else {
        0.0
    };
    s.push_str(&format!(
        "tokens: {}, trained on: {} ({pct:.1}%){}\n",
        stats.tokens,
        stats.counted_tokens,
        if opts.train_on_prompt {
            " — --train-on-prompt"
        } else {
            ""
        }
    ));
    if !stats.unused.is_empty() {
        let mut unused: Vec<(&String, &usize)> = stats.unused.iter().collect();
        unused.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let each: Vec<String> = unused.iter().map(|(k, n)| format!("{n} × {k}")).collect();
        s.push_str(&format!(
            "ignored: {} (read by neither qlora-rs nor the chat template)\n",
            each.join(", ")
        ));
    }
    for w in &stats.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    if stats.lengths.is_empty() {
        return s;
    }
    // Powers of two up to the sequence length.
    let mut edges = vec![0usize];
    let mut e = 16;
    while e < opts.seq_len {
        edges.push(e);
        e *= 2;
    }
    edges.push(opts.seq_len);
    let mut counts = vec![0usize; edges.len() - 1];
    for &len in &stats.lengths {
        let b = edges
            .windows(2)
            .position(|w| len > w[0] && len <= w[1])
            .unwrap_or(counts.len() - 1);
        counts[b] += 1;
    }
    let first = counts.iter().position(|&c| c > 0).unwrap_or(0);
    let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
    let most = counts.iter().copied().max().unwrap_or(1).max(1);
    s.push_str("lengths (tokens per sequence):\n");
    for b in first..=last {
        let bar = "#".repeat((counts[b] * 40).div_ceil(most));
        s.push_str(&format!(
            "  {:>6} – {:<6} {:>7}  {bar}\n",
            edges[b] + 1,
            edges[b + 1],
            counts[b]
        ));
    }
    s
}
