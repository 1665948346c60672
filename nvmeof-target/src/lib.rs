//! # nvmeof-target
//!
//! A runtime-agnostic (sans-I/O) NVMe over Fabrics target engine for the NVMe/TCP transport, and the
//! `BlockBackend` trait that puts any block device behind it.
//!
//! **Status: not yet implemented.** This crate currently holds only this description; the engine
//! arrives with the target-engine issue. It will hold:
//!
//! ```text
//!  driver (any runtime)                      nvmeof-target
//!  ───────────────────                       ─────────────────────────────────────────────
//!  bytes from socket ── handle_input(now) ──▶ Connection ──▶ Controller registry (shared)
//!  write vectored    ◀── poll_event: Transmit      │              └─ Subsystems / Namespaces
//!  backend I/O       ◀── poll_event: Io(token)     └─ BlockBackend (memory, file, fd-based, custom)
//!  complete_io(token) ─▶
//!  timers            ◀── poll_timeout / handle_timeout(now)
//! ```
//!
//! - per-connection state machines for the admin and I/O queues (ICReq/ICResp, Fabrics Connect,
//!   Property Get/Set, Identify, Get Log Page, features, keep-alive, asynchronous events);
//! - NVM command execution (Read, Write with FUA, Flush, Write Zeroes, Dataset Management) with
//!   in-capsule data and R2T/H2CData transfers, expressed as I/O requests the driver carries out;
//! - the discovery subsystem; subsystems and namespaces added, removed and resized at run time;
//! - `MemoryBackend` and `FileBackend`.
//!
//! The engine never touches a socket, a clock or a thread: the driver feeds it bytes and the current
//! time, and carries out what it asks for.
#![forbid(unsafe_code)]
