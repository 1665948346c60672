//! Target-wide limits and per-connection transport parameters.

use std::net::SocketAddr;
use std::time::Duration;

use nvmeof_proto::Digests;

use crate::auth::AuthConfig;

/// Limits and identity of a target. The defaults suit a Linux host.
///
/// Outside this crate, start from [`TargetConfig::default`] and set fields (fields may be added).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetConfig {
    /// Largest queue a host may create, in entries (CAP.MQES + 1); 2..=65536. Bounds the commands in
    /// flight per connection.
    pub max_queue_entries: u32,
    /// Most I/O queues per controller (granted through Set Features Number of Queues).
    pub max_io_queues: u16,
    /// In-capsule data accepted on every queue, in bytes (IOCCSZ = 4 + this / 16). At least 8192,
    /// because the Linux host sends Fabrics Connect data in the capsule.
    pub inline_data_size: u32,
    /// MAXH2CDATA announced in ICResp: largest data in one H2CData PDU, and the size of each R2T.
    pub maxh2cdata: u32,
    /// Largest data transfer of one command in bytes (MDTS), a power of two ≥ 4096.
    pub max_transfer_bytes: u32,
    /// Most R2Ts outstanding per command (also bounded by the host's MAXR2T + 1).
    pub max_r2t_per_command: u32,
    /// Bytes of command data (reads being sent and writes being received) a connection may hold at
    /// once; further commands wait. At least `max_transfer_bytes`.
    pub max_data_in_flight_per_connection: usize,
    /// Digests the target agrees to (a host's request for others is refused in ICResp).
    pub digests: Digests,
    /// Time a new connection has to send ICReq and Fabrics Connect.
    pub connect_timeout: Duration,
    /// NN: the largest namespace ID.
    pub max_namespaces: u32,
    /// Firmware revision (FR in Identify Controller; at most 8 ASCII characters).
    pub firmware_revision: String,
    /// Asynchronous Event Requests a controller keeps outstanding (AERL + 1).
    pub max_async_events: u8,
    /// In-band authentication (DH-HMAC-CHAP): what the target accepts and the time limit.
    pub auth: AuthConfig,
    /// Announce Traffic Based Keep Alive (CTRATT.TBKAS). A Linux host then skips the Keep Alive of
    /// a period in which a command completed, and checks every KATO/4 instead of KATO/2: a busy
    /// controller sends no keep-alives, but an idle one (the common case on a dense node) sends
    /// **twice as many**. Off by default. The keep-alive timer restarts on any command either way.
    pub traffic_based_keep_alive: bool,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            max_queue_entries: 1024,
            max_io_queues: 64,
            inline_data_size: 8192,
            maxh2cdata: 128 * 1024,
            max_transfer_bytes: 512 * 1024,
            max_r2t_per_command: 4,
            max_data_in_flight_per_connection: 8 * 1024 * 1024,
            digests: Digests::BOTH,
            connect_timeout: Duration::from_secs(10),
            max_namespaces: 1024,
            firmware_revision: env!("CARGO_PKG_VERSION").chars().take(8).collect(),
            max_async_events: 4,
            auth: AuthConfig::default(),
            traffic_based_keep_alive: false,
        }
    }
}

impl TargetConfig {
    /// The configuration with every value brought into the range the protocol and the engine allow.
    #[must_use]
    pub fn sanitized(mut self) -> Self {
        self.max_queue_entries = self.max_queue_entries.clamp(32, 65536);
        self.max_io_queues = self.max_io_queues.clamp(1, 0xfffe);
        self.inline_data_size = self.inline_data_size.clamp(8192, 1 << 20) / 16 * 16;
        self.maxh2cdata = self.maxh2cdata.clamp(4096, 1 << 24) / 4 * 4;
        self.max_transfer_bytes = self.max_transfer_bytes.clamp(4096, 1 << 24).next_power_of_two();
        if self.max_transfer_bytes > 1 << 24 {
            self.max_transfer_bytes = 1 << 24;
        }
        self.max_r2t_per_command = self.max_r2t_per_command.clamp(1, 256);
        self.max_data_in_flight_per_connection =
            self.max_data_in_flight_per_connection.max(self.max_transfer_bytes as usize);
        self.max_namespaces = self.max_namespaces.clamp(1, 0xffff_fffe);
        self.max_async_events = self.max_async_events.clamp(1, 16);
        self.auth.timeout = self.auth.timeout.clamp(Duration::from_millis(100), Duration::from_secs(600));
        self.firmware_revision =
            self.firmware_revision.chars().filter(char::is_ascii_graphic).take(8).collect();
        self
    }

    /// MDTS as Identify Controller encodes it: log2 of the transfer size in 4 KiB units.
    #[must_use]
    pub fn mdts(&self) -> u8 {
        (self.max_transfer_bytes / 4096).max(1).trailing_zeros() as u8
    }
}

/// Facts about one accepted TCP connection that the engine needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportParams {
    /// The address the host connected to: reported as TRADDR/TRSVCID in discovery log entries.
    pub local_addr: SocketAddr,
    /// The host's address (for logs).
    pub peer_addr: SocketAddr,
    /// Port ID reported in discovery log entries.
    pub port_id: u16,
}
