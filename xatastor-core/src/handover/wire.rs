//! Framed messages with file descriptors over a Unix stream socket.
//!
//! ```text
//!   header (24 bytes, little-endian)                      then the body, then one "fd batch" per
//!   ┌────────┬─────────┬───────┬──────────┬──────────┬──────────┐ 253 descriptors (SCM_MAX_FD):
//!   │ magic  │ version │ flags │ body_len │ fd_count │ reserved │   ┌──────┬───────────────────┐
//!   │ "XSHO" │   u16   │  u16  │   u64    │   u32    │  u32 = 0 │   │ 0xFD │ SCM_RIGHTS: ≤ 253 │
//!   └────────┴─────────┴───────┴──────────┴──────────┴──────────┘   └──────┴───────────────────┘
//!                                                                    one sendmsg each
//! ```
//!
//! The descriptors ride on one-byte markers, each sent with its own `sendmsg`: on a stream socket the
//! kernel attaches a message's descriptors to the bytes of that `sendmsg`, and a plain `read` of those
//! bytes would discard them. So the receiver reads exactly the header and exactly the body with plain
//! reads, and each marker with a one-byte `recvmsg` that carries its batch — never reading past the
//! boundary it expects. Every batch but the last is full, so both sides know each batch's size.
//!
//! An error in the middle of a message (a refused header, a timeout, the peer gone) leaves the stream
//! at an unknown place: the channel is then broken and every later call fails. Descriptors received
//! before the error are closed.

// The upgrade path that uses the channel is being built on top of it.

use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// First bytes of every message.
const MAGIC: [u8; 4] = *b"XSHO";
/// Version of the framing.
const VERSION: u16 = 1;
/// Header length in bytes.
const HEADER_LEN: usize = 24;
/// Most descriptors the kernel accepts in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_BATCH: usize = 253;
/// The byte each batch of descriptors rides on.
const BATCH_MARKER: u8 = 0xFD;
/// Control buffer space for one full batch.
const BATCH_CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_BATCH));

/// One end of a handover channel: sends and receives messages made of a body and any number of file
/// descriptors (see the module docs for the framing).
#[derive(Debug)]
pub(crate) struct Channel {
    stream: UnixStream,
    /// Why the channel cannot be used any more (an error left the stream in the middle of a message).
    broken: Option<String>,
}

/// A fixed-size message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    body_len: u64,
    fd_count: u32,
}

impl Header {
    fn encode(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let fields: [&[u8]; 6] = [
            &MAGIC,
            &VERSION.to_le_bytes(),
            &0u16.to_le_bytes(),
            &self.body_len.to_le_bytes(),
            &self.fd_count.to_le_bytes(),
            &0u32.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            if let Some(dst) = out.get_mut(at..at + f.len()) {
                dst.copy_from_slice(f);
            }
            at += f.len();
        }
        out
    }

    fn decode(b: &[u8; HEADER_LEN]) -> io::Result<Self> {
        let (magic, rest) = b.split_at(4);
        if magic != MAGIC {
            return Err(invalid(format!(
                "bad magic {magic:02x?} (expected {MAGIC:02x?}): not a handover peer"
            )));
        }
        let (version, rest) = rest.split_at(2);
        let (flags, rest) = rest.split_at(2);
        let (body_len, rest) = rest.split_at(8);
        let (fd_count, reserved) = rest.split_at(4);
        let version = u16::from_le_bytes(version.try_into().map_err(|_| invalid("short header"))?);
        if version != VERSION {
            return Err(invalid(format!(
                "framing version {version} is not supported (this build speaks {VERSION})"
            )));
        }
        if flags != [0, 0] || reserved != [0, 0, 0, 0] {
            return Err(invalid("header has unknown flags or a non-zero reserved field"));
        }
        Ok(Self {
            body_len: u64::from_le_bytes(body_len.try_into().map_err(|_| invalid("short header"))?),
            fd_count: u32::from_le_bytes(fd_count.try_into().map_err(|_| invalid("short header"))?),
        })
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("handover peer closed the channel {what}"))
}

/// A socket timeout shows as `EAGAIN`; say what it is.
fn timeout_is_timeout(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "handover channel timed out")
    } else {
        e
    }
}

impl Channel {
    /// A channel over a connected Unix stream socket.
    pub(crate) fn new(stream: UnixStream) -> Self {
        Self { stream, broken: None }
    }

    /// Sets the read and write timeouts (`None`: wait forever). A send or receive that times out
    /// fails with [`io::ErrorKind::TimedOut`] and breaks the channel.
    pub(crate) fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)?;
        self.stream.set_write_timeout(t)
    }

    /// Sends one message: `body` plus `fds` (any number; they travel in batches of at most
    /// [`MAX_FDS_PER_BATCH`]). The descriptors stay open here; the receiver gets its own.
    pub(crate) fn send(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.check()?;
        let r = self.send_inner(body, fds);
        self.note(r)
    }

    /// Receives one message. Refuses ([`io::ErrorKind::InvalidData`]) a body over `max_body` bytes,
    /// more than `max_fds` descriptors, a header that is not this framing, descriptors lost on the way
    /// (truncated control data, e.g. at the open-file limit) and fewer or more descriptors than
    /// announced; the peer closing in the middle of a message (or before one) is
    /// [`io::ErrorKind::UnexpectedEof`]. The descriptors received have `FD_CLOEXEC` set.
    pub(crate) fn recv(&mut self, max_body: usize, max_fds: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.check()?;
        let r = self.recv_inner(max_body, max_fds);
        self.note(r)
    }

    fn check(&self) -> io::Result<()> {
        match &self.broken {
            Some(why) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("handover channel is unusable after an earlier error: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Marks the channel broken if `r` is an error (the stream is somewhere inside a message).
    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn send_inner(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let header = Header {
            body_len: u64::try_from(body.len()).map_err(|_| invalid("body too long"))?,
            fd_count: u32::try_from(fds.len()).map_err(|_| invalid("too many descriptors"))?,
        };
        self.send_all(&header.encode())?;
        self.send_all(body)?;
        let mut space = [MaybeUninit::<u8>::uninit(); BATCH_CMSG_SPACE];
        for batch in fds.chunks(MAX_FDS_PER_BATCH) {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(batch)) {
                return Err(io::Error::other("descriptor batch does not fit its control buffer"));
            }
            let marker = [BATCH_MARKER];
            loop {
                match sendmsg(&self.stream, &[io::IoSlice::new(&marker)], &mut control, SendFlags::NOSIGNAL) {
                    // The descriptors went with the byte (a stream socket takes a one-byte message
                    // whole, or blocks).
                    Ok(1) => break,
                    Ok(n) => {
                        return Err(io::Error::other(format!("sendmsg of a batch marker sent {n} bytes")))
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(timeout_is_timeout(e.into())),
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf` (continuing short writes, retrying interrupted ones).
    fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match rustix::net::send(&self.stream, buf, SendFlags::NOSIGNAL) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "handover channel took no bytes"))
                }
                Ok(n) => buf = buf.get(n..).unwrap_or_default(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(timeout_is_timeout(e.into())),
            }
        }
        Ok(())
    }

    /// Fills `buf` with plain reads (never past its end, so never into a batch marker).
    fn read_exact(&self, buf: &mut [u8], what: &str) -> io::Result<()> {
        let mut at = 0;
        while at < buf.len() {
            let Some(rest) = buf.get_mut(at..) else { break };
            match (&self.stream).read(rest) {
                Ok(0) => return Err(eof(what)),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timeout_is_timeout(e)),
            }
        }
        Ok(())
    }

    fn recv_inner(&mut self, max_body: usize, max_fds: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut hb = [0u8; HEADER_LEN];
        // The first byte apart: the peer closing between messages is told apart from mid-message.
        match self.read_exact(hb.get_mut(..1).unwrap_or_default(), "") {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(eof("(no message was being sent)"));
            }
            r => r?,
        }
        self.read_exact(hb.get_mut(1..).unwrap_or_default(), "in the middle of a message header")?;
        let header = Header::decode(&hb)?;
        let body_len = usize::try_from(header.body_len).unwrap_or(usize::MAX);
        if body_len > max_body {
            return Err(invalid(format!(
                "handover message body of {} bytes is over the limit of {max_body}",
                header.body_len
            )));
        }
        let fd_count = usize::try_from(header.fd_count).unwrap_or(usize::MAX);
        if fd_count > max_fds {
            return Err(invalid(format!(
                "handover message carries {fd_count} descriptors, over the limit of {max_fds}"
            )));
        }
        let mut body = vec![0u8; body_len];
        self.read_exact(&mut body, "in the middle of a message body")?;
        let mut fds = Vec::with_capacity(fd_count);
        let mut space = [MaybeUninit::<u8>::uninit(); BATCH_CMSG_SPACE];
        while fds.len() < fd_count {
            let expect = (fd_count - fds.len()).min(MAX_FDS_PER_BATCH);
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut marker = [0u8; 1];
            let msg = loop {
                match recvmsg(
                    &self.stream,
                    &mut [io::IoSliceMut::new(&mut marker)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                ) {
                    Ok(m) => break m,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(timeout_is_timeout(e.into())),
                }
            };
            if msg.bytes == 0 {
                return Err(eof(&format!("after {} of {fd_count} descriptors", fds.len())));
            }
            let before = fds.len();
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(got) = m {
                    fds.extend(got);
                }
            }
            let got = fds.len() - before;
            if msg.flags.contains(ReturnFlags::CTRUNC) {
                return Err(invalid(format!(
                    "descriptors were lost on the way (control data truncated after {got}): \
                     is the open-file limit reached?"
                )));
            }
            if marker != [BATCH_MARKER] {
                return Err(invalid(format!("expected a descriptor batch marker, got byte {marker:02x?}")));
            }
            if got != expect {
                return Err(invalid(format!(
                    "a descriptor batch brought {got} descriptors where {expect} were announced"
                )));
            }
        }
        Ok((body, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn pair() -> (Channel, Channel) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), Channel::new(b))
    }

    fn ino(fd: impl AsFd) -> (u64, u64) {
        let st = rustix::fs::fstat(fd).unwrap();
        (st.st_dev, st.st_ino)
    }

    #[test]
    fn message_without_fds_round_trips() {
        let (mut a, mut b) = pair();
        a.send(b"hello", &[]).unwrap();
        a.send(b"", &[]).unwrap();
        let (body, fds) = b.recv(100, 0).unwrap();
        assert_eq!(body, b"hello");
        assert!(fds.is_empty());
        let (body, fds) = b.recv(0, 0).unwrap();
        assert!(body.is_empty() && fds.is_empty());
    }

    #[test]
    fn a_thousand_fds_arrive_in_order_and_refer_to_the_same_sockets() {
        const N: usize = 1000;
        let (mut a, mut b) = pair();
        // N socket pairs: the first end of each is sent, the second kept.
        let pairs: Vec<(UnixStream, UnixStream)> = (0..N).map(|_| UnixStream::pair().unwrap()).collect();
        let ids: Vec<(u64, u64)> = pairs.iter().map(|(s, _)| ino(s)).collect();
        let receiver = std::thread::spawn(move || b.recv(16, N).unwrap());
        {
            let borrowed: Vec<BorrowedFd<'_>> = pairs.iter().map(|(s, _)| s.as_fd()).collect();
            a.send(b"fds", &borrowed).unwrap();
        }
        let kept: Vec<UnixStream> = pairs.into_iter().map(|(_, k)| k).collect(); // sent ends closed here
        let (body, fds) = receiver.join().unwrap();
        assert_eq!(body, b"fds");
        assert_eq!(fds.len(), N);
        for (i, fd) in fds.into_iter().enumerate() {
            assert_eq!(ino(&fd), ids[i], "descriptor {i} is the socket sent at {i}");
            let mut s = UnixStream::from(fd);
            s.write_all(&u32::try_from(i).unwrap().to_le_bytes()).unwrap();
            let mut got = [0u8; 4];
            (&kept[i]).read_exact(&mut got).unwrap();
            assert_eq!(u32::from_le_bytes(got) as usize, i);
        }
    }

    #[test]
    fn received_fds_are_close_on_exec() {
        let (mut a, mut b) = pair();
        let (s, _k) = UnixStream::pair().unwrap();
        // The sent descriptor itself without FD_CLOEXEC: the flag comes from the receiving side.
        rustix::io::fcntl_setfd(&s, rustix::io::FdFlags::empty()).unwrap();
        a.send(b"x", &[s.as_fd()]).unwrap();
        let (_, fds) = b.recv(1, 1).unwrap();
        assert_eq!(fds.len(), 1);
        assert!(rustix::io::fcntl_getfd(&fds[0]).unwrap().contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn ten_mib_body_and_messages_back_to_back() {
        let (mut a, mut b) = pair();
        let big: Vec<u8> = (0..10u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let expected = big.clone();
        let (s1, _k1) = UnixStream::pair().unwrap();
        let s1_id = ino(&s1);
        let sender = std::thread::spawn(move || {
            a.send(&big, &[]).unwrap();
            a.send(b"second", &[s1.as_fd()]).unwrap();
            a.send(b"third", &[]).unwrap();
            let many: Vec<UnixStream> = (0..300).map(|_| UnixStream::pair().unwrap().0).collect();
            let borrowed: Vec<BorrowedFd<'_>> = many.iter().map(|s| s.as_fd()).collect();
            a.send(b"fourth", &borrowed).unwrap();
            a.send(b"fifth", &borrowed[..MAX_FDS_PER_BATCH]).unwrap();
            many.iter().map(ino).collect::<Vec<_>>()
        });
        let (body, fds) = b.recv(10 << 20, 0).unwrap();
        assert!(fds.is_empty());
        assert!(body == expected, "10 MiB body arrives intact");
        let (body, fds) = b.recv(100, 1).unwrap();
        assert_eq!((body.as_slice(), fds.len()), (&b"second"[..], 1));
        assert_eq!(ino(&fds[0]), s1_id);
        let (body, fds) = b.recv(100, 0).unwrap();
        assert_eq!((body.as_slice(), fds.len()), (&b"third"[..], 0));
        let (body, fourth) = b.recv(100, 300).unwrap();
        assert_eq!((body.as_slice(), fourth.len()), (&b"fourth"[..], 300));
        let (body, fifth) = b.recv(100, 300).unwrap();
        assert_eq!((body.as_slice(), fifth.len()), (&b"fifth"[..], MAX_FDS_PER_BATCH));
        let ids = sender.join().unwrap();
        assert_eq!(fourth.iter().map(ino).collect::<Vec<_>>(), ids);
        assert_eq!(fifth.iter().map(ino).collect::<Vec<_>>(), ids[..MAX_FDS_PER_BATCH]);
    }

    #[test]
    fn oversized_body_and_too_many_fds_are_refused_and_break_the_channel() {
        let (mut a, mut b) = pair();
        a.send(&[7u8; 1000], &[]).unwrap();
        let e = b.recv(999, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        let e = b.recv(10_000, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "no reading in the middle of a message");

        let (mut a, mut b) = pair();
        let socks: Vec<UnixStream> = (0..5).map(|_| UnixStream::pair().unwrap().0).collect();
        let borrowed: Vec<BorrowedFd<'_>> = socks.iter().map(|s| s.as_fd()).collect();
        a.send(b"x", &borrowed).unwrap();
        let e = b.recv(10, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("5 descriptors"), "{e}");
        assert!(b.recv(10, 10).is_err());
    }

    #[test]
    fn bad_header_is_refused() {
        let mut version_9 = Header { body_len: 0, fd_count: 0 }.encode();
        version_9[4] = 9;
        let mut flags = Header { body_len: 0, fd_count: 0 }.encode();
        flags[6] = 1;
        let cases: [(&[u8], &str); 3] =
            [(b"GET / HTTP/1.1\r\nHost: x\r\n", "magic"), (&version_9, "version 9"), (&flags, "flags")];
        for (bytes, says) in cases {
            let (a, mut b) = pair();
            (&a.stream).write_all(bytes).unwrap();
            let e = b.recv(1 << 20, 10).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn peer_closing_mid_message_is_unexpected_eof() {
        let header = |body_len, fd_count| Header { body_len, fd_count }.encode();
        // Closed before any message; inside the header; inside the body; before the descriptors.
        let cases: [(&[u8], &str); 4] = [
            (&[], "no message"),
            (&header(10, 0)[..7], "header"),
            (&[&header(10, 0)[..], b"abc"].concat(), "body"),
            (&[&header(2, 3)[..], b"ab"].concat(), "after 0 of 3"),
        ];
        for (bytes, says) in cases {
            let (a, mut b) = pair();
            (&a.stream).write_all(bytes).unwrap();
            drop(a);
            let e = b.recv(100, 100).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{says}: {e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn fewer_fds_than_announced_or_a_wrong_marker_is_refused() {
        let (s, _k) = UnixStream::pair().unwrap();
        for (marker, nfds, says) in [(BATCH_MARKER, 1, "brought 1 descriptors where 2"), (b'x', 2, "marker")]
        {
            let (a, mut b) = pair();
            (&a.stream).write_all(&Header { body_len: 0, fd_count: 2 }.encode()).unwrap();
            let fds = [s.as_fd(), s.as_fd()];
            let mut space = [MaybeUninit::<u8>::uninit(); BATCH_CMSG_SPACE];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&fds[..nfds])));
            sendmsg(&a.stream, &[io::IoSlice::new(&[marker])], &mut control, SendFlags::empty()).unwrap();
            let e = b.recv(0, 2).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn timeout_breaks_the_channel() {
        let (_a, mut b) = pair();
        b.set_timeout(Some(Duration::from_millis(20))).unwrap();
        let e = b.recv(10, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(b.recv(10, 10).unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
