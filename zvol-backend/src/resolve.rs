//! [`DeviceResolver`]: from a dataset name to its zvol device node, without trusting udev's timing.
//!
//! The kernel creates a zvol's device (`/dev/zdN`, by devtmpfs) as soon as the zvol exists — shortly
//! after `lzc_create`/`lzc_clone` return, on a ZFS task queue — but the friendly name
//! `/dev/zvol/<pool>/<dataset>` is a symlink that udev adds later, after running its rules; on a busy
//! node that can take seconds. The resolver therefore:
//!
//! ```text
//!   /dev/zvol/<dataset> exists? ── yes ──▶ use it
//!        │ no: poll with backoff (1 ms, 2 ms, … 64 ms)
//!        ▼  still missing after `scan_after`
//!   /sys/block/zd* (whole disks, newest first) ── open /dev/zdN, ioctl BLKZNAME == dataset? ──▶ use it
//!        │ no match: scan again every `rescan_every`
//!        ▼  `timeout` reached
//!   ResolveError::TimedOut (names the dataset and the time waited)
//! ```
//!
//! The sysfs scan opens every zvol device it checks (briefly, read-only): it costs one `open` + `ioctl`
//! per zvol, so on a node with very many zvols it is a fallback, not the normal path.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backoff::Backoff;

use crate::ioctl;

/// Why a zvol's device could not be found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// Neither the udev link nor a `zd` device with the dataset's name appeared in time.
    #[error(
        "the zvol device of {dataset} did not appear within {:.1}s (waited for {} and scanned {scanned} \
         zd devices in {} by name)",
        waited.as_secs_f64(),
        link.display(),
        sys_block.display()
    )]
    TimedOut {
        /// The dataset.
        dataset: String,
        /// How long we waited.
        waited: Duration,
        /// The udev link that never appeared.
        link: PathBuf,
        /// The sysfs directory that was scanned.
        sys_block: PathBuf,
        /// How many `zd` devices the last scan asked for their name.
        scanned: usize,
    },
    /// The dataset name cannot name a device (empty, absolute, `..`, …).
    #[error("{0:?} is not a zvol dataset name")]
    InvalidName(String),
}

/// How to ask a device node for its dataset name (BLKZNAME; replaced in tests).
type NameQuery = fn(&Path) -> io::Result<String>;

fn blkzname(path: &Path) -> io::Result<String> {
    let file = File::options().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    ioctl::zvol_dataset_name(&file)
}

/// Finds the device node of a zvol: the udev link `/dev/zvol/<dataset>` when it is there, else the
/// `zdN` device whose `BLKZNAME` is the dataset (see the [module documentation](self)).
#[derive(Clone, Debug)]
pub struct DeviceResolver {
    dev_dir: PathBuf,
    sys_block_dir: PathBuf,
    timeout: Duration,
    scan_after: Duration,
    rescan_every: Duration,
    name_query: NameQuery,
}

impl Default for DeviceResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceResolver {
    /// Default: `/dev`, `/sys/block`, a 10 s timeout, sysfs scans from 500 ms on, once a second.
    #[must_use]
    pub fn new() -> Self {
        Self {
            dev_dir: PathBuf::from("/dev"),
            sys_block_dir: PathBuf::from("/sys/block"),
            timeout: Duration::from_secs(10),
            scan_after: Duration::from_millis(500),
            rescan_every: Duration::from_secs(1),
            name_query: blkzname,
        }
    }

    /// How long [`DeviceResolver::resolve`] waits at most.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// When the sysfs scan starts and how often it repeats.
    #[must_use]
    pub fn with_scan(mut self, scan_after: Duration, rescan_every: Duration) -> Self {
        self.scan_after = scan_after;
        self.rescan_every = rescan_every.max(Duration::from_millis(1));
        self
    }

    /// Other roots than `/dev` and `/sys/block` (for tests and containers).
    #[must_use]
    pub fn with_roots(mut self, dev_dir: impl Into<PathBuf>, sys_block_dir: impl Into<PathBuf>) -> Self {
        self.dev_dir = dev_dir.into();
        self.sys_block_dir = sys_block_dir.into();
        self
    }

    #[cfg(test)]
    pub(crate) fn with_name_query(mut self, query: NameQuery) -> Self {
        self.name_query = query;
        self
    }

    /// The timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The udev link of `dataset`: `<dev>/zvol/<dataset>`.
    pub fn zvol_link(&self, dataset: &str) -> Result<PathBuf, ResolveError> {
        let valid = !dataset.is_empty()
            && !dataset.starts_with('/')
            && dataset.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            && !dataset.contains('\0');
        if !valid {
            return Err(ResolveError::InvalidName(dataset.to_owned()));
        }
        Ok(self.dev_dir.join("zvol").join(dataset))
    }

    /// The udev link if it exists now (no waiting, no scan).
    pub fn lookup_now(&self, dataset: &str) -> Result<Option<PathBuf>, ResolveError> {
        let link = self.zvol_link(dataset)?;
        Ok(link.exists().then_some(link))
    }

    /// Waits for the device of `dataset` (see the [module documentation](self)).
    pub fn resolve(&self, dataset: &str) -> Result<PathBuf, ResolveError> {
        let link = self.zvol_link(dataset)?;
        let mut backoff = Backoff::new(self.timeout, Duration::from_millis(1), Duration::from_millis(64));
        let mut next_scan = self.scan_after;
        let mut scanned = 0usize;
        loop {
            if link.exists() {
                return Ok(link);
            }
            let elapsed = backoff.elapsed();
            if elapsed >= next_scan {
                let (found, n) = self.scan(dataset);
                scanned = n;
                if let Some(dev) = found {
                    tracing::info!(dataset, device = %dev.display(), waited_ms = elapsed.as_millis() as u64,
                        "zvol found by BLKZNAME before its udev link appeared");
                    return Ok(dev);
                }
                next_scan = backoff.elapsed() + self.rescan_every;
            }
            if !backoff.wait() {
                return Err(ResolveError::TimedOut {
                    dataset: dataset.to_owned(),
                    waited: backoff.elapsed(),
                    link,
                    sys_block: self.sys_block_dir.clone(),
                    scanned,
                });
            }
        }
    }

    /// The `zd` whole-disk devices listed in sysfs, highest number first (new zvols tend to get the
    /// highest free minor).
    pub fn zd_devices(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.sys_block_dir) else { return Vec::new() };
        let mut devices: Vec<(u64, String)> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| {
                // `zd<digits>` only: partitions (`zd0p1`) and other devices are skipped.
                let number = name.strip_prefix("zd")?;
                let n = number.parse::<u64>().ok().filter(|_| number.bytes().all(|b| b.is_ascii_digit()))?;
                Some((n, name))
            })
            .collect();
        devices.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        devices.into_iter().map(|(_, name)| name).collect()
    }

    /// One sysfs scan: the device whose BLKZNAME is `dataset`, and how many devices were asked.
    fn scan(&self, dataset: &str) -> (Option<PathBuf>, usize) {
        let mut asked = 0usize;
        for name in self.zd_devices() {
            let dev = self.dev_dir.join(&name);
            asked += 1;
            match (self.name_query)(&dev) {
                Ok(n) if n == dataset => return (Some(dev), asked),
                Ok(_) => {}
                // Devices come and go (destroyed meanwhile, node not created yet): not fatal.
                Err(e) => tracing::debug!(device = %dev.display(), error = %e, "BLKZNAME failed"),
            }
        }
        (None, asked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_name(path: &Path) -> io::Result<String> {
        // The fake device nodes are files holding their dataset name.
        std::fs::read_to_string(path).map(|s| s.trim().to_owned())
    }

    fn fake_tree() -> (tempfile::TempDir, DeviceResolver) {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let sys = dir.path().join("sys/block");
        std::fs::create_dir_all(dev.join("zvol")).unwrap();
        std::fs::create_dir_all(&sys).unwrap();
        let r = DeviceResolver::new()
            .with_roots(&dev, &sys)
            .with_name_query(fake_name)
            .with_timeout(Duration::from_millis(300))
            .with_scan(Duration::from_millis(20), Duration::from_millis(20));
        (dir, r)
    }

    #[test]
    fn link_that_appears_later_is_found() {
        let (dir, r) = fake_tree();
        let link_dir = dir.path().join("dev/zvol/tank/vols");
        let target = dir.path().join("dev/zd0");
        std::fs::write(&target, "tank/vols/a").unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::fs::create_dir_all(&link_dir).unwrap();
            std::os::unix::fs::symlink(&target, link_dir.join("a")).unwrap();
        });
        // No sysfs entries, so only the link can be found.
        let found =
            r.clone().with_scan(Duration::from_secs(60), Duration::from_secs(60)).resolve("tank/vols/a");
        t.join().unwrap();
        assert_eq!(found.unwrap(), dir.path().join("dev/zvol/tank/vols/a"));
    }

    #[test]
    fn sysfs_scan_finds_the_device_by_name_skipping_partitions() {
        let (dir, r) = fake_tree();
        for (dev, name) in [("zd0", "tank/vols/x"), ("zd16", "tank/vols/a"), ("zd32", "tank/vols/b")] {
            std::fs::create_dir(dir.path().join("sys/block").join(dev)).unwrap();
            std::fs::write(dir.path().join("dev").join(dev), name).unwrap();
        }
        // A partition-looking entry and an unrelated disk are ignored.
        std::fs::create_dir(dir.path().join("sys/block/zd16p1")).unwrap();
        std::fs::create_dir(dir.path().join("sys/block/sda")).unwrap();
        assert_eq!(r.zd_devices(), vec!["zd32", "zd16", "zd0"], "whole zd disks, newest first");
        assert_eq!(r.resolve("tank/vols/a").unwrap(), dir.path().join("dev/zd16"));
    }

    #[test]
    fn timeout_names_the_dataset_and_the_time_waited() {
        let (dir, r) = fake_tree();
        std::fs::create_dir(dir.path().join("sys/block/zd0")).unwrap();
        std::fs::write(dir.path().join("dev/zd0"), "tank/other").unwrap();
        let err = r.resolve("tank/vols/missing").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ResolveError::TimedOut { scanned: 1, .. }), "{err:?}");
        assert!(msg.contains("tank/vols/missing") && msg.contains("0.3s"), "{msg}");
        assert!(msg.contains("zvol/tank/vols/missing"), "{msg}");
    }

    #[test]
    fn names_that_would_escape_the_device_directory_are_refused() {
        let r = DeviceResolver::new();
        for bad in ["", "/etc/passwd", "tank/../../etc", "tank//a", "tank/./a"] {
            assert!(matches!(r.zvol_link(bad), Err(ResolveError::InvalidName(_))), "{bad:?}");
        }
        assert_eq!(r.zvol_link("tank/a").unwrap(), Path::new("/dev/zvol/tank/a"));
    }

    #[test]
    fn real_blkzname_on_a_non_zvol_is_skipped_not_matched() {
        // /dev/null is a character device: BLKZNAME fails, the scan goes on.
        assert!(blkzname(Path::new("/dev/null")).is_err());
    }
}
