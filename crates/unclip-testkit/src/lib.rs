//! Test support shared by the crates' test suites.

use std::ffi::OsStr;

/// Runs `script` with the setup's venv Python (reference tooling only, never at run time) and
/// `args`; returns its stdout, panicking with its stderr if it fails.
pub fn python<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let python = std::env::var("UNCLIP_PYTHON").expect("UNCLIP_PYTHON unset: run scripts/setup.sh");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}
