//! Model-based property test: random sequences of Read / Write / Write Zeroes / Deallocate / Flush with
//! random sizes, in-capsule and R2T paths, digests and R2T windows, against a `MemoryBackend`, compared
//! with a plain byte vector.

mod common;

use common::*;
use nvmeof_proto::nvme::nvm::DsmRange;
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::HostOptions;
use nvmeof_target::{MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use proptest::prelude::*;
use zerocopy::IntoBytes;

const BLOCKS: u64 = 2048; // 1 MiB of 512-byte blocks

#[derive(Clone, Debug)]
enum Op {
    Write { slba: u64, blocks: u32, fill: u8, fua: bool },
    Read { slba: u64, blocks: u32 },
    WriteZeroes { slba: u64, blocks: u32, deallocate: bool },
    Deallocate { ranges: Vec<(u64, u32)> },
    Flush,
}

fn extent() -> impl Strategy<Value = (u64, u32)> {
    (1u32..=256).prop_flat_map(|blocks| (0..=BLOCKS - u64::from(blocks), Just(blocks)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (extent(), any::<u8>(), any::<bool>())
            .prop_map(|((slba, blocks), fill, fua)| Op::Write { slba, blocks, fill, fua }),
        4 => extent().prop_map(|(slba, blocks)| Op::Read { slba, blocks }),
        1 => (extent(), any::<bool>())
            .prop_map(|((slba, blocks), deallocate)| Op::WriteZeroes { slba, blocks, deallocate }),
        1 => proptest::collection::vec(extent(), 1..4).prop_map(|ranges| Op::Deallocate { ranges }),
        1 => Just(Op::Flush),
    ]
}

fn pattern(slba: u64, blocks: u32, fill: u8) -> Vec<u8> {
    (0..blocks as usize * 512).map(|i| fill ^ ((slba as usize * 512 + i) % 253) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn io_matches_a_byte_vector(
        ops in proptest::collection::vec(op(), 1..40),
        inline_limit in prop_oneof![Just(0u32), Just(4096), Just(8128)],
        maxr2t in 0u32..4,
        maxh2cdata in prop_oneof![Just(4096u32), Just(16384), Just(131072)],
        header_digest in any::<bool>(),
        data_digest in any::<bool>(),
    ) {
        let now = Clock::new().0;
        let mut config = TargetConfig::default();
        config.maxh2cdata = maxh2cdata;
        let target = Target::new(config);
        let mut sc = SubsystemConfig::new(SUBNQN, "XS0001");
        sc.allowed_hosts.push(HOSTNQN.into());
        target.add_subsystem(sc).unwrap();
        let backend = std::sync::Arc::new(MemoryBackend::new(BLOCKS * 512, 512));
        target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 1, backend)).unwrap();
        let opts = HostOptions {
            digests: Digests { header: header_digest, data: data_digest },
            maxr2t,
            max_inline_data: inline_limit,
            ..HostOptions::default()
        };
        let mut admin = Link::new(&target, opts, now);
        let cntlid = bring_up_admin(&mut admin, SUBNQN, 0, now);
        prop_assert_eq!(set_features(&mut admin, 0x07, 0, now).status(), Status::SUCCESS);
        let mut io = Link::new(&target, opts, now);
        bring_up_io(&mut io, cntlid, 1, now);

        let mut model = vec![0u8; (BLOCKS * 512) as usize];
        for op in ops {
            match op {
                Op::Write { slba, blocks, fill, fua } => {
                    let data = pattern(slba, blocks, fill);
                    let c = io.command(rw_sqe(0x01, slba, blocks, fua), Some(Payload::from(data.clone())), 0, now);
                    prop_assert_eq!(c.status(), Status::SUCCESS);
                    let at = slba as usize * 512;
                    model[at..at + data.len()].copy_from_slice(&data);
                }
                Op::Read { slba, blocks } => {
                    let c = read(&mut io, slba, blocks, now);
                    prop_assert_eq!(c.status(), Status::SUCCESS);
                    let at = slba as usize * 512;
                    prop_assert!(c.data == model[at..at + blocks as usize * 512], "read {slba}+{blocks} differs");
                }
                Op::WriteZeroes { slba, blocks, deallocate } => {
                    let mut sqe = rw_sqe(0x08, slba, blocks, false);
                    sqe.cdw12.set((blocks - 1) | (u32::from(deallocate) << 25));
                    prop_assert_eq!(io.command(sqe, None, 0, now).status(), Status::SUCCESS);
                    let at = slba as usize * 512;
                    model[at..at + blocks as usize * 512].fill(0);
                }
                Op::Deallocate { ranges } => {
                    let mut buf = vec![0u8; 4096];
                    for (i, (slba, blocks)) in ranges.iter().enumerate() {
                        buf[i * 16..i * 16 + 16].copy_from_slice(DsmRange::new(*slba, *blocks).as_bytes());
                        let at = *slba as usize * 512;
                        model[at..at + *blocks as usize * 512].fill(0);
                    }
                    let mut sqe = Sqe::zeroed();
                    sqe.opcode = 0x09;
                    sqe.nsid.set(1);
                    sqe.cdw10.set(ranges.len() as u32 - 1);
                    sqe.cdw11.set(1 << 2);
                    prop_assert_eq!(io.command(sqe, Some(Payload::from(buf)), 0, now).status(), Status::SUCCESS);
                }
                Op::Flush => {
                    let mut sqe = Sqe::zeroed();
                    sqe.nsid.set(1);
                    prop_assert_eq!(io.command(sqe, None, 0, now).status(), Status::SUCCESS);
                }
            }
            prop_assert!(io.closed.is_none() && io.host_error.is_none());
        }
        // Everything read back at the end equals the model.
        for slba in (0..BLOCKS).step_by(256) {
            let c = read(&mut io, slba, 256, now);
            let at = slba as usize * 512;
            prop_assert!(c.data == model[at..at + 256 * 512]);
        }
    }
}
