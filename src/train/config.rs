//! `TrainConfig`: every setting of a training run. The command line (`qlora-rs train --help`)
//! and library users share it; a TOML file (`--config`) holds the same keys, and flags given on
//! the command line override it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::schedule::ScheduleKind;
use crate::data::formats::Format;
use crate::error::{Error, Result};
use crate::model::lora::{LoraConfig, Target};

fn d_format() -> String {
    "auto".into()
}
fn d_seq_len() -> usize {
    2048
}
fn d_batch_tokens() -> usize {
    4096
}
fn d_one() -> u64 {
    1
}
fn d_seed() -> u64 {
    42
}
fn d_lr() -> f64 {
    2e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn d_max_grad_norm() -> f64 {
    1.0
}
fn d_rank() -> usize {
    16
}
fn d_alpha() -> f64 {
    32.0
}
fn d_dropout() -> f64 {
    0.05
}
fn d_targets() -> String {
    "all".into()
}
fn d_blocksize() -> usize {
    64
}

/// A training run. Defaults follow common QLoRA practice (PEFT/TRL): rank 16, alpha 32,
/// dropout 0.05 on all seven projections, AdamW at 2e-4 with a cosine schedule, gradient
/// clipping at 1.0, sequences of up to 2048 tokens packed into micro-batches of 4096 tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model folder: config.json, *.safetensors, tokenizer.json,
    /// tokenizer_config.json.
    #[arg(long, default_value_os_t = PathBuf::new(), hide_default_value = true, value_parser = any_path())]
    #[serde(default)]
    pub model: PathBuf,
    /// Training data: a JSON array or JSON Lines file.
    #[arg(long, default_value_os_t = PathBuf::new(), hide_default_value = true, value_parser = any_path())]
    #[serde(default)]
    pub data: PathBuf,
    /// Output folder: the adapter, metrics.jsonl, loss_curve.svg/.png and checkpoints.
    #[arg(long, default_value_os_t = PathBuf::new(), hide_default_value = true, value_parser = any_path())]
    #[serde(default)]
    pub output: PathBuf,
    /// Data format: auto (from the keys), text, prompt-completion, messages, alpaca, sharegpt.
    #[arg(long, default_value = "auto")]
    #[serde(default = "d_format")]
    pub format: String,
    /// Train on prompts and user turns too (default: completions and assistant turns only).
    #[arg(long)]
    #[serde(default)]
    pub train_on_prompt: bool,
    /// A JSON file with a list of tool definitions, passed to the chat template as `tools` for
    /// records that have none of their own.
    #[arg(long, value_parser = any_path())]
    #[serde(default)]
    pub tools: Option<PathBuf>,
    /// Extra chat template variables, a JSON object, e.g. '{"enable_thinking": false}' (a
    /// record's own `chat_template_kwargs` go over these).
    #[arg(long)]
    #[serde(default)]
    pub chat_template_kwargs: Option<String>,
    /// Leave out the records that cannot be used (each listed in the data summary) instead of
    /// refusing the file; without it, every bad record is listed and nothing is trained.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_records: bool,
    /// Longest sequence in tokens; longer records are cut, keeping the start (and counted).
    #[arg(long, default_value_t = 2048)]
    #[serde(default = "d_seq_len")]
    pub seq_len: usize,
    /// Tokens per packed micro-batch (at least --seq-len).
    #[arg(long, default_value_t = 4096)]
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    /// Micro-batches per optimizer step (the loss is normalised by all their counted tokens).
    #[arg(long, default_value_t = 1)]
    #[serde(default = "d_one")]
    pub grad_accum: u64,
    /// Passes over the data (ignored when --max-steps is given).
    #[arg(long, default_value_t = 1)]
    #[serde(default = "d_one")]
    pub epochs: u64,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Seed of the data order, adapter initialisation and dropout.
    #[arg(long, default_value_t = 42)]
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub weight_decay: f64,
    /// Learning-rate schedule: cosine, linear or constant.
    #[arg(long, default_value = "cosine", value_parser = parse_schedule)]
    #[serde(default = "d_schedule")]
    pub schedule: ScheduleKind,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "d_max_grad_norm")]
    pub max_grad_norm: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = 16)]
    #[serde(default = "d_rank")]
    pub rank: usize,
    /// LoRA alpha (scale alpha/r, or alpha/√r with --rslora).
    #[arg(long, default_value_t = 32.0)]
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Projections to adapt: any of q,k,v,o,gate,up,down (Phi-3: qkv,o,gate_up,down), or all.
    #[arg(long, default_value = "all")]
    #[serde(default = "d_targets")]
    pub targets: String,
    /// Rank-stabilised LoRA scaling (alpha/√r).
    #[arg(long)]
    #[serde(default)]
    pub rslora: bool,
    /// NF4 block size of the quantized base.
    #[arg(long, default_value_t = 64)]
    #[serde(default = "d_blocksize")]
    pub quant_blocksize: usize,
    /// Evaluation data (a file in the same formats).
    #[arg(long)]
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training records for evaluation instead.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub eval_split: f64,
    /// Log every N optimizer steps (and the last): the mean of those steps' losses, the grad norm,
    /// tokens/s and memory. On a GPU the host reads the losses back only on these steps.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub logging_steps: u64,
    /// Evaluate every N optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub eval_every: u64,
    /// Write a checkpoint every N optimizer steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub save_every: u64,
    /// Continue the run in --output from its latest checkpoint.
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,
    /// Replace an earlier run in --output.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
}

/// Paths, the empty one included (it stands for "not given" until the config file is merged).
fn any_path() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser;
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

fn parse_schedule(s: &str) -> std::result::Result<ScheduleKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

impl TrainConfig {
    /// A configuration with every default, for library users.
    pub fn new(
        model: impl Into<PathBuf>,
        data: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> TrainConfig {
        let v = serde_json::json!({
            "model": model.into(),
            "data": data.into(),
            "output": output.into(),
        });
        serde_json::from_value(v).expect("defaults deserialize")
    }

    /// Reads a TOML file of the same keys.
    pub fn from_toml_file(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a valid training config: {e}"),
        })
    }

    /// The configuration as TOML (written beside the adapter as training_config.toml).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }

    /// The adapters' configuration, validated.
    pub fn lora(&self) -> Result<LoraConfig> {
        let cfg = LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            rslora: self.rslora,
            dropout: self.dropout,
            targets: Target::parse_list(&self.targets)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// What `tools` and `chat_template_kwargs` add to every chat record.
    pub fn chat_options(&self) -> Result<crate::data::formats::ChatOptions> {
        crate::data::formats::ChatOptions::parse(
            self.tools.as_deref(),
            self.chat_template_kwargs.as_deref(),
        )
    }

    /// How the data files become sequences: format, seq_len, train_on_prompt, skip_bad_records.
    pub fn data_options(&self) -> Result<crate::data::DataOptions> {
        Ok(crate::data::DataOptions {
            format: self.data_format()?,
            seq_len: self.seq_len,
            train_on_prompt: self.train_on_prompt,
            skip_bad_records: self.skip_bad_records,
        })
    }

    /// `format` parsed (`None` for auto).
    pub fn data_format(&self) -> Result<Option<Format>> {
        Format::parse(&self.format)
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        for (name, p) in [
            ("model", &self.model),
            ("data", &self.data),
            ("output", &self.output),
        ] {
            if p.as_os_str().is_empty() {
                return bad(format!(
                    "--{name} is required (on the command line or as `{name}` in --config)"
                ));
            }
        }
        if self.seq_len < 2 {
            return bad(format!(
                "--seq-len must be at least 2, got {}",
                self.seq_len
            ));
        }
        if self.batch_tokens < self.seq_len {
            return bad(format!(
                "--batch-tokens ({}) must be at least --seq-len ({})",
                self.batch_tokens, self.seq_len
            ));
        }
        if self.grad_accum == 0
            || self.epochs == 0
            || self.max_steps == Some(0)
            || self.logging_steps == 0
        {
            return bad(
                "--grad-accum, --epochs, --max-steps and --logging-steps must be at least 1".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return bad(format!(
                "--alpha must be positive and finite, got {}",
                self.alpha
            ));
        }
        for (name, v) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            // β = 1 never forgets (m̂ = m/0 at every step): NaN from the first update.
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad(format!(
                "--eps must be positive and finite, got {}",
                self.eps
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!(
                "--weight-decay must be 0 or positive and finite, got {}",
                self.weight_decay
            ));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad(format!(
                "--max-grad-norm must be 0 (no clipping) or positive and finite, got {}",
                self.max_grad_norm
            ));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return bad(format!(
                "--eval-split must be in [0, 1), got {}",
                self.eval_split
            ));
        }
        if self.eval_data.is_some() && self.eval_split > 0.0 {
            return bad("give --eval-data or --eval-split, not both".into());
        }
        if self.resume && self.overwrite {
            return bad("--resume and --overwrite contradict each other".into());
        }
        crate::quant::nf4::check_blocksize(self.quant_blocksize)?;
        self.lora()?;
        self.data_format()?;
        Ok(())
    }
}

fn one() -> u64 {
    1
}
