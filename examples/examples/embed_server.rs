//! The smallest embedding of the Xatastor server: a 1 GiB thin in-memory volume (or a file, if a path
//! is given) served over NVMe/TCP on 127.0.0.1:4420 by the thread-per-core io_uring server.
//!
//! ```sh
//! cargo run --release -p xatastor-examples --example embed_server [-- /path/to/volume.img]
//! nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-01.io.xatastor:embedded
//! ```

use std::sync::Arc;

use nvmeof_target::{
    BlockBackend, FileBackend, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target,
};
use xatastor_core::{Server, ServerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nqn = "nqn.2026-01.io.xatastor:embedded";
    let backend: Arc<dyn BlockBackend> = match std::env::args().nth(1) {
        Some(path) => Arc::new(FileBackend::open(path, 512)?),
        None => Arc::new(MemoryBackend::new(1 << 30, 512)),
    };
    let target = Target::new(Default::default());
    // Any host may connect: fine on loopback; list host NQNs in `allowed_hosts` otherwise.
    target.add_subsystem(SubsystemConfig {
        access: HostAccess::AllowAny,
        ..SubsystemConfig::new(nqn, "EMBED1")
    })?;
    target.add_namespace(nqn, NamespaceConfig::derived(nqn, 1, backend))?;
    let server = Server::start(target, ServerConfig::new("127.0.0.1:4420".parse()?))?;
    println!("serving {nqn} on {}; Ctrl-C to stop", server.local_addr());
    loop {
        std::thread::park();
    }
}
