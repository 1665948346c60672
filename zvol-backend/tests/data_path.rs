//! The data path of `ZvolBackend` on real devices: a loop device (a block device like a zvol, opened
//! `O_DIRECT`) and a regular file.
//!
//! The loop-device tests need root and `losetup` (util-linux); without them they fail with a message
//! saying so — they are never skipped silently.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use nvmeof_proto::Payload;
use nvmeof_target::{execute_blocking, BlockBackend, ByteRange, IoError, IoOp, IoOutput};
use zvol_backend::{ZvolBackend, ZvolOptions};

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn new(size: u64, logical_block_size: Option<u32>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing).and_then(|f| f.set_len(size)).expect("sparse backing file");
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if let Some(b) = logical_block_size {
            cmd.args(["-b", &b.to_string()]);
        }
        let out = cmd.arg(&backing).output().unwrap_or_else(|e| {
            panic!(
                "cannot run losetup ({e}): the loop-device tests need util-linux, root and /dev/loop-control"
            )
        });
        assert!(
            out.status.success(),
            "losetup -f --show failed ({}): the loop-device tests need root and free loop devices",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(dev.starts_with("/dev/"), "losetup printed {dev:?}");
        Self { dev, backing, _dir: dir }
    }

    fn backing_blocks(&self) -> u64 {
        std::fs::metadata(&self.backing).unwrap().blocks()
    }

    /// Grows the backing file and tells the loop driver (`losetup -c`).
    fn grow(&self, size: u64) {
        std::fs::OpenOptions::new().write(true).open(&self.backing).unwrap().set_len(size).unwrap();
        let st = Command::new("losetup").arg("-c").arg(&self.dev).status().unwrap();
        assert!(st.success(), "losetup -c");
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// `data` as a payload whose segments start at odd addresses and have odd lengths (like slices of a
/// receive buffer).
fn unaligned_payload(data: &[u8]) -> Payload {
    let mut p = Payload::new();
    let mut rest = data;
    for cut in [1000usize, 3096, 1] {
        let n = cut.min(rest.len());
        let (head, tail) = rest.split_at(n);
        let mut v = vec![0u8; n + 1];
        v[1..].copy_from_slice(head);
        p.push(Bytes::from(v).slice(1..)); // address is 1 past an allocation start: unaligned
        rest = tail;
    }
    if !rest.is_empty() {
        let mut v = vec![0u8; rest.len() + 3];
        v[3..].copy_from_slice(rest);
        p.push(Bytes::from(v).slice(3..));
    }
    assert_eq!(p.len(), data.len());
    p
}

fn write(b: &dyn BlockBackend, offset: u64, data: &[u8], fua: bool) {
    execute_blocking(b, IoOp::Write { offset, data: unaligned_payload(data), fua }).unwrap();
}

fn read(b: &dyn BlockBackend, offset: u64, len: u32) -> Vec<u8> {
    match execute_blocking(b, IoOp::Read { offset, len }).unwrap() {
        IoOutput::Data(d) => {
            assert_eq!(d.len(), len as usize);
            d.to_bytes().to_vec()
        }
        other => panic!("a read returns data, not {other:?}"),
    }
}

fn discard(b: &dyn BlockBackend, ranges: &[(u64, u64)]) {
    let ranges = ranges.iter().map(|&(offset, len)| ByteRange { offset, len }).collect();
    execute_blocking(b, IoOp::Discard { ranges }).unwrap();
}

/// Reads, writes, FUA, flush, write zeroes and deallocate on `b`, a fresh all-zero volume of at least
/// 8 MiB.
fn exercise(b: &dyn BlockBackend) {
    let size = b.size_bytes();
    let bs = u64::from(b.info().block_size);
    assert_eq!(read(b, 0, 8192), vec![0; 8192], "a new volume reads zeros");

    // Writes at various aligned offsets, from unaligned memory, some with FUA.
    let offsets = [0, bs, 64 * 1024 - bs, 1 << 20, size - 3 * 4096];
    for (i, &off) in offsets.iter().enumerate() {
        write(b, off, &pattern(3 * 4096, i as u8), i % 2 == 0);
    }
    execute_blocking(b, IoOp::Flush).unwrap();
    // The later writes overwrite parts of the earlier ones: check the final content per region.
    assert_eq!(read(b, 1 << 20, 3 * 4096), pattern(3 * 4096, 3));
    assert_eq!(read(b, size - 3 * 4096, 3 * 4096), pattern(3 * 4096, 4));
    let mut expect = pattern(3 * 4096, 0);
    expect.splice(bs as usize.., pattern(3 * 4096 - bs as usize, 1));
    assert_eq!(read(b, 0, 3 * 4096), expect, "overlapping writes at 0 and {bs}");
    // One read spanning a written and an unwritten region.
    let mut spanning = pattern(3 * 4096, 3);
    spanning.extend(vec![0u8; 4096]);
    assert_eq!(read(b, 1 << 20, 4 * 4096), spanning);
    // Single-byte-granular content survives (no read-modify-write artefacts).
    let last_block = read(b, size - bs, bs as u32);
    assert_eq!(last_block, pattern(3 * 4096, 4)[3 * 4096 - bs as usize..].to_vec());

    // Write Zeroes without and with deallocation.
    execute_blocking(b, IoOp::WriteZeroes { offset: (1 << 20) + 4096, len: 4096, deallocate: false })
        .unwrap();
    let mut expect = pattern(3 * 4096, 3);
    expect[4096..8192].fill(0);
    assert_eq!(read(b, 1 << 20, 3 * 4096), expect, "only the zeroed block changed");
    execute_blocking(b, IoOp::WriteZeroes { offset: 1 << 20, len: 4096, deallocate: true }).unwrap();
    expect[..4096].fill(0);
    assert_eq!(read(b, 1 << 20, 3 * 4096), expect);

    // Deallocate several ranges; they read as zeros, the rest is untouched.
    discard(b, &[(0, bs), (size - 3 * 4096, 4096)]);
    let mut expect0 = pattern(3 * 4096, 0);
    expect0.splice(bs as usize.., pattern(3 * 4096 - bs as usize, 1));
    expect0[..bs as usize].fill(0);
    assert_eq!(read(b, 0, 3 * 4096), expect0);
    let mut expect_end = pattern(3 * 4096, 4);
    expect_end[..4096].fill(0);
    assert_eq!(read(b, size - 3 * 4096, 3 * 4096), expect_end);

    // Out of range is refused before touching the device.
    assert!(matches!(
        execute_blocking(b, IoOp::Read { offset: size - 4096, len: 8192 }),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        execute_blocking(b, IoOp::Write { offset: size, data: vec![0u8; 4096].into(), fua: false }),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        execute_blocking(
            b,
            IoOp::Discard { ranges: [ByteRange { offset: size, len: 4096 }].into_iter().collect() }
        ),
        Err(IoError::OutOfRange { .. })
    ));
}

#[test]
fn loop_device_o_direct_data_path() {
    let lo = LoopDevice::new(64 << 20, None);
    let b = ZvolBackend::open(&lo.dev, 4096).unwrap();
    assert!(b.is_direct(), "a loop device accepts O_DIRECT");
    assert_eq!(b.logical_block_size(), 512);
    assert_eq!(b.size_bytes(), 64 << 20);
    assert_eq!(b.dataset(), None, "not a zvol: BLKZNAME fails");
    let info = b.info();
    assert_eq!(
        (info.block_size, info.volatile_write_cache, info.discard, info.write_zeroes),
        (4096, true, true, true)
    );
    let raw = b.raw_device().unwrap();
    assert_eq!((raw.direct, raw.alignment, raw.base_offset), (true, 512, 0));
    exercise(&b);
}

#[test]
fn loop_device_deallocate_gives_space_back() {
    let lo = LoopDevice::new(32 << 20, None);
    let b = ZvolBackend::open(&lo.dev, 4096).unwrap();
    let before = lo.backing_blocks();
    for i in 0..16u64 {
        write(&b, (4 << 20) + i * 65536, &pattern(65536, i as u8), false);
    }
    execute_blocking(&b, IoOp::Flush).unwrap();
    let written = lo.backing_blocks();
    assert!(written >= before + 2048, "1 MiB written: {before} -> {written} blocks of 512 B");
    discard(&b, &[(4 << 20, 1 << 20)]);
    execute_blocking(&b, IoOp::Flush).unwrap();
    let after = lo.backing_blocks();
    assert!(after + 1024 <= written, "deallocate frees the space: {written} -> {after}");
    assert_eq!(read(&b, 4 << 20, 1 << 20), vec![0; 1 << 20]);
}

#[test]
fn loop_device_zvol_style_deallocation_zeroes_partial_blocks() {
    // The path a zvol takes (it refuses fallocate(PUNCH_HOLE)): BLKDISCARD for whole
    // discard-granularity blocks, explicit zeroing for the partial head and tail.
    let lo = LoopDevice::new(16 << 20, None);
    let b = ZvolBackend::open_with(&lo.dev, ZvolOptions { block_size: 512, direct: true }).unwrap();
    b.__force_discard_and_zero();
    let g = b.discard_granularity();
    assert!(g >= 512 && g.is_power_of_two(), "granularity {g}");
    let data = pattern(256 * 1024, 9);
    write(&b, 0, &data, false);
    // Starts 512 B into a granule and ends 512 B into another: head and tail are partial.
    let (off, len) = (512u64, 4 * g);
    discard(&b, &[(off, len)]);
    let back = read(&b, 0, data.len() as u32);
    let (s, e) = (off as usize, (off + len) as usize);
    assert_eq!(&back[..s], &data[..s], "before the range");
    assert!(back[s..e].iter().all(|&x| x == 0), "the whole range reads zeros");
    assert_eq!(&back[e..], &data[e..], "after the range");
    // A range smaller than one granule is only zeroed.
    discard(&b, &[(8 * g + 512, 1024)]);
    assert_eq!(read(&b, 8 * g + 512, 1024), vec![0; 1024]);
    assert_eq!(read(&b, 8 * g, 512), data[8 * g as usize..8 * g as usize + 512].to_vec());
}

#[test]
fn loop_device_with_4k_logical_blocks() {
    let lo = LoopDevice::new(16 << 20, Some(4096));
    let err = ZvolBackend::open(&lo.dev, 512).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("logical block size 4096"), "{err}");
    let b = ZvolBackend::open(&lo.dev, 4096).unwrap();
    assert_eq!(b.raw_device().unwrap().alignment, 4096);
    exercise(&b);
}

#[test]
fn loop_device_resize_follows_the_device() {
    let lo = LoopDevice::new(16 << 20, None);
    let b = ZvolBackend::open(&lo.dev, 4096).unwrap();
    write(&b, (16 << 20) - 4096, &pattern(4096, 1), false);
    lo.grow(24 << 20);
    b.resize(24 << 20).unwrap();
    assert_eq!(b.size_bytes(), 24 << 20);
    write(&b, (24 << 20) - 4096, &pattern(4096, 2), true);
    assert_eq!(read(&b, (16 << 20) - 4096, 4096), pattern(4096, 1), "data before the old end is kept");
    assert_eq!(read(&b, (24 << 20) - 4096, 4096), pattern(4096, 2));
    // A size the device does not have is refused (after a bounded wait), and changes nothing.
    let err = b.resize(32 << 20).unwrap_err();
    assert!(err.to_string().contains("resize the zvol"), "{err}");
    assert_eq!(b.size_bytes(), 24 << 20);
    assert!(b.resize((24 << 20) + 512).is_err(), "not a multiple of the block size");
    assert_eq!(b.refresh_size().unwrap(), 24 << 20);
}

#[test]
fn loop_device_concurrent_writers_on_one_backend() {
    let lo = LoopDevice::new(16 << 20, None);
    let b = std::sync::Arc::new(ZvolBackend::open(&lo.dev, 512).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    // Interleaved 512-byte blocks: neighbours belong to other threads.
                    let off = (i * 4 + u64::from(t)) * 512;
                    write(b.as_ref(), off, &pattern(512, t), i % 8 == 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let back = read(b.as_ref(), 0, 64 * 4 * 512);
    for (i, chunk) in back.chunks(512).enumerate() {
        assert_eq!(chunk, pattern(512, (i % 4) as u8).as_slice(), "block {i}");
    }
}

#[test]
fn regular_file_data_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    std::fs::File::create(&path).unwrap().set_len(16 << 20).unwrap();
    let b = ZvolBackend::open(&path, 4096).unwrap();
    assert_eq!(b.size_bytes(), 16 << 20);
    let raw = b.raw_device().unwrap();
    assert_eq!(raw.direct, b.is_direct());
    if b.is_direct() {
        assert!(raw.alignment >= 512 && raw.alignment.is_power_of_two());
    }
    exercise(&b);
    // Punching holes in a file gives the space back.
    write(&b, 4 << 20, &pattern(1 << 20, 5), false);
    execute_blocking(&b, IoOp::Flush).unwrap();
    let written = std::fs::metadata(&path).unwrap().blocks();
    discard(&b, &[(4 << 20, 1 << 20)]);
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(after + 1024 <= written, "{written} -> {after}");
}

#[test]
fn buffered_mode_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let path: &Path = &dir.path().join("vol.img");
    std::fs::File::create(path).unwrap().set_len(8 << 20).unwrap();
    let b = ZvolBackend::open_with(path, ZvolOptions { block_size: 512, direct: false }).unwrap();
    assert!(!b.is_direct());
    let raw = b.raw_device().unwrap();
    assert_eq!((raw.direct, raw.alignment), (false, 1));
    exercise(&b);
}

#[test]
fn bad_opens_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let e = ZvolBackend::open(&path, 1024).unwrap_err();
    assert!(e.to_string().contains("512 or 4096"), "{e}");
    let e = ZvolBackend::open(dir.path(), 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "a directory cannot be opened for writing: {e}");
    let e = ZvolBackend::open(dir.path().join("missing"), 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let e = ZvolBackend::open("/dev/null", 4096).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "a character device is refused: {e}");
}
