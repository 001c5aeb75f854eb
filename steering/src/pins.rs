//! Where the program outlives fluxd: its link and maps pinned on a bpf file system, in one
//! directory per network namespace (`<bpf-dir>/netns-<inode>`, as Cloudflare's tubular keys
//! its state), so that a restart (or a crash) leaves VIPs steered to the listening socket that
//! systemd keeps, and two fluxds of two namespaces sharing one bpf file system never meet.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use crate::sys;
use crate::Error;

/// `BPF_FS_MAGIC` (statfs f_type of a bpf file system).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The inode of the calling thread's network namespace: what a netns link reports as its
/// namespace.
pub(crate) fn own_netns_ino() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// This namespace's pin directory under `bpf_dir`.
pub fn namespace_dir(bpf_dir: &Path) -> io::Result<PathBuf> {
    Ok(bpf_dir.join(format!("netns-{}", own_netns_ino()?)))
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: statfs writes one struct statfs into the zeroed local.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Creates `dir` (and its parents) after checking that the nearest existing one is on a bpf
/// file system: nothing is created anywhere else.
pub(crate) fn create(dir: &Path) -> Result<(), Error> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let pins = |source| Error::Pins {
        path: existing.to_path_buf(),
        source,
    };
    if !is_bpffs(existing).map_err(pins)? {
        return Err(Error::NotBpffs(existing.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Pins {
        path: dir.to_path_buf(),
        source,
    })
}

/// The id of a pinned object of the kind `id_of` reads, or None when nothing is pinned there.
fn pinned_id(path: &Path, id_of: fn(BorrowedFd) -> io::Result<u32>) -> Option<u32> {
    let fd = sys::obj_get(path).ok()?;
    id_of(fd.as_fd()).ok()
}

/// Pins `fd` at `path` in place of whatever was pinned there, unless it already is. Replacing
/// a link's pin releases the old link, and so detaches the program of a fluxd before this one.
pub(crate) fn pin(
    fd: BorrowedFd,
    path: &Path,
    id_of: fn(BorrowedFd) -> io::Result<u32>,
) -> Result<(), Error> {
    let own = id_of(fd).map_err(|source| Error::Bpf {
        what: format!("reading the id of {}", path.display()),
        source,
    })?;
    match pinned_id(path, id_of) {
        Some(id) if id == own => return Ok(()),
        _ => {}
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Pins {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    sys::obj_pin(fd, path).map_err(|source| Error::Bpf {
        what: format!("pinning {}", path.display()),
        source,
    })
}

/// Whether `fd`'s object is the one pinned at `path`.
pub(crate) fn is_pinned(
    fd: BorrowedFd,
    path: &Path,
    id_of: fn(BorrowedFd) -> io::Result<u32>,
) -> bool {
    match (id_of(fd), pinned_id(path, id_of)) {
        (Ok(own), Some(pinned)) => own == pinned,
        _ => false,
    }
}

/// Removes the pins in `dir` and the directory; true if there was anything. A missing
/// directory is nothing to do.
pub(crate) fn remove(dir: &Path) -> Result<bool, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(Error::Pins {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    // The link first: once it is gone the program no longer runs, whatever its maps hold.
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort_by_key(|p| p.file_name() != Some(std::ffi::OsStr::new("link")));
    for p in paths {
        std::fs::remove_file(&p).map_err(|source| Error::Pins { path: p, source })?;
    }
    std::fs::remove_dir(dir).map_err(|source| Error::Pins {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(true)
}
