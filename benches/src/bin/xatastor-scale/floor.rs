//! `xatastor-scale --keep-alive-floor N,…`: the least CPU a node can spend per keep-alive on this
//! machine, to read the `--connected` figures against.
//!
//! A child process pinned like the target (`--target-cpu`) holds N TCP connections and does only
//! what the operating system needs per keep-alive: it learns from epoll (edge-triggered, looked at
//! once per `--admin-batch-window-ms`, as the node's quiet set does; 0: it waits in epoll and answers
//! each at once) which connections have input, `recv`s the 72-byte command and `send`s a 24-byte
//! response. No NVMe, no io_uring, no timers. This process sends the commands at the rate the
//! `--connected` bench's controllers would (N ÷ (KATO/2) per second, each connection at its own
//! random phase) and reads the responses. The figure is the child's CPU time over the hold divided
//! by the requests it answered.
//!
//! ```sh
//! cargo run --release -p xatastor-benches --bin xatastor-scale -- \
//!     --keep-alive-floor 16363 --kato-ms 800 --hold-secs 60 --target-cpu 0 --client-cpu 1
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::epoll;

use crate::connected::{pin, socket_from};

/// A command capsule's size on the wire (8-byte common header + 64-byte SQE).
const COMMAND: usize = 72;
/// A response capsule's size on the wire (8-byte common header + 16-byte CQE).
const RESPONSE: usize = 24;

/// What the floor run needs from the command line.
pub(crate) struct Options {
    pub(crate) counts: Vec<u64>,
    pub(crate) hold_secs: u64,
    pub(crate) kato_ms: u32,
    pub(crate) target_cpu: Option<usize>,
    pub(crate) client_cpu: Option<usize>,
    pub(crate) window_ms: u64,
}

/// The server side (a child process): accepts `connections`, then answers every command until its
/// stdin ends, and prints the number of commands it answered.
pub(crate) fn serve(connections: u64, cpu: Option<usize>, window: Duration) {
    if let Some(cpu) = cpu {
        pin(cpu);
    }
    let _ = xatastor_core::raise_open_file_limit();
    // A deep backlog: the client connects faster than a pinned, busy child may accept.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&any.into()).expect("bind");
    socket.listen(4096).expect("listen");
    let listener: TcpListener = socket.into();
    println!("ready {}", listener.local_addr().expect("address").port());
    std::io::stdout().flush().expect("stdout");
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
    let mut streams = Vec::with_capacity(connections as usize);
    while (streams.len() as u64) < connections {
        let (s, _) = listener.accept().expect("accept");
        s.set_nonblocking(true).expect("non-blocking");
        s.set_nodelay(true).expect("nodelay");
        let data = epoll::EventData::new_u64(streams.len() as u64);
        epoll::add(&ep, &s, data, epoll::EventFlags::IN | epoll::EventFlags::ET).expect("epoll add");
        streams.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    {
        let (stop, answered) = (stop.clone(), answered.clone());
        std::thread::spawn(move || {
            // One line from the parent: report; end of input: stop.
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
                println!("{}", answered.load(Ordering::Relaxed));
                let _ = std::io::stdout().flush();
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    let response = [0u8; RESPONSE];
    let mut buf = vec![0u8; 64 * 1024];
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let timeout =
        rustix::event::Timespec { tv_sec: 0, tv_nsec: if window.is_zero() { 100_000_000 } else { 0 } };
    while !stop.load(Ordering::Relaxed) {
        if !window.is_zero() {
            std::thread::sleep(window);
        }
        loop {
            events.clear();
            let n =
                epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&timeout)).unwrap_or(0);
            for ev in &events {
                let s = &streams[ev.data.u64() as usize];
                if let Ok((got, _)) = rustix::net::recv(s.as_fd(), &mut buf, rustix::net::RecvFlags::DONTWAIT)
                {
                    if got > 0 {
                        answered.fetch_add((got / COMMAND) as u64, Ordering::Relaxed);
                        let _ = rustix::net::send(s.as_fd(), &response, rustix::net::SendFlags::DONTWAIT);
                    }
                }
            }
            if n < 1024 {
                break;
            }
        }
    }
}

/// Runs the floor measurement for each count and prints a table.
#[allow(clippy::disallowed_methods)] // a benchmark client: it owns its clock
pub(crate) fn run(o: &Options) {
    if let Some(cpu) = o.client_cpu {
        pin(cpu);
    }
    println!(
        "{:>7} {:>9} {:>8} {:>9} {:>8} {:>7}",
        "conns", "window ms", "KA/s", "answered", "CPU %", "µs/KA"
    );
    for &n in &o.counts {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.args(["--serve-floor", &n.to_string(), "--admin-batch-window-ms", &o.window_ms.to_string()]);
        if let Some(cpu) = o.target_cpu {
            cmd.args(["--target-cpu", &cpu.to_string()]);
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start the server");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("server output");
        let port: u16 = line.strip_prefix("ready ").and_then(|p| p.trim().parse().ok()).expect("server port");
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut streams: Vec<TcpStream> = (0..n)
            .map(|i| {
                // A connect whose SYN was dropped (a full backlog) times out: try again.
                let s = (0..3).find_map(|_| socket_from(i, to).ok()).expect("connect (3 attempts)");
                s.set_nonblocking(true).expect("non-blocking");
                s
            })
            .collect();
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
        for (i, s) in streams.iter().enumerate() {
            epoll::add(&ep, s, epoll::EventData::new_u64(i as u64), epoll::EventFlags::IN)
                .expect("epoll add");
        }
        let period = Duration::from_millis(u64::from(o.kato_ms / 2).max(1));
        let start = Instant::now();
        let mut due: BinaryHeap<Reverse<(Instant, usize)>> =
            (0..streams.len()).map(|i| Reverse((start + period.mul_f64(fastrand::f64()), i))).collect();
        let command = [0u8; COMMAND];
        let mut sink = vec![0u8; 64 * 1024];
        let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
        let ms = rustix::event::Timespec { tv_sec: 0, tv_nsec: 1_000_000 };
        let pid = child.id();
        let cpu_ns = || super::cpu_ns_of(pid);
        let mut ask = |stdin: &mut std::process::ChildStdin| -> u64 {
            writeln!(stdin).and_then(|()| stdin.flush()).expect("ask the server");
            let mut line = String::new();
            stdout.read_line(&mut line).expect("server output");
            line.trim().parse().unwrap_or(0)
        };
        // The first period brings every connection's phase in; then the hold is measured.
        let warm = start + period;
        let end = warm + Duration::from_secs(o.hold_secs);
        let mut measure: Option<(u64, u64)> = None;
        loop {
            let now = Instant::now();
            if measure.is_none() && now >= warm {
                measure = Some((cpu_ns(), ask(&mut stdin)));
            }
            if now >= end {
                break;
            }
            while let Some(&Reverse((t, i))) = due.peek() {
                if t > now {
                    break;
                }
                due.pop();
                let _ = streams[i].write_all(&command);
                due.push(Reverse((t + period, i)));
            }
            events.clear();
            let _ = epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&ms));
            for ev in &events {
                let s = &mut streams[ev.data.u64() as usize];
                while let Ok(k) = s.read(&mut sink) {
                    if k == 0 {
                        break;
                    }
                }
            }
        }
        let (cpu0, ans0) = measure.unwrap_or((0, 0));
        let answered = ask(&mut stdin).saturating_sub(ans0);
        let cpu = cpu_ns().saturating_sub(cpu0);
        drop(stdin);
        let _ = child.wait();
        streams.clear();
        let secs = o.hold_secs.max(1) as f64;
        println!(
            "{:>7} {:>9} {:>8.0} {:>9} {:>8.2} {:>7.2}",
            n,
            o.window_ms,
            answered as f64 / secs,
            answered,
            cpu as f64 / 1e9 / secs * 100.0,
            cpu as f64 / 1e3 / answered.max(1) as f64
        );
    }
}
