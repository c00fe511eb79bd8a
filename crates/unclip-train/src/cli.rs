//! The flags every trainer binary takes.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// The run config (YAML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override a config value, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Validate the config, build the model, print parameter counts, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Resume from `auto` (the newest complete checkpoint of the run directory) or a checkpoint path.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// Where checkpoints, logs and the resolved config go (default: runs/<config name>).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

impl TrainArgs {
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(|| {
            let stem = self
                .config
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(stem.unwrap_or_else(|| "run".into()))
        })
    }
}
