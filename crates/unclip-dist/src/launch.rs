//! A minimal local launcher, like `torchrun --standalone`: starts `world` copies of a program on
//! this machine with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, and waits
//! for them with a time limit. For tests and quick single-node runs; real jobs use torchrun.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How one rank ended.
#[derive(Debug)]
pub struct RankOutput {
    pub rank: usize,
    pub success: bool,
    /// stdout then stderr.
    pub output: String,
}

/// A free TCP port on 127.0.0.1 for the rendezvous.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `program args…` as ranks 0..world with `env` added; kills every rank and returns an
/// error if any is still running after `limit`.
pub fn launch_local(
    program: &Path,
    args: &[&str],
    world: usize,
    env: &[(&str, &str)],
    limit: Duration,
) -> std::io::Result<Vec<RankOutput>> {
    let port = free_port()?.to_string();
    let mut children = Vec::with_capacity(world);
    for rank in 0..world {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        children.push(cmd.spawn()?);
    }
    let start = Instant::now();
    while children
        .iter_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        if start.elapsed() > limit {
            for c in &mut children {
                let _ = c.kill();
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("ranks still running after {limit:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .enumerate()
        .map(|(rank, c)| {
            let out = c.wait_with_output()?;
            let output = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            Ok(RankOutput {
                rank,
                success: out.status.success(),
                output,
            })
        })
        .collect()
}
