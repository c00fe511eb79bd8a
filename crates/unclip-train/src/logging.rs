//! TensorBoard scalars (tensorboard-rs), the same scalars as JSON lines (`metrics.jsonl`, for
//! scripts and plots without TensorBoard) and console progress (an indicatif bar on a terminal,
//! plain periodic lines otherwise).

use crate::config::{LoggingConfig, ProgressStyle};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget};
use std::io::IsTerminal;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tensorboard_rs::summary_writer::SummaryWriter;

pub struct Logger {
    tb: Option<SummaryWriter>,
    /// `<run>/metrics.jsonl`, appended to (a resumed run continues the file).
    jsonl: Option<(std::fs::File, std::path::PathBuf)>,
    bar: Option<ProgressBar>,
    lines: bool,
    total: u64,
}

impl Logger {
    /// Event files go to `<run_dir>/tensorboard`.
    pub fn new(
        run_dir: &Path,
        cfg: &LoggingConfig,
        total_steps: u64,
        start_step: u64,
    ) -> Result<Self> {
        let tb = if cfg.tensorboard {
            let dir = run_dir.join("tensorboard");
            // tensorboard-rs panics on I/O errors: make sure the directory is usable first.
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let probe = dir.join(".writable");
            std::fs::write(&probe, b"")
                .with_context(|| format!("{} is not writable", dir.display()))?;
            let _ = std::fs::remove_file(probe);
            Some(SummaryWriter::new(&dir))
        } else {
            None
        };
        let jsonl = if cfg.jsonl {
            let path = run_dir.join("metrics.jsonl");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Some((file, path))
        } else {
            None
        };
        let terminal = std::io::stdout().is_terminal();
        let (bar, lines) = match cfg.progress {
            ProgressStyle::Off => (false, false),
            ProgressStyle::Bar => (true, false),
            ProgressStyle::Lines => (false, true),
            ProgressStyle::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let b = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stdout());
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            ) {
                b.set_style(style);
            }
            b.set_position(start_step);
            b
        });
        Ok(Self {
            tb,
            jsonl,
            bar,
            lines,
            total: total_steps,
        })
    }

    /// Images as [3, H, W] tensors, uint8 or float in [0, 1].
    pub fn images(&mut self, step: u64, images: &[(String, Tensor)]) -> Result<()> {
        let Some(tb) = &mut self.tb else {
            return Ok(());
        };
        for (tag, img) in images {
            let size = img.size();
            let hwc = rgb_bytes(img).with_context(|| format!("image `{tag}`"))?;
            // tensorboard-rs reads interleaved RGB rows and takes dim[1] as the width.
            tb.add_image(
                tag,
                &hwc,
                &[3, size[2] as usize, size[1] as usize],
                step as usize,
            );
        }
        tb.flush();
        Ok(())
    }

    /// `values` at `step`: to TensorBoard, and as one line `{"step": …, "time": …, tag: value, …}`
    /// (Unix seconds; a non-finite value as null) to `metrics.jsonl`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        if let Some(tb) = &mut self.tb {
            for (tag, v) in values {
                tb.add_scalar(tag, *v as f32, step as usize);
            }
            tb.flush();
        }
        if let Some((file, path)) = &mut self.jsonl {
            let time = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let mut line = serde_json::Map::new();
            line.insert("step".into(), step.into());
            line.insert("time".into(), time.into());
            for (tag, v) in values {
                line.insert(tag.clone(), (*v).into());
            }
            use std::io::Write;
            writeln!(file, "{}", serde_json::Value::Object(line))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// After every step: moves the bar; on log steps prints a line when not on a terminal.
    pub fn progress(
        &mut self,
        step: u64,
        loss: f64,
        samples_per_sec: f64,
        eta_secs: f64,
        log_step: bool,
    ) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4} {samples_per_sec:.1} samples/s"));
        } else if self.lines && log_step {
            println!(
                "step {step}/{} loss {loss:.4} {samples_per_sec:.1} samples/s eta {}s",
                self.total,
                eta_secs.round()
            );
        }
    }

    pub fn message(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => println!("{msg}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        if let Some(tb) = &mut self.tb {
            tb.flush();
        }
    }
}

/// A [3, H, W] image (uint8, or float in [0, 1]) as interleaved RGB bytes, row by row: the bytes
/// `write_png` and TensorBoard get.
pub fn rgb_bytes(img: &Tensor) -> Result<Vec<u8>> {
    let size = img.size();
    if size.len() != 3 || size[0] != 3 {
        bail!("must be [3, H, W], got {size:?}");
    }
    let img = if img.kind() == Kind::Uint8 {
        img.shallow_clone()
    } else {
        (img.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
            .round()
            .to_kind(Kind::Uint8)
    };
    Ok(Vec::try_from(
        img.to_device(Device::Cpu)
            .permute([1, 2, 0])
            .contiguous()
            .flatten(0, -1),
    )?)
}

/// Writes a [3, H, W] image (uint8, or float in [0, 1]) as a PNG file, atomically, creating its
/// directory.
pub fn write_png(path: &Path, img: &Tensor) -> Result<()> {
    let rgb = rgb_bytes(img).with_context(|| format!("{}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (h, w) = (img.size()[1] as u32, img.size()[2] as u32);
    let buf = image::RgbImage::from_raw(w, h, rgb).context("image buffer size")?;
    let tmp = path.with_extension("png.tmp");
    buf.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
