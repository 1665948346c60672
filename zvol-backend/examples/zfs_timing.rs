//! Times the ZFS control path: N creates, snapshots, clones and destroys of zvols through libzfs_core
//! (dlopen) and through the `zfs` command, and prints a table. Needs root and a real pool:
//!
//! ```sh
//! cargo run --release -p zvol-backend --example zfs_timing -- tank/xatastor-timing 50
//! ```
//!
//! Every dataset it makes is named `<parent>/timing-<implementation>-<pid>-<i>` and destroyed again at
//! the end (also after a failure, as far as possible). It also measures how long the device of a new
//! zvol takes to appear (`/dev/zvol/...` by udev, or by `BLKZNAME`), and counts destroys that had to be
//! retried because udev still had the new device open (`dataset is busy`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xatastor_core::ProvisionError;
use zvol_backend::zfs::{CloneProps, VolumeProps};
use zvol_backend::{CommandZfs, DeviceResolver, LzcConfig, LzcZfs, ZfsOps};

const USAGE: &str = "usage: zfs_timing <parent-dataset> [count=20] [--volsize BYTES] [--no-device-wait]";

struct Args {
    parent: String,
    count: usize,
    volsize: u64,
    device_wait: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parent = None;
    let mut count = 20usize;
    let mut volsize = 64u64 << 20;
    let mut device_wait = true;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--volsize" => {
                volsize = args.next().and_then(|v| v.parse().ok()).ok_or("--volsize needs a byte count")?;
            }
            "--no-device-wait" => device_wait = false,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if parent.is_none() => parent = Some(a),
            _ => count = a.parse().map_err(|_| format!("bad count {a:?}\n{USAGE}"))?,
        }
    }
    let parent = parent.ok_or(USAGE)?;
    Ok(Args { parent, count: count.max(1), volsize, device_wait })
}

/// Durations of one operation kind.
struct Sample {
    implementation: &'static str,
    op: &'static str,
    times: Vec<Duration>,
    retries: usize,
}

impl Sample {
    fn new(implementation: &'static str, op: &'static str) -> Self {
        Self { implementation, op, times: Vec::new(), retries: 0 }
    }

    fn row(&self) -> String {
        let mut t = self.times.clone();
        t.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let total: Duration = t.iter().sum();
        let mean = if t.is_empty() { 0.0 } else { ms(total) / t.len() as f64 };
        let p50 = t.get(t.len() / 2).copied().map_or(0.0, ms);
        let max = t.last().copied().map_or(0.0, ms);
        format!(
            "| {:<14} | {:<26} | {:>5} | {:>10.1} | {:>8.2} | {:>8.2} | {:>8.2} | {:>7} |",
            self.implementation,
            self.op,
            t.len(),
            ms(total),
            mean,
            p50,
            max,
            self.retries
        )
    }
}

#[allow(clippy::disallowed_methods)] // a benchmark reads the clock
fn timed<T>(sample: &mut Sample, f: impl FnOnce() -> Result<T, ProvisionError>) -> Result<T, ProvisionError> {
    let start = Instant::now();
    let r = f();
    sample.times.push(start.elapsed());
    r
}

/// `destroy` that retries while udev still holds a new zvol open (up to ~2 s).
fn destroy_retrying(ops: &dyn ZfsOps, dataset: &str, sample: &mut Sample) -> Result<(), ProvisionError> {
    let mut attempts = 0;
    timed(sample, || loop {
        match ops.destroy(dataset) {
            Err(ProvisionError::Busy(_)) if attempts < 100 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    })
    .inspect(|()| sample.retries += attempts)
}

fn run(
    ops: &dyn ZfsOps,
    label: &'static str,
    args: &Args,
    out: &mut Vec<Sample>,
) -> Result<(), ProvisionError> {
    let prefix = format!("{}/timing-{}-{}", args.parent, label, std::process::id());
    let vols: Vec<String> = (0..args.count).map(|i| format!("{prefix}-v{i}")).collect();
    let clones: Vec<String> = (0..args.count).map(|i| format!("{prefix}-c{i}")).collect();
    let props = VolumeProps { volsize: args.volsize, volblocksize: 16384, compression: Some("lz4".into()) };
    let resolver = DeviceResolver::new().with_timeout(Duration::from_secs(30));

    let mut create = Sample::new(label, "create (sparse zvol)");
    let mut device = Sample::new(label, "device appears after create");
    let mut snap = Sample::new(label, "snapshot (one each)");
    let mut batch = Sample::new(label, "snapshot (all, one txn)");
    let mut clone = Sample::new(label, "clone");
    let mut destroy_clone = Sample::new(label, "destroy clone");
    let mut destroy_snaps = Sample::new(label, "destroy 2 snapshots");
    let mut destroy_vol = Sample::new(label, "destroy volume");

    let result = (|| {
        for v in &vols {
            timed(&mut create, || ops.create_volume(v, &props))?;
            if args.device_wait {
                timed(&mut device, || {
                    resolver.resolve(v).map_err(|e| ProvisionError::Backend(e.to_string()))
                })?;
            }
        }
        for v in &vols {
            timed(&mut snap, || ops.snapshot(&[format!("{v}@s")]))?;
        }
        let all: Vec<String> = vols.iter().map(|v| format!("{v}@batch")).collect();
        timed(&mut batch, || ops.snapshot(&all))?;
        for (v, c) in vols.iter().zip(&clones) {
            timed(&mut clone, || ops.clone_snapshot(&format!("{v}@s"), c, &CloneProps::default()))?;
        }
        Ok::<(), ProvisionError>(())
    })();

    // Clean up whatever exists, timing the destroys.
    let mut first_error = result.err();
    for c in &clones {
        if ops.exists(c).unwrap_or(false) {
            if let Err(e) = destroy_retrying(ops, c, &mut destroy_clone) {
                first_error.get_or_insert(e);
            }
        }
    }
    for v in &vols {
        if !ops.exists(v).unwrap_or(false) {
            continue;
        }
        let snaps = [format!("{v}@s"), format!("{v}@batch")];
        if let Err(e) = timed(&mut destroy_snaps, || ops.destroy_snapshots(&snaps)) {
            first_error.get_or_insert(e);
        }
        if let Err(e) = destroy_retrying(ops, v, &mut destroy_vol) {
            first_error.get_or_insert(e);
        }
    }
    out.extend([create, device, snap, batch, clone, destroy_clone, destroy_snaps, destroy_vol]);
    first_error.map_or(Ok(()), Err)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let cmd = CommandZfs::new();
    let mut implementations: Vec<(&'static str, Arc<dyn ZfsOps>)> = Vec::new();
    match LzcZfs::load(&LzcConfig::default(), cmd.clone()) {
        Ok(lzc) => implementations.push(("lzc", Arc::new(lzc))),
        Err(e) => eprintln!("libzfs_core: {e}"),
    }
    match cmd.check() {
        Ok(()) => implementations.push(("zfs-command", Arc::new(cmd.clone()))),
        Err(e) => eprintln!("zfs command: {e}"),
    }
    if implementations.is_empty() {
        eprintln!("nothing to time: ZFS is not available");
        return ExitCode::FAILURE;
    }
    match cmd.exists(&args.parent) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("parent dataset {} does not exist (zfs create {0})", args.parent);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("cannot check {}: {e}", args.parent);
            return ExitCode::FAILURE;
        }
    }
    println!(
        "{} volumes of {} bytes under {} (volblocksize 16K, lz4)\n",
        args.count, args.volsize, args.parent
    );
    let mut samples = Vec::new();
    let mut failed = false;
    for (label, ops) in &implementations {
        if let Err(e) = run(ops.as_ref(), label, &args, &mut samples) {
            eprintln!("{label}: {e}");
            failed = true;
        }
    }
    println!("| implementation | operation                  | count |   total ms |  mean ms |   p50 ms |   max ms | retries |");
    println!("| -------------- | -------------------------- | ----: | ---------: | -------: | -------: | -------: | ------: |");
    for s in samples.iter().filter(|s| !s.times.is_empty()) {
        println!("{}", s.row());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
