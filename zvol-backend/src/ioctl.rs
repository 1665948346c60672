//! The block-device ioctls the backend needs, with their request numbers computed from the Linux
//! `_IO`/`_IOR` encoding (the `libc` crate does not define all of them).
//!
//! | request | definition | where |
//! | --- | --- | --- |
//! | `BLKSSZGET` | `_IO(0x12, 104)` → `int` | `linux/fs.h` (via `rustix`) |
//! | `BLKGETSIZE64` | `_IOR(0x12, 114, size_t)` → `u64` | `linux/fs.h` |
//! | `BLKDISCARD` | `_IO(0x12, 119)`, arg `u64[2]` = {start, len} | `linux/fs.h` |
//! | `BLKZNAME` | `_IOR(0x12, 125, char[ZFS_MAX_DATASET_NAME_LEN])`, `ZFS_MAX_DATASET_NAME_LEN` = 256 | OpenZFS `include/sys/fs/zfs.h` |

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `ZFS_MAX_DATASET_NAME_LEN` (OpenZFS `include/sys/fs/zfs.h`): longest dataset name including the
/// terminating NUL.
pub const ZFS_MAX_DATASET_NAME_LEN: usize = 256;

// The asm-generic ioctl encoding (x86, arm, aarch64, riscv, s390, loongarch): 2 direction bits at 30,
// 14 size bits at 16. mips, powerpc and sparc use 3 direction bits at 29 and "read" = 2, "none" = 1.
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod enc {
    pub(super) const NONE: u32 = 0;
    pub(super) const READ: u32 = 2;
    pub(super) const DIR_SHIFT: u32 = 30;
}
#[cfg(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod enc {
    pub(super) const NONE: u32 = 1;
    pub(super) const READ: u32 = 2;
    pub(super) const DIR_SHIFT: u32 = 29;
}

const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << enc::DIR_SHIFT) | (size << 16) | (ty << 8) | nr
}

/// `BLKGETSIZE64`: size of the device in bytes.
pub(crate) const BLKGETSIZE64: u32 = ioc(enc::READ, 0x12, 114, std::mem::size_of::<usize>() as u32);
/// `BLKDISCARD`: discard a byte range.
pub(crate) const BLKDISCARD: u32 = ioc(enc::NONE, 0x12, 119, 0);
/// `BLKZNAME`: the dataset name of a zvol device.
pub(crate) const BLKZNAME: u32 = ioc(enc::READ, 0x12, 125, ZFS_MAX_DATASET_NAME_LEN as u32);

/// Size of a block device in bytes (`BLKGETSIZE64`).
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local u64; the
    // fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical block size of a block device (`BLKSSZGET`).
pub(crate) fn logical_block_size(file: &File) -> io::Result<u32> {
    rustix::fs::ioctl_blksszget(file).map_err(io::Error::from)
}

/// Discards `len` bytes at `offset` (`BLKDISCARD`); both must be multiples of the logical block size.
pub(crate) fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) through the pointer, which points to a live
    // local array of two u64; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The dataset name of a zvol device (`BLKZNAME`), e.g. `tank/vols/a`. Devices that are not zvols fail
/// (`ENOTTY` or `EINVAL`).
pub fn zvol_dataset_name(file: &File) -> io::Result<String> {
    let mut buf = [0u8; ZFS_MAX_DATASET_NAME_LEN];
    // SAFETY: BLKZNAME writes at most ZFS_MAX_DATASET_NAME_LEN bytes (the size encoded in the request)
    // into the buffer, which is a live local array of exactly that size; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZNAME as _, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let name = CStr::from_bytes_until_nul(&buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "BLKZNAME returned an unterminated name"))?;
    name.to_str()
        .map(str::to_owned)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "BLKZNAME returned a non-UTF-8 name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn request_numbers_match_the_kernel_headers() {
        // Values as the C preprocessor computes them on x86-64 / aarch64.
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKDISCARD, 0x1277);
        assert_eq!(BLKZNAME, 0x8100_127d);
        assert_eq!(ioc(enc::NONE, 0x12, 104, 0) as libc::Ioctl, libc::BLKSSZGET, "same encoding as libc");
    }

    #[test]
    fn blkzname_on_a_regular_file_is_an_error_not_a_crash() {
        let f = tempfile::tempfile().unwrap();
        assert!(zvol_dataset_name(&f).is_err());
        assert!(block_device_size(&f).is_err());
    }
}
