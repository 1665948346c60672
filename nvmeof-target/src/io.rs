//! NVM commands on I/O queues: Read, Write, Flush, Write Zeroes, Dataset Management.

use std::sync::Arc;
use std::time::Instant;

use nvmeof_proto::nvme::nvm::{parse_dsm_ranges, DsmCommand, RwCommand, WriteZeroesCommand};
use nvmeof_proto::nvme::opcode::{FabricsCommandType, IoOpcode, FABRICS_OPCODE};
use nvmeof_proto::nvme::{DataLocation, Sqe, Status};
use nvmeof_proto::{CapsuleCmd, Payload};
use smallvec::SmallVec;

use crate::backend::{ByteRange, IoOp};
use crate::connection::{AfterData, Connection, Queued};
use crate::subsystem::{Namespace, OpClass};

impl Connection {
    pub(crate) fn handle_io(&mut self, cmd: CapsuleCmd, now: Instant) {
        let cid = cmd.sqe.cid.get();
        if cmd.sqe.opcode == FABRICS_OPCODE {
            match FabricsCommandType::from_u8(cmd.sqe.fctype()) {
                Some(FabricsCommandType::Disconnect) => {
                    self.respond(cid, Status::SUCCESS, 0);
                    self.close(crate::CloseReason::Disconnected);
                }
                _ => self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0),
            }
            return;
        }
        let mut cmd = cmd;
        let nsid = cmd.sqe.nsid.get();
        // The namespace is looked up once and its reference moves into the command (no further
        // reference counting on the I/O path). A controller whose namespaces were taken away (a
        // prompt detach) sees none.
        let ns = match self.queue.as_ref().map(|q| &q.ctrl) {
            Some(ctrl) if ctrl.subsystem.is_some() => ctrl.visible_namespace(nsid),
            _ => {
                self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0);
                return;
            }
        };
        let Some(ns) = ns else {
            self.respond(cid, Status::INVALID_NAMESPACE.with_dnr(), 0);
            return;
        };
        let mut ns = Some(ns);
        let result = match IoOpcode::from_u8(cmd.sqe.opcode) {
            Some(IoOpcode::Read) => self.read(&cmd, &mut ns, now),
            Some(IoOpcode::Write) => self.write(&mut cmd, &mut ns, now),
            Some(IoOpcode::Flush) => {
                self.register(cid, ns.take(), OpClass::Other, now);
                self.submit_io(cid, IoOp::Flush, None);
                Ok(())
            }
            Some(IoOpcode::WriteZeroes) => self.write_zeroes(&cmd, &mut ns, now),
            Some(IoOpcode::DatasetManagement) => self.dataset_management(&mut cmd, &mut ns, now),
            _ => Err(Status::INVALID_OPCODE.with_dnr()),
        };
        if let Err(status) = result {
            // Errors are found before the namespace moved into the command.
            if let Some(ns) = &ns {
                ns.stats().record(OpClass::Other, 0, false, std::time::Duration::ZERO);
            }
            self.respond(cid, status, 0);
        }
    }

    /// Tells the backends which ranges the complete read and write commands at the front of
    /// `input` (received, not yet handed in) will touch ([`crate::BlockBackend::prefetch`]), so that
    /// a backend can start its lookups for the whole batch at once. A hint only: nothing is checked
    /// or consumed; the commands are handled as usual when `input` is handed in. Does nothing except
    /// on a live I/O queue; looks at 64 commands at most.
    pub fn prefetch_input(&self, input: &[u8]) {
        use zerocopy::FromBytes;
        const CH_LEN: usize = 8;
        const CAPSULE: u8 = 0x04;
        let Some(q) = self.queue.as_ref().filter(|q| q.qid != 0) else { return };
        let Some(subsys) = q.ctrl.subsystem.as_ref() else { return };
        let namespaces = subsys.namespaces();
        let mut batch: SmallVec<[ByteRange; 32]> = SmallVec::new();
        let mut batch_ns: Option<&Arc<Namespace>> = None;
        let mut at = 0usize;
        for _ in 0..64 {
            let Some(ch) = input.get(at..at + CH_LEN) else { break };
            let plen = ch.get(4..8).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes) as usize;
            if plen < CH_LEN || input.len() - at < plen {
                break;
            }
            let sqe = input.get(at + CH_LEN..).and_then(|b| Sqe::read_from_prefix(b).ok()).map(|(s, _)| s);
            at += plen;
            let Some(sqe) = sqe.filter(|_| ch.first() == Some(&CAPSULE)) else { continue };
            if !matches!(IoOpcode::from_u8(sqe.opcode), Some(IoOpcode::Read | IoOpcode::Write)) {
                continue;
            }
            let Some(ns) = namespaces.get(&sqe.nsid.get()) else { continue };
            if batch_ns.is_some_and(|b| !Arc::ptr_eq(b, ns)) {
                if let Some(b) = batch_ns {
                    b.backend().prefetch(&batch);
                }
                batch.clear();
            }
            batch_ns = Some(ns);
            let rw = RwCommand::from_sqe(&sqe);
            let shift = ns.block_shift();
            batch.push(ByteRange { offset: rw.slba << shift, len: u64::from(rw.nlb) << shift });
        }
        if let Some(b) = batch_ns {
            b.backend().prefetch(&batch);
        }
    }

    /// Converts an LBA range to bytes, checking it against the namespace and MDTS.
    fn byte_range(
        &self,
        ns: Option<&Namespace>,
        slba: u64,
        nlb: u32,
        check_mdts: bool,
    ) -> Result<(u64, u64), Status> {
        let ns = ns.ok_or(Status::INVALID_NAMESPACE.with_dnr())?;
        let end = slba.checked_add(u64::from(nlb)).ok_or(Status::LBA_OUT_OF_RANGE.with_dnr())?;
        if end > ns.size_blocks() {
            return Err(Status::LBA_OUT_OF_RANGE.with_dnr());
        }
        let len = u64::from(nlb) << ns.block_shift();
        if check_mdts && len > u64::from(self.target.shared.config.max_transfer_bytes) {
            return Err(Status::INVALID_FIELD.with_dnr());
        }
        Ok((slba << ns.block_shift(), len))
    }

    fn read(
        &mut self,
        cmd: &CapsuleCmd,
        ns: &mut Option<Arc<Namespace>>,
        now: Instant,
    ) -> Result<(), Status> {
        let rw = RwCommand::from_sqe(&cmd.sqe);
        let (offset, len) = self.byte_range(ns.as_deref(), rw.slba, rw.nlb, true)?;
        match self.data_location(cmd)? {
            DataLocation::Transport { length } if u64::from(length) == len => {}
            _ => return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
        }
        let len = u32::try_from(len).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
        self.start_command(cmd.sqe.cid.get(), ns.take(), OpClass::Read, Queued::Read { offset, len }, now);
        Ok(())
    }

    fn write(
        &mut self,
        cmd: &mut CapsuleCmd,
        ns: &mut Option<Arc<Namespace>>,
        now: Instant,
    ) -> Result<(), Status> {
        let rw = RwCommand::from_sqe(&cmd.sqe);
        let (offset, len) = self.byte_range(ns.as_deref(), rw.slba, rw.nlb, true)?;
        let then = AfterData::Write { offset, fua: rw.fua };
        self.receive_data(cmd, ns, OpClass::Write, len, then, now)
    }

    fn write_zeroes(
        &mut self,
        cmd: &CapsuleCmd,
        ns: &mut Option<Arc<Namespace>>,
        now: Instant,
    ) -> Result<(), Status> {
        let wz = WriteZeroesCommand::from_sqe(&cmd.sqe);
        let (offset, len) = self.byte_range(ns.as_deref(), wz.slba, wz.nlb, false)?;
        let cid = cmd.sqe.cid.get();
        self.register(cid, ns.take(), OpClass::Other, now);
        self.submit_io(cid, IoOp::WriteZeroes { offset, len, deallocate: wz.deallocate }, None);
        Ok(())
    }

    fn dataset_management(
        &mut self,
        cmd: &mut CapsuleCmd,
        ns: &mut Option<Arc<Namespace>>,
        now: Instant,
    ) -> Result<(), Status> {
        let dsm = DsmCommand::from_sqe(&cmd.sqe);
        let needed = dsm.payload_len() as u64;
        // The Linux host always sends a 4096-byte buffer (256 range slots, unused ones zero): accept any
        // length from what the ranges need up to that.
        let len = match cmd.sqe.dptr.data_location() {
            Some(DataLocation::InCapsule { length, .. } | DataLocation::Transport { length }) => {
                u64::from(length)
            }
            _ => needed,
        };
        if len < needed || len > 4096 {
            return Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr());
        }
        let then = AfterData::Dsm { ranges: usize::from(dsm.ranges), deallocate: dsm.deallocate };
        self.receive_data(cmd, ns, OpClass::Other, len, then, now)
    }

    /// Gets a command's host-to-controller data: from the capsule, or through R2Ts.
    fn receive_data(
        &mut self,
        cmd: &mut CapsuleCmd,
        ns: &mut Option<Arc<Namespace>>,
        class: OpClass,
        len: u64,
        then: AfterData,
        now: Instant,
    ) -> Result<(), Status> {
        let cid = cmd.sqe.cid.get();
        match self.data_location(cmd)? {
            DataLocation::InCapsule { length, .. } if u64::from(length) == len => {
                // The capsule's data moves on (no reference count) unless only a part is used.
                let data = if length as usize == cmd.data.len() {
                    std::mem::take(&mut cmd.data)
                } else {
                    cmd.data.slice(..length as usize)
                };
                self.register(cid, ns.take(), class, now);
                self.data_received(cid, data, then, now);
                Ok(())
            }
            DataLocation::Transport { length } if u64::from(length) == len && len > 0 => {
                let total = u32::try_from(len).map_err(|_| Status::INVALID_FIELD.with_dnr())?;
                self.start_command(cid, ns.take(), class, Queued::Receive { total, then }, now);
                Ok(())
            }
            _ => Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
        }
    }

    /// Dataset Management data arrived: deallocate the ranges (other attributes are hints).
    pub(crate) fn dsm_data(
        &mut self,
        cid: u16,
        data: &Payload,
        ranges: usize,
        deallocate: bool,
        now: Instant,
    ) {
        let bytes = data.to_bytes();
        let ns = self.queue.as_ref().and_then(|q| q.inflight.get(&cid)).and_then(|c| c.ns.clone());
        let Some(ns) = ns else { return };
        let parsed = match parse_dsm_ranges(&bytes, ranges) {
            Ok(r) => r,
            Err(_) => {
                self.finish_registered(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), now);
                return;
            }
        };
        if !deallocate {
            self.finish_registered(cid, Status::SUCCESS, now);
            return;
        }
        let mut out: SmallVec<[ByteRange; 1]> = SmallVec::new();
        for r in parsed {
            let nlb = r.nlb.get();
            if nlb == 0 {
                continue;
            }
            match self.byte_range(Some(&ns), r.slba.get(), nlb, false) {
                Ok((offset, len)) => out.push(ByteRange { offset, len }),
                Err(status) => {
                    self.finish_registered(cid, status, now);
                    return;
                }
            }
        }
        if out.is_empty() {
            self.finish_registered(cid, Status::SUCCESS, now);
            return;
        }
        self.submit_io(cid, IoOp::Discard { ranges: out }, None);
    }
}
