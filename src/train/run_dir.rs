//! The output folder of a training run: who may write it and when an old run is replaced.
//!
//! - A lock (`.qlora-rs.lock`, an advisory `flock` the OS releases when the process ends, even
//!   by `kill -9`) lets one run at a time write the folder; a second one is refused, naming the
//!   process that holds it.
//! - A folder that holds another run is refused unless `--resume` or `--overwrite`; with
//!   `--overwrite` the old run's files are removed only after the new run has loaded its model,
//!   tokenizer, data and adapters, so a typo in any input leaves the old run as it was.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::config::TrainConfig;
use crate::error::{Error, Result};

/// Files that mark a folder as holding a run.
const RUN_FILES: [&str; 6] = [
    "metrics.jsonl",
    "checkpoints",
    "adapter_model.safetensors",
    "adapter_config.json",
    "loss_curve.svg",
    "loss_curve.png",
];

const LOCK_FILE: &str = ".qlora-rs.lock";

/// The output folder, locked for this process until it is dropped.
#[derive(Debug)]
pub struct RunDir {
    _lock: File,
    /// The previous run's files, to remove before the first write (`--overwrite`).
    replaced: Vec<PathBuf>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An exclusive advisory lock on `file` without waiting: `Ok(false)` when another open file
/// holds it. (`File::try_lock` does this from Rust 1.89; the crate supports 1.85.)
fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor this File owns and keeps open; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl RunDir {
    /// Takes the folder for `cfg`'s run: creates it when missing, locks it, and checks that it
    /// holds no other run (or that `--resume`/`--overwrite` says what to do with it). Removes
    /// nothing: see [`RunDir::start`].
    pub fn open(cfg: &TrainConfig) -> Result<RunDir> {
        let out = &cfg.output;
        if out.exists() && !out.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "--output {} is a file; give a folder (it is created when missing)",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(io(out))?;
        let path = out.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        // A lock "held" by this very process after it released it is a child process that was
        // being started at that moment (between fork and exec it shares our descriptors, the
        // lock's included): wait for the exec (a few milliseconds) before calling it a conflict.
        let own = std::process::id().to_string();
        let mut tries = 0;
        let locked = loop {
            match try_lock(&file) {
                Ok(false) if tries < 50 => {
                    let mut holder = String::new();
                    let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
                    if holder.trim() != own {
                        break Ok(false);
                    }
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other,
            }
        };
        match locked {
            Ok(true) => {}
            Ok(false) => {
                let mut holder = String::new();
                let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
                let holder = holder.trim();
                return Err(Error::InvalidArgument(format!(
                    "{} is in use by another qlora-rs run ({}): wait for it to finish, or stop \
                     it, or train into another --output",
                    out.display(),
                    if holder.is_empty() {
                        "process unknown".to_string()
                    } else {
                        format!("process {holder}")
                    }
                )));
            }
            Err(e) => return Err(io(&path)(e)),
        }
        // Ours now: say who holds it, for a second run's message.
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        write!(file, "{}", std::process::id()).map_err(io(&path))?;
        let found: Vec<&str> = RUN_FILES
            .iter()
            .copied()
            .filter(|f| out.join(f).exists())
            .collect();
        if !found.is_empty() && !cfg.resume && !cfg.overwrite {
            return Err(Error::InvalidArgument(format!(
                "{} holds another run ({}): pass --resume to continue it or --overwrite to replace it",
                out.display(),
                found.join(", ")
            )));
        }
        let replaced = if cfg.overwrite {
            found.iter().map(|f| out.join(f)).collect()
        } else {
            Vec::new()
        };
        Ok(RunDir {
            _lock: file,
            replaced,
        })
    }

    /// The new run has started (every input loaded): remove the run it replaces.
    pub fn start(&mut self) -> Result<()> {
        for p in std::mem::take(&mut self.replaced) {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io(&p))?;
        }
        Ok(())
    }
}
