//! NVMe and NVMe over Fabrics data structures a fabrics target and host exchange inside capsules and
//! data transfers: fixed little-endian layouts as `zerocopy` structs, read in place from received bytes.
//!
//! ```text
//!  CapsuleCmd ── Sqe (64 B) ── dptr: SglDescriptor ── opcode: admin / NVM / fabrics
//!                                   │                     └── fabrics: Connect (+ 1024 B data),
//!                                   │                         Property Get/Set, Disconnect,
//!                                   │                         Authentication Send/Receive (auth)
//!  CapsuleResp ─ Cqe (16 B) ── Status
//!  Data PDUs ─── Identify (controller, namespace, lists), log pages (incl. discovery log), features
//! ```

pub mod auth;
pub mod cqe;
pub mod discovery;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod nvm;
pub mod opcode;
pub mod registers;
pub mod sgl;
pub mod sqe;
pub mod status;

pub use cqe::{Cqe, CQE_LEN};
pub use sgl::{DataLocation, SglDescriptor};
pub use sqe::{Sqe, SQE_LEN};
pub use status::{Status, StatusCodeType};
