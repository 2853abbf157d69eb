//! Output files appear complete or not at all, and never replace one of the job's inputs.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::IoError;

/// Writes `path` through a temporary file in the same folder, renamed into place only after `fill`
/// succeeded and the data reached the disk; on any error the temporary file is removed.
pub fn write_atomic<F>(path: &Path, fill: F) -> Result<(), IoError>
where
    F: FnOnce(&mut BufWriter<&mut File>) -> std::io::Result<()>,
{
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".obelisk-");
    // temporary files are private (0600) by default; a finished output should get the usual
    // permissions (0666 less the umask), as if created directly
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(&dir)
        .map_err(|e| IoError::new(path, format!("cannot create a file in {}: {e}", dir.display())))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        fill(&mut w).and_then(|_| w.flush()).map_err(|e| IoError::new(path, format!("write failed: {e}")))?;
    }
    tmp.as_file().sync_all().map_err(|e| IoError::new(path, format!("write failed: {e}")))?;
    tmp.persist(path)
        .map_err(|e| IoError::new(path, format!("cannot move the finished file into place: {}", e.error)))?;
    Ok(())
}

/// The folder a path lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks, before any work starts, that `path` can be written: its folder exists and accepts new
/// files, it is none of `inputs`, and it does not exist yet unless `force`.
pub fn check_output(path: &Path, inputs: &[&Path], force: bool) -> Result<(), IoError> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(IoError::new(path, format!("output folder {} does not exist", dir.display())));
    }
    if path.is_dir() {
        return Err(IoError::new(path, "is a folder, not a file"));
    }
    if path.exists() {
        let out = path.canonicalize().map_err(|e| IoError::new(path, e.to_string()))?;
        for input in inputs {
            if input.canonicalize().map(|i| i == out).unwrap_or(false) {
                return Err(IoError::new(path, format!("output would overwrite the input {}", input.display())));
            }
        }
        if !force {
            return Err(IoError::new(path, "already exists (pass --force to overwrite)"));
        }
    }
    // a real probe: permission bits do not tell the whole story (read-only mounts, ACLs)
    tempfile::Builder::new()
        .prefix(".obelisk-probe-")
        .tempfile_in(&dir)
        .map_err(|e| IoError::new(path, format!("output folder {} is not writable: {e}", dir.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a.bin");
        let err = write_atomic(&out, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("boom"))
        })
        .unwrap_err();
        assert!(err.to_string().starts_with(&out.display().to_string()), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_atomic(&out, |w| w.write_all(b"done")).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"done");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // the same mode as a file created directly under the current umask
            let plain = dir.path().join("plain");
            std::fs::write(&plain, b"").unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&out), mode(&plain));
        }
    }

    #[test]
    fn output_checks() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.nii");
        std::fs::write(&input, b"x").unwrap();
        assert!(check_output(&input, &[&input], true).unwrap_err().to_string().contains("overwrite the input"));
        assert!(check_output(&input, &[], false).unwrap_err().to_string().contains("already exists"));
        check_output(&input, &[], true).unwrap();
        check_output(&dir.path().join("new.nii"), &[&input], false).unwrap();
        let missing = dir.path().join("nope/out.nii");
        assert!(check_output(&missing, &[], false).unwrap_err().to_string().contains("does not exist"));
    }
}
