//! What the benchmarks against PyTorch share: the reference side as a long-lived Python process
//! that times turns of training steps on request (`scripts/bench/*_step.py --serve`), so ours and
//! theirs can alternate short turns and a shared machine's drifts in speed hit both alike; and the
//! median and quartiles of the rounds' figures.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use tch::Device;

pub type BenchError = Box<dyn std::error::Error>;

/// The reference scripts' DEVICE argument for `device`.
pub fn script_device(device: Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

/// Waits for the GPU's queued work (nothing on CPU), so that a timer brackets the work itself.
pub fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// This process's resident memory in MiB: `VmRSS` (now) or `VmHWM` (the peak so far), from
/// /proc/self/status (None elsewhere). The reference scripts measure theirs the same way.
pub fn resident_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `unclip_train::malloc::retain_freed_memory`'s settings as glibc's environment tunables.
const GLIBC_RETAIN_FREED: &str = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647";

/// A `SCRIPT ARGS --serve` process: it prints any `key value` lines, then `ready`, then answers
/// each stdin line `N` with `seconds S`, the time N steps took.
pub struct ServedReference {
    script: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
    /// The `key value` lines printed before `ready` (e.g. `flops_per_step`, `device_name`).
    pub info: Vec<(String, String)>,
}

impl ServedReference {
    /// Starts `python script args --serve` and waits for its `ready`.
    pub fn spawn(python: &str, script: &str, args: &[String]) -> Result<Self, BenchError> {
        Self::spawn_with_env(python, script, args, &[])
    }

    /// [`ServedReference::spawn`] with glibc malloc set as our trainers set it
    /// (`unclip_train::malloc`), to show how much of a lead is ours beyond those settings.
    pub fn spawn_with_our_malloc(
        python: &str,
        script: &str,
        args: &[String],
    ) -> Result<Self, BenchError> {
        Self::spawn_with_env(
            python,
            script,
            args,
            &[("GLIBC_TUNABLES", GLIBC_RETAIN_FREED)],
        )
    }

    fn spawn_with_env(
        python: &str,
        script: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Self, BenchError> {
        static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("unclip-bench-{}-{n}.log", std::process::id()));
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .args(args)
            .arg("--serve")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd.spawn().map_err(|e| format!("{python} {script}: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("python's pipes were not set up".into());
        };
        let mut reference = Self {
            script: script.into(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
            log,
            info: Vec::new(),
        };
        loop {
            let line = reference.line()?;
            let line = line.trim();
            if line == "ready" {
                return Ok(reference);
            }
            if let Some((key, value)) = line.split_once(' ') {
                reference.info.push((key.into(), value.trim().into()));
            }
        }
    }

    /// The value of a `key value` line printed before `ready`.
    pub fn info(&self, key: &str) -> Option<&str> {
        self.info
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The next line the script prints; its stderr when it has exited instead.
    fn line(&mut self) -> Result<String, BenchError> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let _ = self.child.wait();
            let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(format!("{} exited: {stderr}", self.script).into());
        }
        Ok(line)
    }

    /// Seconds for `steps` training steps.
    pub fn turn(&mut self, steps: i64) -> Result<f64, BenchError> {
        writeln!(self.stdin, "{steps}")?;
        self.stdin.flush()?;
        let line = self.line()?;
        let seconds = line
            .strip_prefix("seconds ")
            .ok_or_else(|| format!("unexpected line from {}: {line}", self.script))?;
        Ok(seconds.trim().parse()?)
    }
}

impl Drop for ServedReference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Rounds to run: `UNCLIP_BENCH_ROUNDS`, else `default` (at least 1).
pub fn rounds(default: usize) -> usize {
    std::env::var("UNCLIP_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// Lower quartile, median and upper quartile (nearest rank).
pub fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}

/// Prints each side's figures per round (`rounds (UNIT): ours … | diffusers …`), then the header
/// of the table [`ratio_row`] fills.
pub fn print_rounds(unit: &str, decimals: usize, sides: &[(&str, &[f64])]) {
    let sides: Vec<String> = sides
        .iter()
        .map(|(name, values)| {
            let figures: Vec<String> = values.iter().map(|x| format!("{x:.decimals$}")).collect();
            format!("{name} {}", figures.join(" "))
        })
        .collect();
    println!("rounds ({unit}): {}", sides.join(" | "));
    println!(
        "{:<36} {:>9} {:>7} {:>14}",
        "median of rounds", unit, "ratio", "quartiles"
    );
}

/// A table row: `name`, the median of `values` and the median and quartiles of `ratios`.
pub fn ratio_row(name: &str, values: Vec<f64>, ratios: Vec<f64>) -> String {
    let [q1, median, q3] = quartiles(ratios);
    format!(
        "{name:<36} {:>9.2} {median:>6.2}x {:>14}",
        quartiles(values)[1],
        format!("{q1:.2}–{q3:.2}x")
    )
}
