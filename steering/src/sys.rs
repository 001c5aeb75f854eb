//! The few `bpf(2)` commands steering needs, as thin safe wrappers. No library: the program is
//! assembled at run time ([`crate::program`]) and everything else is a map, a link or a pin.
//!
//! Every object is an owned fd ([`OwnedFd`]): closing it drops this process's reference, and
//! the kernel frees the object once nothing (a pin, a link, a program) holds it any more.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

// Commands (enum bpf_cmd).
const MAP_CREATE: libc::c_int = 0;
const MAP_LOOKUP_ELEM: libc::c_int = 1;
const MAP_UPDATE_ELEM: libc::c_int = 2;
const MAP_DELETE_ELEM: libc::c_int = 3;
const MAP_GET_NEXT_KEY: libc::c_int = 4;
const PROG_LOAD: libc::c_int = 5;
const OBJ_PIN: libc::c_int = 6;
const OBJ_GET: libc::c_int = 7;
const OBJ_GET_INFO_BY_FD: libc::c_int = 15;
const LINK_CREATE: libc::c_int = 28;

/// `BPF_PROG_TYPE_SK_LOOKUP`.
pub const PROG_TYPE_SK_LOOKUP: u32 = 30;
/// `BPF_SK_LOOKUP`: the attach type of a program run at socket lookup in a network namespace.
pub const ATTACH_SK_LOOKUP: u32 = 36;

/// Map types (enum bpf_map_type).
pub const MAP_TYPE_HASH: u32 = 1;
pub const MAP_TYPE_LPM_TRIE: u32 = 11;
pub const MAP_TYPE_SOCKMAP: u32 = 15;

/// `BPF_F_NO_PREALLOC`: entries allocated as they are added (required for LPM tries; for the
/// hash maps it keeps an idle fluxd from holding memory for entries it does not have).
pub const F_NO_PREALLOC: u32 = 1;

/// `BPF_ANY` for map updates: create or replace.
const ANY: u64 = 0;

/// The verifier's log when a load fails: why the kernel refused the program.
const LOG_SIZE: usize = 64 * 1024;

fn bpf(cmd: libc::c_int, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-padded buffer of the size passed; the kernel reads (and
    // for some commands writes) at most that many bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_result(r: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

/// Packs two u32 fields into one u64 word of `union bpf_attr` (little-endian field order).
fn pair(low: u32, high: u32) -> u64 {
    u64::from(low) | (u64::from(high) << 32)
}

/// Object names are at most 15 bytes of `[A-Za-z0-9_.]`: given as two words.
fn name_words(name: &str) -> [u64; 2] {
    let mut bytes = [0u8; 16];
    for (b, c) in bytes.iter_mut().zip(name.bytes().take(15)) {
        *b = c;
    }
    [
        u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default()),
        u64::from_le_bytes(bytes[8..].try_into().unwrap_or_default()),
    ]
}

/// `BPF_MAP_CREATE`.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    // map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node: seven
    // u32 from offset 0, then map_name[16] at offset 28.
    let mut bytes = [0u8; 64];
    for (i, v) in [map_type, key_size, value_size, max_entries, flags]
        .into_iter()
        .enumerate()
    {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (b, c) in bytes[28..43].iter_mut().zip(name.bytes()) {
        *b = c;
    }
    let mut attr = [0u64; 8];
    for (w, chunk) in attr.iter_mut().zip(bytes.chunks(8)) {
        *w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
    }
    bpf(MAP_CREATE, &mut attr).map(fd_result)
}

fn elem_attr(map: BorrowedFd, key: &[u8], value: u64, flags: u64) -> [u64; 4] {
    // map_fd (+pad), key ptr, value/next_key ptr, flags
    [map.as_raw_fd() as u64, key.as_ptr() as u64, value, flags]
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_ANY`.
pub fn map_update(map: BorrowedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = elem_attr(map, key, value.as_ptr() as u64, ANY);
    bpf(MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_DELETE_ELEM`; a missing key is `Ok(false)`.
pub fn map_delete(map: BorrowedFd, key: &[u8]) -> io::Result<bool> {
    let mut attr = elem_attr(map, key, 0, 0);
    match bpf(MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_LOOKUP_ELEM` into `value`; a missing key is `Ok(false)`.
pub fn map_lookup(map: BorrowedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = elem_attr(map, key, value.as_mut_ptr() as u64, 0);
    match bpf(MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every key of a map (`BPF_MAP_GET_NEXT_KEY` from no key), each `key_size` bytes. Bounded by
/// `limit` keys: a map changed meanwhile cannot make it loop.
pub fn map_keys(map: BorrowedFd, key_size: usize, limit: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut next = vec![0u8; key_size];
    while keys.len() < limit {
        let mut attr = match keys.last() {
            Some(k) => elem_attr(map, k, next.as_mut_ptr() as u64, 0),
            // A null key asks for the first one.
            None => [map.as_raw_fd() as u64, 0, next.as_mut_ptr() as u64, 0],
        };
        match bpf(MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => keys.push(next.clone()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}

/// `BPF_PROG_LOAD` of an `sk_lookup` program; a refusal carries the verifier's log.
pub fn prog_load_sk_lookup(insns: &[u64], name: &str) -> io::Result<OwnedFd> {
    let license = CString::new("GPL").unwrap_or_default();
    let mut log = vec![0u8; LOG_SIZE];
    let load = |log_level: u32, log: &mut [u8]| {
        let [n0, n1] = name_words(name);
        // prog_type | insn_cnt, insns, license, log_level | log_size, log_buf,
        // kern_version | prog_flags, prog_name[16], prog_ifindex | expected_attach_type
        let mut attr = [
            pair(PROG_TYPE_SK_LOOKUP, insns.len() as u32),
            insns.as_ptr() as u64,
            license.as_ptr() as u64,
            pair(log_level, if log_level > 0 { log.len() as u32 } else { 0 }),
            if log_level > 0 {
                log.as_mut_ptr() as u64
            } else {
                0
            },
            0,
            n0,
            n1,
            pair(0, ATTACH_SK_LOOKUP),
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        bpf(PROG_LOAD, &mut attr).map(fd_result)
    };
    match load(0, &mut log) {
        Ok(fd) => Ok(fd),
        // EACCES/EINVAL come from the verifier: load again with a log to say why.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EINVAL)) => {
            match load(1, &mut log) {
                Ok(fd) => Ok(fd),
                Err(e2) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    let last: Vec<&str> = text.lines().rev().take(3).collect();
                    Err(io::Error::new(
                        e2.kind(),
                        format!(
                            "{e2}; verifier: {}",
                            last.into_iter().rev().collect::<Vec<_>>().join(" / ")
                        ),
                    ))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// `BPF_LINK_CREATE`: attaches `prog` to the network namespace `netns` (an fd of
/// `/proc/self/ns/net`) at socket lookup. The program runs until the link is released: its
/// last fd closed and its pin removed.
pub fn link_create_netns(prog: BorrowedFd, netns: BorrowedFd) -> io::Result<OwnedFd> {
    // prog_fd | target_fd, attach_type | flags
    let mut attr = [
        pair(prog.as_raw_fd() as u32, netns.as_raw_fd() as u32),
        pair(ATTACH_SK_LOOKUP, 0),
        0,
        0,
        0,
        0,
    ];
    bpf(LINK_CREATE, &mut attr).map(fd_result)
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// `BPF_OBJ_PIN`: `path` (on a bpf file system) keeps the object alive without any process.
pub fn obj_pin(fd: BorrowedFd, path: &Path) -> io::Result<()> {
    let p = path_cstring(path)?;
    // pathname, bpf_fd | file_flags
    let mut attr = [p.as_ptr() as u64, pair(fd.as_raw_fd() as u32, 0), 0];
    bpf(OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: an fd of the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = path_cstring(path)?;
    let mut attr = [p.as_ptr() as u64, 0, 0];
    bpf(OBJ_GET, &mut attr).map(fd_result)
}

/// What `BPF_OBJ_GET_INFO_BY_FD` says of a netns link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// The inode of the network namespace it is attached to; 0 once detached (the namespace
    /// is gone, or someone ran `bpftool link detach`).
    pub netns_ino: u32,
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, (pad), union { netns { netns_ino, attach_type } }
    let mut info = [0u64; 8];
    let mut attr = [
        pair(link.as_raw_fd() as u32, std::mem::size_of_val(&info) as u32),
        info.as_mut_ptr() as u64,
    ];
    bpf(OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        netns_ino: info[2] as u32,
        attach_type: (info[2] >> 32) as u32,
    })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map: its id.
pub fn map_id(map: BorrowedFd) -> io::Result<u32> {
    // struct bpf_map_info: type, id, ...
    let mut info = [0u64; 16];
    let mut attr = [
        pair(map.as_raw_fd() as u32, std::mem::size_of_val(&info) as u32),
        info.as_mut_ptr() as u64,
    ];
    bpf(OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info[0] >> 32) as u32)
}
