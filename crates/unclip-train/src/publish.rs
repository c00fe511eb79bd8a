//! Writing checkpoints and exports so that a crash never leaves a half-written file: the entries
//! are written into a staging directory beside their place, synced, then renamed into place.

use anyhow::{Context, Result};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

/// Calls `write(staging)` to write entries (files or directories) into a fresh staging directory
/// beside `out`, then moves each into `out` (created if missing), replacing an entry of the same
/// name whole and leaving `out`'s other entries alone (a pipeline directory's other components).
/// A crash leaves no partly written file in `out`: an entry is the old one or the new one (a
/// folder, between its two renames, is the old one moved aside to `NAME.old`); the next call
/// clears what a crash left. When `write` fails, `out` is untouched.
pub fn write_into_dir<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let (staging, written) = stage(out, write)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut entries = fs::read_dir(&staging)
        .with_context(|| format!("reading {}", staging.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    for name in entries {
        let (from, to) = (staging.join(&name), out.join(&name));
        // rename replaces a file atomically but not a non-empty directory: move the old one aside.
        let old = to.is_dir().then(|| {
            let mut aside = name.clone();
            aside.push(".old");
            out.join(aside)
        });
        if let Some(old) = &old {
            if old.exists() {
                fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
            }
            fs::rename(&to, old)
                .with_context(|| format!("moving {} aside to replace it", to.display()))?;
        }
        fs::rename(&from, &to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        if let Some(old) = &old {
            fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    fs::remove_dir(&staging).with_context(|| format!("removing {}", staging.display()))?;
    File::open(out)?.sync_all()?;
    Ok(written)
}

/// Writes the directory `out` whole: `write(staging)` fills a fresh staging directory beside it,
/// which is synced and renamed to `out`, replacing an `out` that exists. A crash leaves `out` as
/// it was (or, between removing the old one and the rename, absent), never half written; the next
/// call clears what a crash left. When `write` fails, `out` is untouched.
pub fn write_dir<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let (staging, written) = stage(out, write)?;
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    fs::rename(&staging, out)
        .with_context(|| format!("renaming {} to {}", staging.display(), out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    File::open(parent.unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(written)
}

/// `write(staging)` into a fresh staging directory for `out` (what a crash left there cleared
/// first), then synced; on failure the staging directory is removed.
fn stage<T>(out: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<(PathBuf, T)> {
    let staging = staging_dir(out)?;
    if staging.exists() {
        fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the unfinished {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    match write(&staging).and_then(|t| sync_tree(&staging).map(|()| t)) {
        Ok(t) => Ok((staging, t)),
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// `DIR/.NAME.partial` for `DIR/NAME`: on `out`'s filesystem, so the renames stay renames.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} does not name a directory", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut staging = std::ffi::OsString::from(".");
    staging.push(name);
    staging.push(".partial");
    Ok(parent.join(staging))
}

/// fsyncs every file and directory under `dir`.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            File::open(&path)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    #[test]
    fn replaces_written_entries_whole_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pipeline");
        fs::create_dir_all(out.join("decoder")).unwrap();
        fs::write(out.join("decoder/stale.bin"), "old").unwrap();
        fs::write(out.join("config.json"), "old").unwrap();
        fs::write(out.join("model_index.json"), "other component").unwrap();
        // What a crash mid-export left: the staging folder and a folder moved aside.
        fs::create_dir_all(tmp.path().join(".pipeline.partial/decoder")).unwrap();
        fs::create_dir_all(out.join("decoder.old")).unwrap();
        let n = write_into_dir(&out, |dir| {
            fs::create_dir(dir.join("decoder"))?;
            fs::write(dir.join("decoder/weights.bin"), "new")?;
            fs::write(dir.join("config.json"), "new")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(n, 7);
        assert_eq!(read(&out.join("decoder/weights.bin")), "new");
        assert!(!out.join("decoder/stale.bin").exists());
        assert_eq!(read(&out.join("config.json")), "new");
        assert_eq!(read(&out.join("model_index.json")), "other component");
        let mut left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.extend(fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()));
        left.sort();
        assert_eq!(
            left,
            ["config.json", "decoder", "model_index.json", "pipeline"]
        );
    }

    #[test]
    fn write_dir_replaces_the_directory_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("step-2");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("stale.bin"), "old").unwrap();
        fs::create_dir_all(tmp.path().join(".step-2.partial")).unwrap(); // a crash's leftover
        write_dir(&out, |dir| Ok(fs::write(dir.join("model.bin"), "new")?)).unwrap();
        assert_eq!(read(&out.join("model.bin")), "new");
        assert!(!out.join("stale.bin").exists());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        let err = write_dir(&out, |dir| -> Result<()> {
            fs::write(dir.join("model.bin"), "half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(read(&out.join("model.bin")), "new");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_directory_as_it_was() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("prior");
        fs::create_dir(&out).unwrap();
        fs::write(out.join("config.json"), "old").unwrap();
        let err = write_into_dir(&out, |dir| -> Result<()> {
            fs::write(dir.join("config.json"), "half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(read(&out.join("config.json")), "old");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        // A new directory is not created either.
        let fresh = tmp.path().join("fresh");
        assert!(write_into_dir(&fresh, |_| -> Result<()> { anyhow::bail!("no") }).is_err());
        assert!(!fresh.exists());
    }
}
