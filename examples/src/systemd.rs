//! systemd integration: readiness and reload notifications (`sd_notify`), the file descriptor
//! store, and the sockets systemd passes at start (`sd_listen_fds`).
//!
//! ```text
//!             NOTIFY_SOCKET (datagram)                       LISTEN_FDS / LISTEN_FDNAMES
//!  server ──────────────────────────────▶ systemd ─────────────────────────────────▶ server
//!          READY=1, RELOADING=1, STATUS=    │  keeps FDSTORE=1 fds       (next start, fds 3..)
//!          MAINPID=, STOPPING=1, FDSTORE=1 ─┘  across restarts
//! ```
//!
//! Every function is a no-op returning `Ok(false)` (or an empty list) when the process does not
//! run under systemd, so the server calls them unconditionally. Nothing here links to libsystemd:
//! the protocol is a datagram of `KEY=VALUE` lines on the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or `@name` for an abstract socket), with file descriptors attached as `SCM_RIGHTS`.
//! The `*_to` functions take that address as an argument instead of reading the environment.
//!
//! # Start and stop
//!
//! 1. Early in `main`, before any thread is started, [`take_listen_fds`] takes the sockets
//!    systemd passed (after a crash-restart: the listeners kept in the fd store, with their
//!    names); [`take_tcp_listener`] picks the one bound to the configured address, so the
//!    server reuses it instead of binding (no connection is refused while it restarts).
//! 2. Once listening, [`store_fds`] hands a duplicate of each listener to systemd (needs
//!    `FileDescriptorStoreMax=` > 0 in the unit); storing a socket already in the store is a
//!    no-op. A listener the server closes for good is dropped with [`remove_stored_fds`].
//! 3. [`notify_ready`] when the node serves. [`notify_stopping`] on an orderly shutdown only.
//!
//! # Zero-downtime upgrade (handover to a new process)
//!
//! The running process (old) starts the new binary as its child and hands it the sockets. For
//! systemd to follow, the unit needs `NotifyAccess=all` (messages from the child are otherwise
//! dropped) and the following order:
//!
//! 1. old: [`notify_reloading`] (`RELOADING=1` and `MONOTONIC_USEC=`, which systemd ≥ 253
//!    requires for `Type=notify-reload` and older ones ignore), then starts the new process with
//!    `NOTIFY_SOCKET` left in its environment.
//! 2. new: once it serves, [`notify_main_pid_ready`] (`MAINPID=<its pid>` and `READY=1`: systemd
//!    now supervises the new process and leaves the reload state), then [`notify_barrier`] so
//!    that systemd has processed it, and only then tells the old process to exit.
//! 3. old: exits with status 0 and does **not** send `STOPPING=1`: systemd would stop the whole
//!    service (the new process included). Its exit is not the main process's exit any more,
//!    so systemd does nothing; the new process is reparented to systemd, which therefore still
//!    gets its exit status (`Restart=` keeps working).
//! 4. On a failed handover the old process keeps serving and sends [`READY`] (with a
//!    [`status_message`]) to leave the reload state.
//!
//! The fd store belongs to the service, not to a process: it survives the handover untouched.

use std::ffi::{OsStr, OsString};
use std::io::{self, ErrorKind, IoSlice};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::{fcntl_getfd, fcntl_setfd, Errno, FdFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketType};

/// `READY=1`: start-up (or a reload) is finished and the service serves.
pub const READY: &str = "READY=1";

/// `STOPPING=1`: the service is shutting down. Never send it when handing over to a new
/// process: systemd would stop the whole service.
pub const STOPPING: &str = "STOPPING=1";

/// The most file descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// The longest file descriptor name systemd accepts.
pub const MAX_FDNAME_LEN: usize = 255;

/// More sockets than this in `LISTEN_FDS` is taken as a corrupt environment.
const MAX_LISTEN_FDS: usize = 65_536;

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// `$NOTIFY_SOCKET`, or `None` when the process does not run under systemd.
fn notify_socket_from_env() -> Option<OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// Sends `state` (one or more `KEY=VALUE` lines, see `sd_notify(3)`) to systemd.
///
/// Returns `Ok(false)` without sending anything when `$NOTIFY_SOCKET` is not set (not under
/// systemd), `Ok(true)` once the datagram is queued on systemd's socket. systemd reads at most
/// 4096 bytes of a message. `$NOTIFY_SOCKET` is left in the environment, so a child started for a
/// handover can notify too.
pub fn notify(state: &str) -> io::Result<bool> {
    notify_with_fds(state, &[])
}

/// [`notify`] with file descriptors attached (`SCM_RIGHTS`; at most [`MAX_FDS_PER_MESSAGE`]).
///
/// systemd keeps them only with `FDSTORE=1` (see [`store_fds`]) and closes them otherwise.
pub fn notify_with_fds(state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    match notify_socket_from_env() {
        None => Ok(false),
        Some(socket) => notify_to(&socket, state, fds).map(|()| true),
    }
}

/// Sends `state` with `fds` to the notification socket `socket`: an absolute path, or `@name`
/// for a socket in the abstract namespace (the two forms `$NOTIFY_SOCKET` takes).
///
/// Errors: `InvalidInput` for another form of address (`vsock:` is not supported), an empty
/// `state` or more than [`MAX_FDS_PER_MESSAGE`] descriptors; the connect or send error otherwise.
pub fn notify_to(socket: &OsStr, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if state.is_empty() {
        return Err(invalid_input("empty notification".to_owned()));
    }
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(invalid_input(format!(
            "{} file descriptors in one notification, at most {MAX_FDS_PER_MESSAGE}",
            fds.len()
        )));
    }
    let sock = connect_notify_socket(socket)?;
    let iov = [IoSlice::new(state.as_bytes())];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for the descriptors"));
    }
    let sent = rustix::net::sendmsg(&sock, &iov, &mut control, SendFlags::NOSIGNAL)?;
    if sent != state.len() {
        return Err(io::Error::new(
            ErrorKind::WriteZero,
            format!("notification cut to {sent} of {} bytes", state.len()),
        ));
    }
    Ok(())
}

fn connect_notify_socket(addr: &OsStr) -> io::Result<UnixDatagram> {
    let bytes = addr.as_bytes();
    let sock = UnixDatagram::unbound()?;
    match bytes.split_first() {
        Some((b'/', _)) => sock.connect(Path::new(addr))?,
        Some((b'@', name)) => {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.connect_addr(&addr)?;
        }
        _ => {
            return Err(invalid_input(format!(
                "notification socket {addr:?} is neither an absolute path nor @name"
            )))
        }
    }
    Ok(sock)
}

/// `READY=1`: start-up is finished. See [`notify`] for the return value.
pub fn notify_ready() -> io::Result<bool> {
    notify(READY)
}

/// `RELOADING=1` with `MONOTONIC_USEC=` ([`reloading_message`]): a reload or an upgrade began;
/// systemd shows the unit as reloading until [`READY`] comes (from this process or, after a
/// handover, from the new main process).
pub fn notify_reloading() -> io::Result<bool> {
    notify(&reloading_message())
}

/// `STOPPING=1`: an orderly shutdown began (not for a handover; see [`STOPPING`]).
pub fn notify_stopping() -> io::Result<bool> {
    notify(STOPPING)
}

/// `STATUS=<text>`, shown by `systemctl status` ([`status_message`]).
pub fn notify_status(text: &str) -> io::Result<bool> {
    notify(&status_message(text))
}

/// `MAINPID=<this process>` and `READY=1` in one message: sent by the new process of a handover
/// once it serves, so that systemd supervises it instead of the old one. Needs
/// `NotifyAccess=all` in the unit (the new process is neither the main nor a control process
/// when it sends this).
pub fn notify_main_pid_ready() -> io::Result<bool> {
    notify(&format!("{}\n{READY}", main_pid_message(std::process::id())))
}

/// `RELOADING=1\nMONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`.
#[must_use]
pub fn reloading_message() -> String {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec.saturating_mul(1_000_000).saturating_add(now.tv_nsec / 1_000);
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// `STATUS=<text>` on one line: line breaks and NUL bytes in `text` become spaces (a line break
/// would start another `KEY=VALUE` assignment).
#[must_use]
pub fn status_message(text: &str) -> String {
    let text: String = text.chars().map(|c| if matches!(c, '\n' | '\r' | '\0') { ' ' } else { c }).collect();
    format!("STATUS={text}")
}

/// `MAINPID=<pid>`.
#[must_use]
pub fn main_pid_message(pid: u32) -> String {
    format!("MAINPID={pid}")
}

/// Waits until systemd has processed every notification this process sent before
/// (`BARRIER=1`, systemd ≥ 246; older versions close the descriptor too, which is all this
/// waits for).
///
/// `Ok(false)` when not under systemd; `Err` of kind `TimedOut` after `timeout`.
pub fn notify_barrier(timeout: Duration) -> io::Result<bool> {
    match notify_socket_from_env() {
        None => Ok(false),
        Some(socket) => barrier_to(&socket, timeout).map(|()| true),
    }
}

/// [`notify_barrier`] on the notification socket `socket` (see [`notify_to`]).
#[allow(clippy::disallowed_methods)] // a blocking wait on the service manager owns its clock
pub fn barrier_to(socket: &OsStr, timeout: Duration) -> io::Result<()> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    notify_to(socket, "BARRIER=1", &[write.as_fd()])?;
    // systemd closes its copy once it has processed the message: the read end then sees POLLHUP.
    drop(write);
    let deadline = Instant::now()
        .checked_add(timeout)
        .ok_or_else(|| invalid_input(format!("barrier timeout {timeout:?} too long")))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let left = Timespec::try_from(left)
            .map_err(|_| invalid_input(format!("barrier timeout {timeout:?} too long")))?;
        let mut pfd = [PollFd::new(&read, PollFlags::IN)];
        match rustix::event::poll(&mut pfd, Some(&left)) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "the service manager did not process the notifications in time",
                ))
            }
            Ok(_) if pfd[0].revents().intersects(PollFlags::HUP | PollFlags::ERR) => return Ok(()),
            Ok(_) => return Err(io::Error::other("data on the notification barrier pipe")),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Checks a file descriptor name for the fd store: 1 to [`MAX_FDNAME_LEN`] printable ASCII
/// characters, no `:` (the separator of `LISTEN_FDNAMES`).
fn check_fdname(name: &str) -> io::Result<()> {
    let printable = name.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b':');
    if name.is_empty() || name.len() > MAX_FDNAME_LEN || !printable {
        return Err(invalid_input(format!(
            "file descriptor name {name:?}: 1 to {MAX_FDNAME_LEN} printable ASCII characters \
             without ':'"
        )));
    }
    Ok(())
}

/// `FDSTORE=1\nFDNAME=<name>`, after checking `name` (see [`store_fds`]).
pub fn fdstore_message(name: &str) -> io::Result<String> {
    check_fdname(name)?;
    Ok(format!("FDSTORE=1\nFDNAME={name}"))
}

/// `FDSTOREREMOVE=1\nFDNAME=<name>`, after checking `name` (see [`store_fds`]).
pub fn fdstore_remove_message(name: &str) -> io::Result<String> {
    check_fdname(name)?;
    Ok(format!("FDSTOREREMOVE=1\nFDNAME={name}"))
}

/// Hands duplicates of `fds` to systemd's fd store under `name`: systemd keeps them while the
/// service runs and across its restarts (a crash included) and passes them back at the next
/// start, where [`take_listen_fds`] returns them with this name.
///
/// `name`: 1 to [`MAX_FDNAME_LEN`] printable ASCII characters without `:`. At most
/// [`MAX_FDS_PER_MESSAGE`] fds per call; calls add up, to `FileDescriptorStoreMax=` (systemd
/// drops the excess and logs it). Storing a socket already stored is a no-op. systemd closes a
/// stored fd by itself when it sees `POLLHUP`/`POLLERR` on it. `Ok(false)` when not under
/// systemd. systemd does not answer, so an fd store that is disabled (`FileDescriptorStoreMax=0`)
/// does not show here, only in its log.
pub fn store_fds(name: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
    let message = fdstore_message(name)?;
    if fds.is_empty() {
        return Err(invalid_input(format!("no file descriptor to store as {name:?}")));
    }
    notify_with_fds(&message, fds)
}

/// Makes systemd close every stored fd named `name` (`FDSTOREREMOVE=1`), for a listener the
/// server closed for good (its address changed). `Ok(false)` when not under systemd.
pub fn remove_stored_fds(name: &str) -> io::Result<bool> {
    notify(&fdstore_remove_message(name)?)
}

/// Set once [`take_listen_fds`] ran: the descriptors are taken once.
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the file descriptors systemd passed to this process (`sd_listen_fds_with_names(3)`):
/// `LISTEN_FDS` descriptors from fd 3 on, named by `LISTEN_FDNAMES` (`"unknown"` when it is
/// absent), only if `LISTEN_PID` is this process. After a restart, the fds of the fd store come
/// back this way with the name given to [`store_fds`] (socket units' fds too, if any).
///
/// The descriptors are taken once: `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed
/// from the environment (a child does not see them) and later calls return an empty list. Each
/// descriptor is checked to be open and gets `FD_CLOEXEC`. Call it first thing in `main`, before
/// any thread is started (it changes the environment) and before anything opens a file.
///
/// Errors (`InvalidInput`): a malformed variable, a count of names that is not `LISTEN_FDS`, or
/// a descriptor that is not open; no descriptor is taken then (the caller binds afresh).
pub fn take_listen_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let var = |key: &str| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned());
    let listen_pid = var("LISTEN_PID");
    let listen_fds = var("LISTEN_FDS");
    let listen_fdnames = var("LISTEN_FDNAMES");
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    let parsed = parse_listen_fds(
        std::process::id(),
        listen_pid.as_deref(),
        listen_fds.as_deref(),
        listen_fdnames.as_deref(),
    )?;
    for (_, raw) in &parsed {
        // SAFETY: fcntl(F_GETFD) reads the descriptor flags of any integer: it touches no memory
        // and fails with EBADF when the descriptor is not open.
        if unsafe { libc::fcntl(*raw, libc::F_GETFD) } < 0 {
            return Err(invalid_input(format!(
                "LISTEN_FDS names fd {raw}, which is not open: {}",
                io::Error::last_os_error()
            )));
        }
    }
    let mut taken = Vec::with_capacity(parsed.len());
    for (name, raw) in parsed {
        // SAFETY: `raw` is open (checked above). systemd passed it to this very process
        // (LISTEN_PID is our pid) for whoever takes LISTEN_FDS, and this is the only place that
        // does, once (LISTEN_FDS_TAKEN, and the variables are gone): nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let flags = fcntl_getfd(&fd)?;
        fcntl_setfd(&fd, flags | FdFlags::CLOEXEC)?;
        taken.push((name, fd));
    }
    Ok(taken)
}

/// The descriptors named by the `LISTEN_*` variables, for the process `pid`: `LISTEN_FDS`
/// descriptors from fd 3 on, with their `LISTEN_FDNAMES` names; none when `LISTEN_PID` is
/// absent or another process.
fn parse_listen_fds(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
) -> io::Result<Vec<(String, RawFd)>> {
    let Some(listen_pid) = listen_pid else {
        return Ok(Vec::new());
    };
    let listen_pid: u32 = listen_pid
        .parse()
        .map_err(|_| invalid_input(format!("LISTEN_PID={listen_pid:?} is not a process id")))?;
    if listen_pid != pid {
        return Ok(Vec::new());
    }
    let Some(listen_fds) = listen_fds else {
        return Ok(Vec::new());
    };
    let count: usize =
        listen_fds.parse().map_err(|_| invalid_input(format!("LISTEN_FDS={listen_fds:?} is not a count")))?;
    if count > MAX_LISTEN_FDS {
        return Err(invalid_input(format!("LISTEN_FDS={count}: more than {MAX_LISTEN_FDS} descriptors")));
    }
    let names: Vec<String> = match listen_fdnames {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count],
    };
    if names.len() != count {
        return Err(invalid_input(format!(
            "LISTEN_FDNAMES has {} names for LISTEN_FDS={count}",
            names.len()
        )));
    }
    Ok(names.into_iter().zip(LISTEN_FDS_START..).collect())
}

/// The address a listening TCP socket is bound to; `None` for any other descriptor (not a
/// socket, not TCP, not listening).
pub fn tcp_listener_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    if rustix::net::sockopt::socket_type(fd).ok()? != SocketType::STREAM
        || rustix::net::sockopt::socket_protocol(fd).ok()? != Some(rustix::net::ipproto::TCP)
        || !rustix::net::sockopt::socket_acceptconn(fd).ok()?
    {
        return None;
    }
    SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()
}

/// Removes from `fds` the listening TCP socket bound to `addr` (same IP, port and, for IPv6,
/// scope) and returns it with its name, so that the server reuses a listener kept by systemd
/// instead of binding. `None` when there is none, and always for port 0 (a request for a new
/// port). The listener keeps its flags (blocking as stored).
pub fn take_tcp_listener(
    fds: &mut Vec<(String, OwnedFd)>,
    addr: SocketAddr,
) -> Option<(String, TcpListener)> {
    if addr.port() == 0 {
        return None;
    }
    let i = fds
        .iter()
        .position(|(_, fd)| tcp_listener_addr(fd.as_fd()).is_some_and(|bound| same_address(bound, addr)))?;
    let (name, fd) = fds.remove(i);
    Some((name, TcpListener::from(fd)))
}

fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    match (a, b) {
        (SocketAddr::V4(a), SocketAddr::V4(b)) => a.ip() == b.ip() && a.port() == b.port(),
        (SocketAddr::V6(a), SocketAddr::V6(b)) => {
            a.ip() == b.ip() && a.port() == b.port() && a.scope_id() == b.scope_id()
        }
        _ => false,
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;
    use std::net::{TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    /// A fake systemd notification socket in a temporary directory.
    struct FakeManager {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        sock: UnixDatagram,
    }

    impl FakeManager {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify");
            let sock = UnixDatagram::bind(&path).unwrap();
            sock.set_nonblocking(true).unwrap();
            Self { _dir: dir, path, sock }
        }

        fn addr(&self) -> &OsStr {
            self.path.as_os_str()
        }

        /// The next queued message and the descriptors it carried (panics if none is queued:
        /// every message was sent before this is called).
        fn recv(&self) -> (String, Vec<OwnedFd>) {
            recv_message(&self.sock)
        }

        fn assert_empty(&self) {
            let mut buf = [0u8; 16];
            let err = self.sock.recv(&mut buf).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::WouldBlock);
        }
    }

    fn recv_message(sock: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buf = vec![0u8; 4096];
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(253))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .expect("a queued notification");
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        buf.truncate(msg.bytes);
        (String::from_utf8(buf).unwrap(), fds)
    }

    fn monotonic_usec() -> i64 {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        now.tv_sec * 1_000_000 + now.tv_nsec / 1_000
    }

    #[test]
    fn states_reach_the_manager() {
        let m = FakeManager::new();
        notify_to(m.addr(), READY, &[]).unwrap();
        let (text, fds) = m.recv();
        assert_eq!((text.as_str(), fds.len()), ("READY=1", 0));
        notify_to(m.addr(), STOPPING, &[]).unwrap();
        assert_eq!(m.recv().0, "STOPPING=1");
        notify_to(m.addr(), &format!("{}\n{READY}", main_pid_message(4242)), &[]).unwrap();
        assert_eq!(m.recv().0, "MAINPID=4242\nREADY=1");

        let before = monotonic_usec();
        notify_to(m.addr(), &reloading_message(), &[]).unwrap();
        let after = monotonic_usec();
        let text = m.recv().0;
        let usec: i64 = text
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected message {text:?}"))
            .parse()
            .unwrap();
        assert!((before..=after).contains(&usec), "{before} <= {usec} <= {after}");

        notify_to(m.addr(), &status_message("upgrading\nMAINPID=1\r\0x"), &[]).unwrap();
        assert_eq!(m.recv().0, "STATUS=upgrading MAINPID=1  x");
        m.assert_empty();
    }

    #[test]
    fn abstract_socket_address() {
        let name = format!("xatastor-sd-test-{}-{}", std::process::id(), monotonic_usec());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), READY, &[]).unwrap();
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn bad_addresses_and_messages_are_refused() {
        let m = FakeManager::new();
        for addr in ["relative/path", "", "vsock:2:1234"] {
            let err = notify_to(OsStr::new(addr), READY, &[]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{addr:?}");
        }
        let missing = m.path.with_file_name("missing");
        assert!(notify_to(missing.as_os_str(), READY, &[]).is_err());
        assert_eq!(notify_to(m.addr(), "", &[]).unwrap_err().kind(), ErrorKind::InvalidInput);

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let too_many = vec![l.as_fd(); MAX_FDS_PER_MESSAGE + 1];
        let err = notify_to(m.addr(), &fdstore_message("x").unwrap(), &too_many).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        m.assert_empty();
    }

    #[test]
    fn stored_fds_are_the_same_sockets() {
        let m = FakeManager::new();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("[::1]:0").or_else(|_| TcpListener::bind("127.0.0.1:0")).unwrap();
        let message = fdstore_message("nvme-tcp").unwrap();
        notify_to(m.addr(), &message, &[a.as_fd(), b.as_fd()]).unwrap();
        let (text, fds) = m.recv();
        assert_eq!(text, "FDSTORE=1\nFDNAME=nvme-tcp");
        assert_eq!(fds.len(), 2);
        for (fd, original) in fds.iter().zip([&a, &b]) {
            let got = SocketAddr::try_from(rustix::net::getsockname(fd).unwrap()).unwrap();
            assert_eq!(got, original.local_addr().unwrap());
            assert_eq!(tcp_listener_addr(fd.as_fd()), Some(original.local_addr().unwrap()));
        }
        // The received descriptor is the same socket: it accepts a connection made to `a`.
        let client = TcpStream::connect(a.local_addr().unwrap()).unwrap();
        let received = TcpListener::from(fds.into_iter().next().unwrap());
        let (_conn, peer) = received.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }

    #[test]
    fn fdstore_messages_and_names() {
        assert_eq!(fdstore_message("listen-4420").unwrap(), "FDSTORE=1\nFDNAME=listen-4420");
        assert_eq!(fdstore_remove_message("listen-4420").unwrap(), "FDSTOREREMOVE=1\nFDNAME=listen-4420");
        let long = "x".repeat(MAX_FDNAME_LEN);
        assert!(fdstore_message(&long).is_ok());
        for bad in ["", "a:b", "a\nb", "tab\there", "é", &"x".repeat(MAX_FDNAME_LEN + 1)] {
            assert_eq!(fdstore_message(bad).unwrap_err().kind(), ErrorKind::InvalidInput, "{bad:?}");
            assert!(fdstore_remove_message(bad).is_err(), "{bad:?}");
        }
        // Refused before anything is sent (no NOTIFY_SOCKET needed to see it).
        assert!(store_fds("a:b", &[]).is_err());
        assert!(remove_stored_fds("").is_err());
    }

    #[test]
    fn barrier_returns_once_the_manager_closed_its_copy() {
        let m = FakeManager::new();
        let addr = m.addr().to_owned();
        let manager = std::thread::spawn(move || {
            m.sock.set_nonblocking(false).unwrap();
            let (text, fds) = recv_message(&m.sock);
            drop(fds);
            text
        });
        barrier_to(&addr, Duration::from_secs(600)).unwrap();
        assert_eq!(manager.join().unwrap(), "BARRIER=1");
    }

    #[test]
    fn barrier_times_out_while_the_message_is_unprocessed() {
        let m = FakeManager::new();
        let err = barrier_to(m.addr(), Duration::from_millis(20)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);
        let (text, fds) = m.recv();
        assert_eq!((text.as_str(), fds.len()), ("BARRIER=1", 1));
    }

    #[test]
    fn listen_fds_parsing() {
        let pid = 777;
        let parse = |p, n, names| parse_listen_fds(pid, p, n, names);
        assert!(parse(None, Some("2"), Some("a:b")).unwrap().is_empty());
        assert!(parse(Some("778"), Some("2"), Some("a:b")).unwrap().is_empty());
        assert!(parse(Some("777"), None, None).unwrap().is_empty());
        assert!(parse(Some("777"), Some("0"), None).unwrap().is_empty());
        assert_eq!(
            parse(Some("777"), Some("3"), Some("nvme:admin:nvme")).unwrap(),
            vec![("nvme".to_owned(), 3), ("admin".to_owned(), 4), ("nvme".to_owned(), 5)]
        );
        assert_eq!(
            parse(Some("777"), Some("2"), None).unwrap(),
            vec![("unknown".to_owned(), 3), ("unknown".to_owned(), 4)]
        );
        assert_eq!(parse(Some("777"), Some("1"), Some("")).unwrap(), vec![(String::new(), 3)]);
        for (p, n, names) in [
            (Some("x"), Some("1"), None),
            (Some("-1"), Some("1"), None),
            (Some("777"), Some("one"), None),
            (Some("777"), Some("-1"), None),
            (Some("777"), Some("2"), Some("a")),
            (Some("777"), Some("1"), Some("a:b")),
            (Some("777"), Some("0"), Some("a")),
            (Some("777"), Some("65537"), None),
            (Some("777"), Some("99999999999999999999999"), None),
        ] {
            let err = parse(p, n, names).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{p:?} {n:?} {names:?}");
        }
    }

    #[test]
    fn tcp_listener_detection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(tcp_listener_addr(l.as_fd()), Some(addr));
        let client = TcpStream::connect(addr).unwrap();
        assert_eq!(tcp_listener_addr(client.as_fd()), None, "a connected stream");
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(tcp_listener_addr(udp.as_fd()), None, "UDP");
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("s")).unwrap();
        assert_eq!(tcp_listener_addr(unix.as_fd()), None, "a Unix listener");
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(tcp_listener_addr(file.as_fd()), None, "not a socket");
        // Bound but not listening.
        let bound = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            SocketType::STREAM,
            Some(rustix::net::ipproto::TCP),
        )
        .unwrap();
        rustix::net::bind(&bound, &"127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
        assert_eq!(tcp_listener_addr(bound.as_fd()), None, "bound, not listening");
    }

    #[test]
    fn take_tcp_listener_picks_the_matching_one() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut fds = vec![
            ("other".to_owned(), OwnedFd::from(file)),
            ("a".to_owned(), OwnedFd::from(a)),
            ("b".to_owned(), OwnedFd::from(b)),
        ];
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(take_tcp_listener(&mut fds, free).is_none());
        let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(take_tcp_listener(&mut fds, any_port).is_none());
        let other_ip = SocketAddr::new("127.0.0.2".parse().unwrap(), addr_b.port());
        assert!(take_tcp_listener(&mut fds, other_ip).is_none());
        assert_eq!(fds.len(), 3);

        let (name, listener) = take_tcp_listener(&mut fds, addr_b).unwrap();
        assert_eq!((name.as_str(), listener.local_addr().unwrap()), ("b", addr_b));
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["other", "a"]);
        assert!(take_tcp_listener(&mut fds, addr_b).is_none(), "taken once");
        assert_eq!(take_tcp_listener(&mut fds, addr_a).unwrap().0, "a");
    }

    const CHILD_TEST: &str = "systemd::tests::listen_fds_child";
    const CHILD_PREFIX: &str = "SDTEST ";

    /// Runs this test binary's [`listen_fds_child`] in a child process as systemd would start
    /// it: `a` and `b` at fds 3 and 4, `LISTEN_PID` set to the child's pid (`sh` execs in place)
    /// unless `listen_pid` overrides it, and `env`. Returns the child's report lines.
    fn run_child(
        a: &TcpListener,
        b: &TcpListener,
        listen_pid: Option<&str>,
        env: &[(&str, &OsStr)],
    ) -> Vec<String> {
        // Copies above fd 10, so that moving them to 3 and 4 in the child cannot overwrite each
        // other; the copies are close-on-exec, the moved ones are not.
        let a = rustix::io::fcntl_dupfd_cloexec(a, 10).unwrap();
        let b = rustix::io::fcntl_dupfd_cloexec(b, 10).unwrap();
        let (raw_a, raw_b) = (a.as_raw_fd(), b.as_raw_fd());
        let pid = listen_pid.map_or("$$".to_owned(), str::to_owned);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("LISTEN_PID={pid} exec \"$0\" \"$@\""))
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--ignored", "--nocapture", "--test-threads=1"])
            .env("XATASTOR_SYSTEMD_CHILD", "1")
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "first:second")
            .env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: the closure runs in the forked child before exec; it only calls dup2, which
        // is async-signal-safe, and builds an io::Error from errno, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(raw_a, 3), (raw_b, 4)] {
                    // SAFETY: dup2 on descriptors this process holds; it touches no memory.
                    if libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<String> = stdout
            .lines()
            // libtest writes "test <name> ... " without a line break before the test's output.
            .filter_map(|l| l.split_once(CHILD_PREFIX).map(|(_, report)| report.to_owned()))
            .collect();
        assert!(lines.iter().any(|l| l == "done"), "child did not report: {stdout}");
        lines
    }

    #[test]
    fn listen_fds_end_to_end_in_a_child_process() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let m = FakeManager::new();
        let lines = run_child(&a, &b, None, &[("NOTIFY_SOCKET", m.addr())]);
        let expected = [
            format!("fd first {} cloexec=true", a.local_addr().unwrap()),
            format!("fd second {} cloexec=true", b.local_addr().unwrap()),
            "env cleared=true".to_owned(),
            "second take=0".to_owned(),
            "notify=true".to_owned(),
            "done".to_owned(),
        ];
        assert_eq!(lines, expected);
        assert_eq!(m.recv().0, "READY=1");
        m.assert_empty();
    }

    #[test]
    fn listen_fds_for_another_process_are_not_taken() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let lines = run_child(&a, &b, Some("1"), &[]);
        let expected = ["env cleared=true", "second take=0", "notify=false", "done"];
        assert_eq!(lines, expected);
    }

    /// The child side of the end-to-end tests (run by them in a child process; fails when run
    /// by hand, without the environment they set up).
    #[test]
    #[ignore = "run in a child process by listen_fds_end_to_end_in_a_child_process"]
    fn listen_fds_child() {
        assert_eq!(std::env::var("XATASTOR_SYSTEMD_CHILD").as_deref(), Ok("1"));
        let fds = take_listen_fds().unwrap();
        for (name, fd) in &fds {
            let addr = tcp_listener_addr(fd.as_fd()).map_or("none".to_owned(), |a| a.to_string());
            let cloexec = fcntl_getfd(fd).unwrap().contains(FdFlags::CLOEXEC);
            println!("{CHILD_PREFIX}fd {name} {addr} cloexec={cloexec}");
        }
        let cleared =
            ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"].iter().all(|k| std::env::var_os(k).is_none());
        println!("{CHILD_PREFIX}env cleared={cleared}");
        println!("{CHILD_PREFIX}second take={}", take_listen_fds().unwrap().len());
        println!("{CHILD_PREFIX}notify={}", notify_ready().unwrap());
        println!("{CHILD_PREFIX}done");
    }
}
