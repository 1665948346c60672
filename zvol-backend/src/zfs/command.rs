//! [`CommandZfs`]: the control path through the `zfs` command, and the parsers of its output.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use xatastor_core::ProvisionError;

use super::{parent_of, CloneProps, DatasetKind, DatasetProps, ListEntry, VolumeProps, ZfsOps};

/// The properties [`ZfsOps::properties`] reads, in `zfs get` syntax.
const PROPERTIES: &str = "used,referenced,logicalused,compressratio,volsize,volblocksize,origin,available";

/// The `zfs` command (`zfs create`, `zfs snapshot`, …), run with `LC_ALL=C` so its messages can be
/// matched; failures are classified by [`classify_failure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandZfs {
    program: PathBuf,
}

impl Default for CommandZfs {
    fn default() -> Self {
        Self::new()
    }
}

/// A finished `zfs` run.
struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CommandZfs {
    /// `zfs` from `PATH`.
    #[must_use]
    pub fn new() -> Self {
        Self { program: PathBuf::from("zfs") }
    }

    /// Another program (an absolute path, or a fake in tests).
    #[must_use]
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into() }
    }

    /// The program run.
    #[must_use]
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Checks that the command runs (`zfs version`); the error says why not.
    pub fn check(&self) -> Result<(), ProvisionError> {
        let run = self.spawn(&["version"])?;
        if run.ok {
            Ok(())
        } else {
            Err(ProvisionError::Backend(format!(
                "`{} version` failed (exit {}): {}",
                self.program.display(),
                code_text(run.code),
                run.stderr.trim()
            )))
        }
    }

    fn spawn(&self, args: &[&str]) -> Result<Run, ProvisionError> {
        tracing::debug!(program = %self.program.display(), ?args, "running zfs");
        let mut attempts = 0;
        let output = loop {
            match Command::new(&self.program).args(args).env("LC_ALL", "C").stdin(Stdio::null()).output() {
                Ok(output) => break output,
                // ETXTBSY: another thread forked while the program file was open for writing (it was
                // just installed); the window closes at once.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 20 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ProvisionError::Backend(format!(
                        "{}the zfs command ({}) was not found",
                        super::UNAVAILABLE,
                        self.program.display()
                    )));
                }
                Err(e) => return Err(ProvisionError::io(format!("running {}", self.program.display()), e)),
            }
        };
        Ok(Run {
            ok: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs `zfs <args>` for operation `op` on `target`; stdout on success, the classified error
    /// otherwise.
    fn run(&self, op: &str, target: &str, args: &[&str]) -> Result<String, ProvisionError> {
        let run = self.spawn(args)?;
        if run.ok {
            Ok(run.stdout)
        } else {
            Err(classify_failure(op, target, &run.stderr, run.code))
        }
    }
}

fn code_text(code: Option<i32>) -> String {
    code.map_or_else(|| "by signal".to_owned(), |c| c.to_string())
}

/// The first `'quoted'` name in `line`.
fn quoted(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once('\'')?;
    let (name, _) = rest.split_once('\'')?;
    Some(name)
}

/// Maps a failed `zfs` run to a typed error from its stderr (`LC_ALL=C` messages of OpenZFS 2.x):
///
/// | stderr contains | error |
/// | --- | --- |
/// | `has dependent clones` / `has children` | `HasDependents` (the datasets listed after `use '-R'…:`) |
/// | `no such pool` | `Backend` (an exported pool is not a deleted volume) |
/// | `parent does not exist` | `NotFound` (the parent) |
/// | `does not exist`, `could not find any snapshots` | `NotFound` (the name quoted in the message) |
/// | `already exists` | `AlreadyExists` |
/// | `busy` | `Busy` |
/// | `out of space`, `quota exceeded` | `NoSpace` |
/// | `must be a multiple`, `invalid`, `bad property`, `bad numeric value`, `too long` | `InvalidArgument` |
/// | anything else | `Backend` with the message and exit code |
#[must_use]
pub fn classify_failure(op: &str, target: &str, stderr: &str, code: Option<i32>) -> ProvisionError {
    let text = stderr.trim();
    let lower = text.to_ascii_lowercase();
    let first_line = text.lines().next().unwrap_or_default();
    let name = quoted(first_line).unwrap_or(target).to_owned();
    if lower.contains("has dependent clones") || lower.contains("has children") {
        let dependents = text
            .lines()
            .skip_while(|l| !l.contains("the following datasets"))
            .skip(1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        return ProvisionError::HasDependents { what: name, dependents };
    }
    if lower.contains("no such pool") {
        return ProvisionError::Backend(format!("zfs {op} {target}: {text}"));
    }
    if lower.contains("parent does not exist") {
        return ProvisionError::NotFound(format!("{} (parent of {target})", parent_of(target)));
    }
    if lower.contains("does not exist") || lower.contains("could not find any snapshots") {
        return ProvisionError::NotFound(name);
    }
    if lower.contains("already exists") {
        return ProvisionError::AlreadyExists(name);
    }
    if lower.contains("busy") {
        return ProvisionError::Busy(name);
    }
    if lower.contains("out of space") || lower.contains("quota exceeded") {
        return ProvisionError::NoSpace(name);
    }
    if [
        "must be a multiple",
        "invalid",
        "bad property",
        "bad numeric value",
        "too long",
        "must be a power of 2",
    ]
    .iter()
    .any(|p| lower.contains(p))
    {
        return ProvisionError::InvalidArgument(format!("zfs {op} {target}: {text}"));
    }
    ProvisionError::Backend(format!("zfs {op} {target} failed (exit {}): {text}", code_text(code)))
}

fn unexpected(what: &str, line: &str) -> ProvisionError {
    ProvisionError::Backend(format!("unexpected output of zfs {what}: {line:?}"))
}

fn parse_u64(what: &str, value: &str) -> Result<Option<u64>, ProvisionError> {
    if value == "-" || value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| unexpected(what, value))
}

/// Parses `zfs get -Hp -o property,value <props> <dataset>`: one `property<TAB>value` per line;
/// `used` and `referenced` are required, `-` means "none".
pub fn parse_properties(stdout: &str) -> Result<DatasetProps, ProvisionError> {
    let mut props = DatasetProps { compress_ratio: 1.0, ..DatasetProps::default() };
    let (mut used, mut referenced) = (None, None);
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let (prop, value) = line.split_once('\t').ok_or_else(|| unexpected("get", line))?;
        let value = value.trim();
        match prop {
            "used" => used = parse_u64("get", value)?,
            "referenced" => referenced = parse_u64("get", value)?,
            "logicalused" => props.logical_used = parse_u64("get", value)?.unwrap_or(0),
            "compressratio" => {
                let v = value.trim_end_matches('x');
                props.compress_ratio = v.parse().map_err(|_| unexpected("get", line))?;
            }
            "volsize" => props.volsize = parse_u64("get", value)?,
            "volblocksize" => props.volblocksize = parse_u64("get", value)?,
            "origin" => props.origin = (value != "-" && !value.is_empty()).then(|| value.to_owned()),
            "available" => props.available = parse_u64("get", value)?,
            _ => {}
        }
    }
    props.used = used.ok_or_else(|| unexpected("get", "no used property"))?;
    props.referenced = referenced.ok_or_else(|| unexpected("get", "no referenced property"))?;
    Ok(props)
}

/// Parses `zfs list -Hp -o name,type,volsize,origin`: one `name<TAB>type<TAB>volsize<TAB>origin` per
/// line.
pub fn parse_list(stdout: &str) -> Result<Vec<ListEntry>, ProvisionError> {
    let mut out = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split('\t');
        let (Some(name), Some(kind), Some(volsize), Some(origin), None) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(unexpected("list", line));
        };
        let kind = match kind {
            "volume" => DatasetKind::Volume,
            "snapshot" => DatasetKind::Snapshot,
            _ => DatasetKind::Other,
        };
        out.push(ListEntry {
            name: name.to_owned(),
            kind,
            volsize: parse_u64("list", volsize.trim())?,
            origin: (origin != "-" && !origin.is_empty()).then(|| origin.trim().to_owned()),
        });
    }
    Ok(out)
}

/// Parses one name per line (`zfs list -H -o name`).
#[must_use]
pub fn parse_names(stdout: &str) -> Vec<String> {
    stdout.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

impl ZfsOps for CommandZfs {
    fn implementation(&self) -> &'static str {
        "zfs command"
    }

    fn create_volume(&self, dataset: &str, props: &VolumeProps) -> Result<(), ProvisionError> {
        let volsize = props.volsize.to_string();
        let volblocksize = format!("volblocksize={}", props.volblocksize);
        let mut args = vec!["create", "-s", "-V", &volsize, "-o", &volblocksize];
        let compression = props.compression.as_ref().map(|c| format!("compression={c}"));
        if let Some(c) = &compression {
            args.extend(["-o", c]);
        }
        args.push(dataset);
        self.run("create", dataset, &args).map(drop)
    }

    fn snapshot(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        if snapshots.is_empty() {
            return Ok(());
        }
        let mut args = vec!["snapshot"];
        args.extend(snapshots.iter().map(String::as_str));
        self.run("snapshot", &snapshots.join(" "), &args).map(drop)
    }

    fn clone_snapshot(&self, origin: &str, dataset: &str, props: &CloneProps) -> Result<(), ProvisionError> {
        let mut args = vec!["clone"];
        let compression = props.compression.as_ref().map(|c| format!("compression={c}"));
        if let Some(c) = &compression {
            args.extend(["-o", c]);
        }
        args.extend([origin, dataset]);
        self.run("clone", dataset, &args).map(drop)
    }

    fn destroy(&self, dataset: &str) -> Result<(), ProvisionError> {
        self.run("destroy", dataset, &["destroy", dataset]).map(drop)
    }

    fn destroy_snapshots(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        // `zfs destroy ds@a,b,c` destroys the snapshots of one dataset in one transaction.
        let mut by_dataset: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in snapshots {
            let Some((ds, snap)) = s.split_once('@') else {
                return Err(ProvisionError::InvalidArgument(format!("{s:?} is not a snapshot name")));
            };
            by_dataset.entry(ds).or_default().push(snap);
        }
        for (ds, snaps) in by_dataset {
            let arg = format!("{ds}@{}", snaps.join(","));
            match self.run("destroy", &arg, &["destroy", &arg]) {
                Ok(_) | Err(ProvisionError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_volsize(&self, dataset: &str, volsize: u64) -> Result<(), ProvisionError> {
        let arg = format!("volsize={volsize}");
        self.run("set", dataset, &["set", &arg, dataset]).map(drop)
    }

    fn properties(&self, dataset: &str) -> Result<DatasetProps, ProvisionError> {
        let out = self.run("get", dataset, &["get", "-Hp", "-o", "property,value", PROPERTIES, dataset])?;
        parse_properties(&out)
    }

    fn exists(&self, dataset: &str) -> Result<bool, ProvisionError> {
        match self.run("list", dataset, &["list", "-H", "-o", "name", dataset]) {
            Ok(_) => Ok(true),
            Err(ProvisionError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, parent: &str) -> Result<Vec<ListEntry>, ProvisionError> {
        let out = self.run(
            "list",
            parent,
            &["list", "-Hp", "-t", "volume,snapshot", "-r", "-o", "name,type,volsize,origin", parent],
        )?;
        parse_list(&out)
    }

    fn snapshots(&self, dataset: &str) -> Result<Vec<String>, ProvisionError> {
        let out =
            self.run("list", dataset, &["list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset])?;
        Ok(parse_names(&out))
    }

    fn clones(&self, snapshot: &str) -> Result<Vec<String>, ProvisionError> {
        let out = self.run("get", snapshot, &["get", "-H", "-o", "value", "clones", snapshot])?;
        Ok(out
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "-")
            .map(str::to_owned)
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Installs a fake `zfs` (a shell script) in `dir` that logs `LC_ALL` and its arguments to
    /// `dir/log` and then runs `body` (a `case "$1" in … esac`).
    pub(crate) fn fake_zfs(dir: &Path, body: &str) -> CommandZfs {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("zfs");
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"LC_ALL=$LC_ALL $*\" >> '{}'\n{body}\n",
            dir.join("log").display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        CommandZfs::with_program(path)
    }

    fn log(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    const FAKE: &str = r#"case "$1" in
version) echo zfs-2.1.11-1 ;;
get) case "$2" in
     -Hp) printf 'used\t100\nreferenced\t200\nlogicalused\t300\ncompressratio\t1.50\nvolsize\t1073741824\nvolblocksize\t16384\norigin\t-\n' ;;
     *) echo 'tank/x/c1,tank/x/c2' ;;
     esac ;;
list) case "$*" in
      *nope*) echo "cannot open 'tank/x/nope': dataset does not exist" >&2; exit 1 ;;
      *"-t snapshot"*) printf 'tank/x/a@s1\ntank/x/a@s2\n' ;;
      *"-r"*) printf 'tank/x/a\tvolume\t1073741824\t-\ntank/x/a@s1\tsnapshot\t1073741824\t-\n' ;;
      *) echo tank/x/a ;;
      esac ;;
destroy) case "$2" in
         *@*) echo "could not find any snapshots to destroy; check snapshot names." >&2; exit 1 ;;
         *) echo "cannot destroy '$2': dataset is busy" >&2; exit 1 ;;
         esac ;;
snapshot) case "$*" in *exists*) echo "cannot create snapshot 'tank/x/exists@s': dataset already exists" >&2; exit 1 ;; esac ;;
esac"#;

    #[test]
    fn command_arguments_and_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let zfs = fake_zfs(dir.path(), FAKE);
        zfs.check().unwrap();
        let props = VolumeProps { volsize: 1 << 30, volblocksize: 16384, compression: Some("lz4".into()) };
        zfs.create_volume("tank/x/a", &props).unwrap();
        zfs.create_volume("tank/x/b", &VolumeProps { compression: None, ..props }).unwrap();
        zfs.snapshot(&["tank/x/a@s1".into(), "tank/x/b@s1".into()]).unwrap();
        zfs.snapshot(&[]).unwrap();
        zfs.clone_snapshot("tank/x/a@s1", "tank/x/c", &CloneProps { compression: Some("zstd".into()) })
            .unwrap();
        zfs.clone_snapshot("tank/x/a@s1", "tank/x/d", &CloneProps::default()).unwrap();
        zfs.set_volsize("tank/x/c", 2 << 30).unwrap();
        let p = zfs.properties("tank/x/a").unwrap();
        assert_eq!((p.used, p.referenced, p.logical_used, p.volsize), (100, 200, 300, Some(1 << 30)));
        assert!(zfs.exists("tank/x/a").unwrap());
        assert!(!zfs.exists("tank/x/nope").unwrap());
        assert_eq!(zfs.list("tank/x").unwrap().len(), 2);
        assert_eq!(zfs.snapshots("tank/x/a").unwrap(), vec!["tank/x/a@s1", "tank/x/a@s2"]);
        assert_eq!(zfs.clones("tank/x/a@s1").unwrap(), vec!["tank/x/c1", "tank/x/c2"]);
        assert!(matches!(zfs.destroy("tank/x/a"), Err(ProvisionError::Busy(n)) if n == "tank/x/a"));
        zfs.destroy_snapshots(&["tank/x/a@s1".into(), "tank/x/b@s1".into(), "tank/x/a@s2".into()]).unwrap();
        assert!(matches!(
            zfs.snapshot(&["tank/x/exists@s".into()]),
            Err(ProvisionError::AlreadyExists(n)) if n == "tank/x/exists@s"
        ));
        assert_eq!(
            log(dir.path()),
            [
                "version",
                "create -s -V 1073741824 -o volblocksize=16384 -o compression=lz4 tank/x/a",
                "create -s -V 1073741824 -o volblocksize=16384 tank/x/b",
                "snapshot tank/x/a@s1 tank/x/b@s1",
                "clone -o compression=zstd tank/x/a@s1 tank/x/c",
                "clone tank/x/a@s1 tank/x/d",
                "set volsize=2147483648 tank/x/c",
                "get -Hp -o property,value used,referenced,logicalused,compressratio,volsize,volblocksize,origin,available tank/x/a",
                "list -H -o name tank/x/a",
                "list -H -o name tank/x/nope",
                "list -Hp -t volume,snapshot -r -o name,type,volsize,origin tank/x",
                "list -H -o name -t snapshot -d 1 tank/x/a",
                "get -H -o value clones tank/x/a@s1",
                "destroy tank/x/a",
                "destroy tank/x/a@s1,s2",
                "destroy tank/x/b@s1",
                "snapshot tank/x/exists@s",
            ]
            .iter()
            .map(|l| format!("LC_ALL=C {l}"))
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn missing_or_failing_command_is_a_clear_error() {
        let missing = CommandZfs::with_program("/nonexistent/zfs");
        let e = missing.check().unwrap_err().to_string();
        assert_eq!(e, "ZFS is not available: the zfs command (/nonexistent/zfs) was not found");
        assert!(missing.exists("tank/a").is_err(), "not \"does not exist\"");
        let dir = tempfile::tempdir().unwrap();
        let broken = fake_zfs(dir.path(), "echo 'The ZFS modules are not loaded.' >&2; exit 1");
        let e = broken.check().unwrap_err().to_string();
        assert!(e.contains("version` failed (exit 1): The ZFS modules are not loaded."), "{e}");
    }

    #[test]
    fn properties_are_parsed() {
        let out = "used\t1064960\nreferenced\t57344\nlogicalused\t2097152\ncompressratio\t2.37\n\
                   volsize\t1073741824\nvolblocksize\t16384\norigin\ttank/x/base@s1\navailable\t5000000\n";
        let p = parse_properties(out).unwrap();
        assert_eq!(
            p,
            DatasetProps {
                used: 1_064_960,
                referenced: 57_344,
                logical_used: 2_097_152,
                compress_ratio: 2.37,
                volsize: Some(1 << 30),
                volblocksize: Some(16384),
                origin: Some("tank/x/base@s1".into()),
                available: Some(5_000_000),
            }
        );
        let plain = parse_properties("used\t1\nreferenced\t2\ncompressratio\t1.00x\norigin\t-\nvolsize\t-\n")
            .unwrap();
        assert_eq!((plain.origin, plain.volsize, plain.compress_ratio), (None, None, 1.0));
        assert!(parse_properties("used\tlots\nreferenced\t1\n").is_err(), "non-numeric value");
        assert!(parse_properties("referenced\t1\n").is_err(), "used is required");
        assert!(parse_properties("garbage without a tab").is_err());
    }

    #[test]
    fn listing_is_parsed() {
        let out = "tank/x/a\tvolume\t1073741824\t-\n\
                   tank/x/a@s1\tsnapshot\t1073741824\t-\n\
                   tank/x/b\tvolume\t2147483648\ttank/x/a@s1\n\
                   tank/x/fs\tfilesystem\t-\t-\n";
        let l = parse_list(out).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(
            l[2],
            ListEntry {
                name: "tank/x/b".into(),
                kind: DatasetKind::Volume,
                volsize: Some(2 << 30),
                origin: Some("tank/x/a@s1".into())
            }
        );
        assert_eq!((l[1].kind, l[3].kind, l[3].volsize), (DatasetKind::Snapshot, DatasetKind::Other, None));
        assert!(parse_list("tank/x/a\tvolume\t1\n").is_err(), "missing column");
        assert!(parse_list("tank/x/a\tvolume\tbig\t-\n").is_err(), "bad number");
        assert_eq!(parse_list("").unwrap(), vec![]);
        assert_eq!(parse_names("a@1\n\nb@2\n"), vec!["a@1", "b@2"]);
    }

    #[test]
    fn stderr_is_classified_into_typed_errors() {
        use ProvisionError as E;
        let c = |stderr: &str| classify_failure("destroy", "tank/x/a@s", stderr, Some(1));
        match c("cannot destroy 'tank/x/a@s': snapshot has dependent clones\n\
                 use '-R' to destroy the following datasets:\ntank/x/b\ntank/x/c\n")
        {
            E::HasDependents { what, dependents } => {
                assert_eq!(what, "tank/x/a@s");
                assert_eq!(dependents, vec!["tank/x/b", "tank/x/c"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c("cannot destroy 'tank/x/a': volume has children\nuse '-r' to destroy the following datasets:\ntank/x/a@s\n"),
            E::HasDependents { dependents, .. } if dependents == ["tank/x/a@s"]
        ));
        assert!(
            matches!(c("cannot open 'tank/x/a@s': dataset does not exist\n"), E::NotFound(n) if n == "tank/x/a@s")
        );
        assert!(
            matches!(c("could not find any snapshots to destroy; check snapshot names.\n"), E::NotFound(n) if n == "tank/x/a@s")
        );
        assert!(matches!(c("cannot destroy 'tank/x/a': dataset is busy\n"), E::Busy(n) if n == "tank/x/a"));
        assert!(matches!(c("cannot create 'tank/x/a': out of space\n"), E::NoSpace(n) if n == "tank/x/a"));
        assert!(matches!(
            c("cannot create snapshot 'tank/x/a@s': dataset already exists\n"),
            E::AlreadyExists(n) if n == "tank/x/a@s"
        ));
        assert!(matches!(
            classify_failure("create", "tank/nope/a", "cannot create 'tank/nope/a': parent does not exist\n", Some(1)),
            E::NotFound(n) if n.starts_with("tank/nope (parent")
        ));
        assert!(
            matches!(c("cannot open 'tank': no such pool\n"), E::Backend(_)),
            "a missing pool is not a deleted volume"
        );
        assert!(matches!(
            c("cannot create 'tank/x/a': volume size must be a multiple of volume block size\n"),
            E::InvalidArgument(_)
        ));
        match c("cannot destroy 'tank/x/a': permission denied\n") {
            E::Backend(m) => assert!(m.contains("permission denied") && m.contains("exit 1"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
