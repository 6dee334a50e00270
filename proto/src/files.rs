//! Writing credential files (identities, profiles): readable only by their
//! owner, and replaced atomically so a crash never leaves half a token.
//!
//! The bytes go to a fresh temporary file beside the target, created
//! exclusively (`O_CREAT | O_EXCL`, which also refuses to follow a symlink
//! planted at that name) with mode 0600, then renamed over the target; the
//! rename replaces a symlink at the target rather than writing through it.

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Names tried before giving up on finding an unused temporary name.
const TEMP_ATTEMPTS: u32 = 16;

pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let (tmp, mut f) = create_temp(path)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Creates a new, owner-only file with an unpredictable name next to `path`.
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string());
    let mut last = None;
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = path.with_file_name(format!(".{file_name}.{:016x}.tmp", random_u64()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary file name")))
}

/// 64 bits that differ per call and per process: the standard library's
/// randomly keyed hasher over a counter, the time and the process id.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "portico-files-{tag}-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn writes_owner_only_and_replaces() {
        let d = temp_dir("write");
        let target = d.join("sub").join("identity.yaml");
        write_private(&target, b"one").expect("write");
        assert_eq!(std::fs::read(&target).expect("read"), b"one");
        assert_eq!(mode(&target), 0o600);
        assert_eq!(mode(&d.join("sub")), 0o700);
        write_private(&target, b"two").expect("rewrite");
        assert_eq!(std::fs::read(&target).expect("read"), b"two");
        let left: Vec<_> = std::fs::read_dir(d.join("sub"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn never_writes_through_planted_symlinks() {
        let d = temp_dir("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let target = d.join("identity.yaml");
        // The temporary name the old code used, and the target itself.
        std::os::unix::fs::symlink(&victim, d.join("identity.tmp")).expect("symlink tmp");
        write_private(&target, b"secret").expect("write");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        std::fs::remove_file(&target).expect("remove");
        std::os::unix::fs::symlink(&victim, &target).expect("symlink target");
        write_private(&target, b"secret").expect("write over a symlink");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        let meta = std::fs::symlink_metadata(&target).expect("target");
        assert!(meta.file_type().is_file(), "the symlink was replaced");
        assert_eq!(mode(&target), 0o600);
        assert_eq!(std::fs::read(&target).expect("target"), b"secret");
        // An exclusive create refuses a symlink even where a name collides.
        let planted = d.join("planted.tmp");
        std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
        let e = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&planted)
            .expect_err("create_new refuses a symlink");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        let _ = std::fs::remove_dir_all(&d);
    }
}
