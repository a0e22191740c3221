//! Files that other processes read while they change (state records, reports, the CNI
//! configuration): one way to replace them, so no reader sees half a file and a crash leaves
//! either the old contents or the new.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same directory (hidden: its name
/// starts with a dot, so directory scanners such as a container runtime's skip it), flushed,
/// then renamed over the old file; the directory is flushed too so the rename survives a
/// crash. Creates the directory if needed. The file is readable by its owner only.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with_mode(path, bytes, None)
}

/// As [`write_atomically`], with the file's permission bits when they matter.
pub fn write_atomically_with_mode(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir)?;
    file.write_all(bytes)?;
    if let Some(mode) = mode {
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    file.as_file().sync_all()?;
    file.persist(path).map_err(|error| error.error)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_replaced_whole_with_its_mode_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/state.json");
        write_atomically(&path, b"old").expect("first write");
        write_atomically_with_mode(&path, b"new contents", Some(0o644)).expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new contents");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let left: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["state.json"], "no temporary file stays");
    }
}
