//! `qlora-rs data`: what training will see, from the model folder's tokenizer and chat template
//! alone (no weights): the summary of the dataset, a few records with the trained tokens
//! highlighted, or (`--json`) every sequence's ids and labels exactly as training uses them,
//! before packing.

use std::io::Write;
use std::path::PathBuf;

use super::formats::{ChatOptions, Format};
use super::tokenizer::TextTokenizer;
use super::{load_records, DataOptions, DataStats, Sequence};
use crate::error::{Error, Result};
use crate::ops::cross_entropy::IGNORE_INDEX;
use crate::train::TrainConfig;

/// The flags of `qlora-rs data` (those of `train` that shape the data).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DataArgs {
    /// A training config (TOML, the keys of `train`): its model, data, format, seq_len and
    /// train_on_prompt, under the flags given here.
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
    let summary = summary(&data, &opts, &stats, &seqs);
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

/// The summary `train` would start from: records, format, what was kept and dropped, tokens
/// and a histogram of sequence lengths.
pub fn summary(
    data: &std::path::Path,
    opts: &DataOptions,
    stats: &DataStats,
    seqs: &[(usize, Sequence)],
) -> String {
    let mut s = String::new();
    let format = stats.format.map_or("auto", Format::name);
    s.push_str(&format!(
        "data: {} — {} records, format {format}\n",
        data.display(),
        stats.records
    ));
    s.push_str(&format!(
        "sequences: {} kept; {} dropped with nothing to train on{}; {} truncated to {} tokens\n",
        seqs.len(),
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
    if seqs.is_empty() {
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
    for (_, q) in seqs {
        let b = edges
            .windows(2)
            .position(|w| q.ids.len() > w[0] && q.ids.len() <= w[1])
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
