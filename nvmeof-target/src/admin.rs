//! Fabrics commands (Connect, Property Get/Set, Disconnect) and admin commands.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use nvmeof_proto::nvme::discovery::{
    discovery_log_len, DiscoveryLogEntry, DiscoveryLogHeader, DiscoverySubtype, DISCOVERY_LOG_ENTRY_LEN,
    DISCOVERY_LOG_HEADER_LEN, DISCOVERY_NQN, TREQ_DISABLE_SQ_FLOW_CONTROL,
};
use nvmeof_proto::nvme::fabrics::{
    connect_success_dw0, connect_success_dw0_auth_required, ConnectCommand, ConnectData, InvalidParameter,
    NqnError, PropertyGetCommand, PropertySetCommand, CNTLID_DYNAMIC, CONNECT_DATA_LEN, NQN_FIELD_LEN,
    RECFMT_0,
};
use nvmeof_proto::nvme::features::{
    AsyncEventConfig, FeatureId, KeepAliveTimer, NumberOfQueues, VolatileWriteCache,
};
use nvmeof_proto::nvme::identify::{
    self, Cns, IdentifyController, IdentifyNamespace, LbaFormat, NamespaceIdList, NsIdDescriptor, CSI_NVM,
    IDENTIFY_DATA_LEN,
};
use nvmeof_proto::nvme::log::{self, CommandsSupportedEffects, FirmwareSlotLog, LogPageId, SmartLog};
use nvmeof_proto::nvme::nvm::{GetFeaturesCommand, GetLogPageCommand, IdentifyCommand, SetFeaturesCommand};
use nvmeof_proto::nvme::opcode::{AdminOpcode, FabricsCommandType, IoOpcode, FABRICS_OPCODE};
use nvmeof_proto::nvme::registers::{
    self, Cap, Cc, Csts, PropertyWidth, ShutdownNotification, ShutdownStatus, Version,
};
use nvmeof_proto::nvme::{DataLocation, Status};
use nvmeof_proto::{CapsuleCmd, Payload};
use zerocopy::IntoBytes;

use crate::auth::session::QueueAuth;
use crate::backend::IoOp;
use crate::connection::{Cmd, CmdState, Connection, Queue};
use crate::controller::Controller;
use crate::subsystem::OpClass;

/// NVMe version the controllers report.
const VERSION: Version = Version::V1_3;
/// SQ / CQ entry sizes (log2): 64 and 16 bytes.
const IOSQES: u8 = 6;
const IOCQES: u8 = 4;
/// CAP.TO: worst-case time to become ready, in 500 ms units.
const CAP_TIMEOUT: u8 = 15;
/// KAS: keep-alive granularity in 100 ms units.
const KEEP_ALIVE_GRANULARITY: u16 = 10;
/// Keep-alive timeout given to discovery controllers that ask for none (as Linux nvmet does).
const DISCOVERY_DEFAULT_KATO_MS: u32 = 120_000;

impl Connection {
    // ---- Fabrics Connect ----

    /// The Connect command's data (host and subsystem NQNs, host ID, CNTLID), or the status that
    /// refuses it. The data travels in the capsule (the Linux host always sends it so).
    pub(crate) fn connect_data(&self, cmd: &CapsuleCmd) -> Result<Bytes, Status> {
        match self.data_location(cmd)? {
            DataLocation::InCapsule { length, .. } if length as usize >= CONNECT_DATA_LEN => {
                Ok(cmd.data.slice(..CONNECT_DATA_LEN).to_bytes())
            }
            _ => Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
        }
    }

    pub(crate) fn handle_connect(&mut self, cmd: &CapsuleCmd, now: Instant) {
        let cid = cmd.sqe.cid.get();
        let c = ConnectCommand::from_sqe(&cmd.sqe);
        if c.recfmt.get() != RECFMT_0 {
            self.respond(cid, Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(), 0);
            return;
        }
        let data = match self.connect_data(cmd) {
            Ok(data) => data,
            Err(status) => {
                self.respond(cid, status, 0);
                return;
            }
        };
        let Some(cd) = ConnectData::ref_from_data(&data) else {
            self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
            return;
        };
        let invalid = |p: InvalidParameter, why: &'static str| {
            (Status::CONNECT_INVALID_PARAMETERS.with_dnr(), u64::from(p.to_dw0()), why)
        };
        // An empty host NQN (SPDK's perf sends one unless given `hostnqn:`) is accepted like any other
        // name, as Linux's and SPDK's targets do: it can only pass an allow-any-host subsystem, since
        // no allowed-host list or secret can name it.
        let hostnqn = match cd.hostnqn() {
            Ok(n) => Ok(n),
            Err(NqnError::Empty) => Ok(""),
            Err(e) => Err(e),
        };
        let result = (|| {
            let subnqn =
                cd.subnqn().map_err(|e| invalid(InvalidParameter::SUBNQN, nqn_problem(e, "subsystem")))?;
            let hostnqn = hostnqn.map_err(|e| invalid(InvalidParameter::HOSTNQN, nqn_problem(e, "host")))?;
            let entries = u32::from(c.sqsize.get()) + 1;
            let max_entries = self.target.shared.config.max_queue_entries;
            let qid = c.qid.get();
            if entries < 2 || entries > max_entries || (qid == 0 && entries < 32) {
                return Err(invalid(InvalidParameter::SQSIZE, "queue size out of range"));
            }
            let sq_flow_control = !c.sq_flow_control_disabled();
            if subnqn == DISCOVERY_NQN {
                if qid != 0 {
                    return Err(invalid(InvalidParameter::QID, "I/O queue to the discovery subsystem"));
                }
                if cd.cntlid.get() != CNTLID_DYNAMIC {
                    return Err(invalid(InvalidParameter::CNTLID, "static controller ID"));
                }
                // A discovery controller without keep alive would live as long as its socket: give it
                // the default timeout Linux's own target uses.
                let kato = match c.kato.get() {
                    0 => DISCOVERY_DEFAULT_KATO_MS,
                    k => k,
                };
                let ctrl = self
                    .target
                    .create_controller(None, hostnqn.to_owned(), cd.hostid, kato, now)
                    .ok_or((Status::CONNECT_CONTROLLER_BUSY, 0, "no free controller ID"))?;
                ctrl.touch(now);
                return Ok((ctrl, 0u16, entries, sq_flow_control, 0, false));
            }
            // A Connect that waited for its activation on the runner does not activate again here.
            let found = if self.activation_tried {
                self.target.subsystem(subnqn)
            } else {
                self.target.subsystem_or_activate(subnqn)
            };
            let (subsys, tombstone) = match found {
                Some(s) if s.allows_host(hostnqn) => (s, false),
                // A host whose namespaces were taken away before its connections were cut: an
                // empty controller answers its reconnects, so that it stops (see detach.rs).
                found => match self.target.tombstone(subnqn, hostnqn) {
                    Some(tombstone) => (tombstone, true),
                    None if found.is_some() => {
                        return Err((Status::CONNECT_INVALID_HOST.with_dnr(), 0, "host not allowed"))
                    }
                    None => return Err(invalid(InvalidParameter::SUBNQN, "no such subsystem")),
                },
            };
            let auth_required =
                if tombstone { subsys.requires_auth() } else { self.target.auth_required(&subsys, hostnqn) };
            if qid == 0 {
                if cd.cntlid.get() != CNTLID_DYNAMIC {
                    return Err(invalid(InvalidParameter::CNTLID, "static controller ID"));
                }
                if self.target.host_is_draining(&subsys, hostnqn) {
                    // The host's previous controller still has writes landing: retry later.
                    return Err((Status::CONNECT_CONTROLLER_BUSY, 0, "previous controller still draining"));
                }
                let ctrl = self
                    .target
                    .create_controller(Some(subsys.clone()), hostnqn.to_owned(), cd.hostid, c.kato.get(), now)
                    .ok_or((Status::CONNECT_CONTROLLER_BUSY, 0, "no free controller ID"))?;
                // The subsystem may have been removed, or the host denied, while we were at it.
                let still = self.target.subsystem(subnqn).is_some_and(|s| Arc::ptr_eq(&s, &subsys))
                    || self.target.is_tombstone_of(&subsys, hostnqn);
                if !still || !subsys.allows_host(hostnqn) {
                    if !still && subsys.allows_host(hostnqn) {
                        // Unloaded (or replaced) meanwhile: the host may simply retry.
                        self.target.remove_controller(&ctrl, "subsystem unloaded while connecting");
                        return Err((Status::CONNECT_CONTROLLER_BUSY, 0, "subsystem unloaded meanwhile"));
                    }
                    self.target.remove_controller(&ctrl, "host denied while connecting");
                    return Err((Status::CONNECT_INVALID_HOST.with_dnr(), 0, "host denied meanwhile"));
                }
                ctrl.touch(now);
                return Ok((ctrl, 0, entries, sq_flow_control, 0, auth_required));
            }
            // CNTLIDs are unique per subsystem: the controller is named by (SUBNQN, CNTLID).
            let ctrl = self
                .target
                .find_controller(subnqn, cd.cntlid.get())
                .filter(|ctrl| !ctrl.is_dead())
                .filter(|ctrl| ctrl.subsystem.as_ref().is_some_and(|s| Arc::ptr_eq(s, &subsys)))
                .ok_or_else(|| invalid(InvalidParameter::CNTLID, "no such controller"))?;
            if ctrl.hostnqn != hostnqn || ctrl.hostid != cd.hostid {
                return Err((
                    Status::CONNECT_INVALID_HOST.with_dnr(),
                    0,
                    "controller belongs to another host",
                ));
            }
            // Read before checking readiness: a reset in between makes the claim fail.
            let generation = ctrl.enable_generation();
            if !ctrl.is_ready() {
                return Err((Status::COMMAND_SEQUENCE_ERROR, 0, "controller not ready"));
            }
            if !ctrl.claim_io_queue(qid, self.id, generation) {
                return Err(invalid(InvalidParameter::QID, "queue ID taken or not granted"));
            }
            Ok((ctrl, qid, entries, sq_flow_control, generation, auth_required))
        })();
        match result {
            Err((status, dw0, reason)) => {
                tracing::info!(
                    parent: &self.span,
                    ?status,
                    reason,
                    qid = c.qid.get(),
                    host = %nqn_for_log(&cd.hostnqn),
                    subsystem = %nqn_for_log(&cd.subnqn),
                    "Connect refused"
                );
                self.respond(cid, status, dw0);
            }
            Ok((ctrl, qid, entries, sq_flow_control, generation, auth_required)) => {
                let subsystem = ctrl.subsystem.as_ref().map_or(DISCOVERY_NQN, |s| s.nqn());
                if qid == 0 {
                    tracing::info!(
                        parent: &self.span,
                        cntlid = ctrl.cntlid,
                        host = %ctrl.hostnqn,
                        subsystem,
                        kato_ms = ctrl.kato_ms(),
                        auth_required,
                        "controller created"
                    );
                } else {
                    tracing::debug!(parent: &self.span, cntlid = ctrl.cntlid, qid, entries, auth_required, "I/O queue connected");
                }
                let cntlid = ctrl.cntlid;
                let auth = if auth_required {
                    let timeout = self.target.shared.config.auth.timeout;
                    QueueAuth::required(now.checked_add(timeout).unwrap_or(now))
                } else {
                    QueueAuth::not_required()
                };
                self.set_live(Queue {
                    ctrl,
                    qid,
                    entries,
                    sqhd: 1 % entries,
                    sq_flow_control,
                    enable_generation: generation,
                    inflight: Default::default(),
                    waiting: Default::default(),
                    data_in_flight: 0,
                    shutdown: Vec::new(),
                    auth,
                });
                let dw0 = if auth_required {
                    connect_success_dw0_auth_required(cntlid)
                } else {
                    connect_success_dw0(cntlid)
                };
                self.respond(cid, Status::SUCCESS, u64::from(dw0));
                self.recheck_after_connect();
            }
        }
    }

    // ---- admin queue ----

    pub(crate) fn handle_admin(&mut self, cmd: CapsuleCmd, now: Instant) {
        let cid = cmd.sqe.cid.get();
        let Some(ctrl) = self.queue.as_ref().map(|q| q.ctrl.clone()) else {
            return;
        };
        if cmd.sqe.opcode == FABRICS_OPCODE {
            self.handle_fabrics_admin(&cmd, &ctrl, now);
            return;
        }
        // Everything else needs an enabled, ready controller.
        if !ctrl.cc().en() || !ctrl.is_ready() {
            self.respond(cid, Status::COMMAND_SEQUENCE_ERROR, 0);
            return;
        }
        let op = AdminOpcode::from_u8(cmd.sqe.opcode);
        let discovery = ctrl.is_discovery();
        match op {
            Some(AdminOpcode::Identify) => self.identify(&cmd, &ctrl),
            Some(AdminOpcode::GetLogPage) => self.get_log_page(&cmd, &ctrl),
            Some(AdminOpcode::KeepAlive) => {
                ctrl.touch(now);
                self.respond(cid, Status::SUCCESS, 0);
            }
            Some(AdminOpcode::AsyncEventRequest) => self.async_event_request(cid, &ctrl, now),
            Some(AdminOpcode::SetFeatures) => self.set_features(&cmd, &ctrl),
            Some(AdminOpcode::GetFeatures) => self.get_features(&cmd, &ctrl),
            Some(AdminOpcode::Abort) if !discovery => {
                // Commands here are not abortable once started: DW0 bit 0 set means "not aborted".
                self.respond(cid, Status::SUCCESS, 1);
            }
            _ => self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    fn handle_fabrics_admin(&mut self, cmd: &CapsuleCmd, ctrl: &Arc<Controller>, now: Instant) {
        let cid = cmd.sqe.cid.get();
        match FabricsCommandType::from_u8(cmd.sqe.fctype()) {
            Some(FabricsCommandType::PropertyGet) => {
                let c = PropertyGetCommand::from_sqe(&cmd.sqe);
                match (c.width(), property_value(ctrl, c.offset(), &self.target.shared.config)) {
                    (Some(w), Some((value, expected))) if w == expected => {
                        self.respond(cid, Status::SUCCESS, value)
                    }
                    _ => self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0),
                }
            }
            Some(FabricsCommandType::PropertySet) => {
                let c = PropertySetCommand::from_sqe(&cmd.sqe);
                if c.offset() != registers::offset::CC || c.width() != Some(PropertyWidth::Four) {
                    self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
                    return;
                }
                let value = c.value_for_width().unwrap_or(0) as u32;
                self.set_cc(cid, ctrl, Cc(value), now);
            }
            Some(FabricsCommandType::Disconnect) => {
                self.respond(cid, Status::SUCCESS, 0);
                self.close(crate::CloseReason::Disconnected);
            }
            Some(FabricsCommandType::Connect) => {
                self.respond(cid, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0)
            }
            _ => self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0),
        }
    }

    /// Property Set CC: enable (CSTS.RDY), disable (reset: I/O queues deleted), shutdown (flush, then
    /// CSTS.SHST complete).
    fn set_cc(&mut self, cid: u16, ctrl: &Arc<Controller>, cc: Cc, now: Instant) {
        let old = ctrl.cc();
        ctrl.set_cc(cc);
        let mut csts = ctrl.csts();
        if cc.en() && !old.en() {
            let valid = cc.css() == 0
                && cc.mps() == 0
                && (ctrl.is_discovery() || (cc.iosqes() == IOSQES && cc.iocqes() == IOCQES));
            csts = if valid { csts.with_rdy(true) } else { csts.with_cfs(true) };
            if !valid {
                if let Some(suppressed) = self.target.shared.warnings.invalid_cc.hit(now) {
                    tracing::warn!(parent: &self.span, ?cc, suppressed, "invalid CC: controller fatal status");
                }
            }
        } else if !cc.en() && old.en() {
            tracing::debug!(parent: &self.span, "controller disabled: I/O queues deleted");
            ctrl.reset();
            // Outstanding Asynchronous Event Requests end with the reset.
            if let Some(q) = self.queue.as_mut() {
                q.inflight.retain(|_, c| !matches!(c.state, CmdState::Aer));
            }
            csts = Csts(0);
        }
        let shutdown = !matches!(cc.shn(), ShutdownNotification::None)
            && matches!(old.shn(), ShutdownNotification::None);
        if shutdown {
            csts = csts.with_shst(ShutdownStatus::Occurring);
            ctrl.set_csts(csts);
            self.respond(cid, Status::SUCCESS, 0);
            self.start_shutdown(ctrl, now);
            return;
        }
        ctrl.set_csts(csts);
        self.respond(cid, Status::SUCCESS, 0);
    }

    /// Flushes every namespace, then reports the shutdown complete (the flush completions come back
    /// through [`Connection::complete_io`] under internal tokens).
    fn start_shutdown(&mut self, ctrl: &Arc<Controller>, _now: Instant) {
        let namespaces: Vec<_> =
            ctrl.subsystem.as_ref().map(|s| s.namespaces().values().cloned().collect()).unwrap_or_default();
        if namespaces.is_empty() {
            ctrl.set_csts(ctrl.csts().with_shst(ShutdownStatus::Complete));
            return;
        }
        for ns in namespaces {
            self.submit_internal(ns, IoOp::Flush);
        }
    }

    pub(crate) fn finish_shutdown(&mut self) {
        if let Some(q) = self.queue.as_ref() {
            // A reset since the shutdown began cancels it.
            if !matches!(q.ctrl.cc().shn(), ShutdownNotification::None) {
                q.ctrl.set_csts(q.ctrl.csts().with_shst(ShutdownStatus::Complete));
                tracing::debug!(parent: &self.span, "shutdown complete");
            }
        }
    }

    // ---- Identify ----

    fn identify(&mut self, cmd: &CapsuleCmd, ctrl: &Arc<Controller>) {
        let cid = cmd.sqe.cid.get();
        if let Err(status) = self.check_c2h_len(cmd, IDENTIFY_DATA_LEN as u64) {
            self.respond(cid, status, 0);
            return;
        }
        let id = IdentifyCommand::from_sqe(&cmd.sqe);
        let nsid = cmd.sqe.nsid.get();
        let data: Result<Bytes, Status> = match (id.cns_kind(), ctrl.subsystem.as_ref()) {
            (Some(Cns::Controller), _) => Ok(self.identify_controller(ctrl)),
            (Some(Cns::Namespace), Some(_)) => match ctrl.visible_namespace(nsid) {
                Some(ns) => Ok(identify_namespace(&ns)),
                None if nsid != 0 && nsid <= self.target.shared.config.max_namespaces => Ok(zeros()),
                None => Err(Status::INVALID_NAMESPACE.with_dnr()),
            },
            (Some(Cns::ActiveNamespaceList), Some(_)) if nsid < 0xffff_fffe => {
                ctrl.active_list_read();
                let list = NamespaceIdList::active(nsid, ctrl.visible_nsids());
                Ok(Bytes::copy_from_slice(list.as_bytes()))
            }
            (Some(Cns::NamespaceIdDescriptors), Some(_)) => match ctrl.visible_namespace(nsid) {
                Some(ns) => {
                    let mut out = vec![0u8; IDENTIFY_DATA_LEN];
                    let (nguid, uuid) = (ns.nguid(), ns.uuid());
                    let descs = [
                        NsIdDescriptor::Nguid(nguid),
                        NsIdDescriptor::Uuid(uuid),
                        NsIdDescriptor::Csi(CSI_NVM),
                    ];
                    match identify::write_ns_id_descriptors(&descs, &mut out) {
                        Ok(_) => Ok(Bytes::from(out)),
                        Err(_) => Err(Status::INTERNAL_ERROR),
                    }
                }
                None => Err(Status::INVALID_NAMESPACE.with_dnr()),
            },
            // I/O command set specific structures for the NVM command set: no extra limits to report.
            (Some(Cns::IoCommandSetController), Some(_)) if id.csi == CSI_NVM => Ok(zeros()),
            (Some(Cns::IoCommandSetNamespace), Some(_)) if id.csi == CSI_NVM => {
                match ctrl.visible_namespace(nsid) {
                    Some(_) => Ok(zeros()),
                    None => Err(Status::INVALID_NAMESPACE.with_dnr()),
                }
            }
            _ => Err(Status::INVALID_FIELD.with_dnr()),
        };
        match data {
            Ok(d) => self.send_data(cid, Payload::from(d), Status::SUCCESS, 0),
            Err(status) => self.respond(cid, status, 0),
        }
    }

    fn identify_controller(&self, ctrl: &Controller) -> Bytes {
        let cfg = &self.target.shared.config;
        let mut id = IdentifyController::zeroed();
        let (serial, model, subnqn) = match &ctrl.subsystem {
            Some(s) => (s.serial(), s.model(), s.nqn()),
            None => ("discovery", "Xatastor discovery", DISCOVERY_NQN),
        };
        // Identity strings were validated when the subsystem was added.
        let _ = id.set_serial_number(serial);
        let _ = id.set_model_number(model);
        let _ = id.set_firmware_revision(&cfg.firmware_revision);
        let _ = id.set_subnqn(subnqn);
        id.rab = 6;
        id.cmic = identify::CMIC_MULTI_CONTROLLER;
        id.mdts = cfg.mdts();
        id.cntlid.set(ctrl.cntlid);
        id.ver.set(VERSION.raw());
        let tbkas = if cfg.traffic_based_keep_alive { identify::CTRATT_TBKAS } else { 0 };
        id.ctratt.set(identify::CTRATT_HOST_ID_128 | tbkas);
        id.acl = 3;
        id.aerl = cfg.max_async_events.saturating_sub(1);
        id.frmw = identify::frmw(1, true, false);
        // Extended data (NUMDU, offsets) everywhere; the effects log only where there are I/O commands.
        id.lpa = identify::LPA_EXTENDED_DATA;
        if !ctrl.is_discovery() {
            id.lpa |= identify::LPA_COMMAND_EFFECTS;
        }
        id.elpe = 0;
        id.sqes = (IOSQES << 4) | IOSQES;
        id.cqes = (IOCQES << 4) | IOCQES;
        id.maxcmd.set(u16::try_from(cfg.max_queue_entries).unwrap_or(u16::MAX));
        id.kas.set(KEEP_ALIVE_GRANULARITY);
        id.sgls.set(
            identify::SGLS_SUPPORTED_BYTE_ALIGNED
                | identify::SGLS_OFFSET
                | identify::SGLS_TRANSPORT_DATA_BLOCK,
        );
        id.ioccsz.set((64 + cfg.inline_data_size) / 16);
        id.iorcsz.set(1);
        id.icdoff.set(0);
        id.msdbd = 1;
        id.ofcs.set(identify::OFCS_DISCONNECT);
        if ctrl.is_discovery() {
            id.cntrltype = identify::CNTRLTYPE_DISCOVERY;
            id.oaes.set(identify::OAES_DISCOVERY_CHANGE);
            id.nn.set(0);
        } else {
            id.cntrltype = identify::CNTRLTYPE_IO;
            id.oaes.set(identify::OAES_NS_ATTRIBUTE);
            id.nn.set(cfg.max_namespaces);
            id.oncs.set(identify::ONCS_DSM | identify::ONCS_WRITE_ZEROES);
            // Always a volatile write cache: hosts then send Flush, which makes every backend's writes
            // durable (a backend without a cache completes it at once).
            id.vwc = identify::VWC_PRESENT | identify::VWC_FLUSH_BROADCAST_UNSUPPORTED;
        }
        Bytes::copy_from_slice(id.as_bytes())
    }

    // ---- Get Log Page ----

    fn get_log_page(&mut self, cmd: &CapsuleCmd, ctrl: &Arc<Controller>) {
        let cid = cmd.sqe.cid.get();
        let g = GetLogPageCommand::from_sqe(&cmd.sqe);
        let len = g.len_bytes();
        if let Err(status) = self.check_c2h_len(cmd, len) {
            self.respond(cid, status, 0);
            return;
        }
        if g.offset % 4 != 0 || g.offset_is_index {
            self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
            return;
        }
        // A log page read is a data transfer like any other: MDTS bounds it (and what we allocate).
        let max = u64::from(self.target.shared.config.max_transfer_bytes);
        let Some(len) = usize::try_from(len).ok().filter(|_| len <= max) else {
            self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0);
            return;
        };
        let page: Vec<u8> = match (g.log_page(), ctrl.is_discovery()) {
            (Some(LogPageId::Discovery), true) => {
                let data = self.discovery_log_window(&ctrl.hostnqn, g.offset, len);
                self.send_data(cid, data, Status::SUCCESS, 0);
                return;
            }
            (Some(LogPageId::ErrorInformation), _) => Vec::new(),
            (Some(LogPageId::SmartHealth), false) => self.smart_log(ctrl),
            (Some(LogPageId::FirmwareSlot), false) => {
                FirmwareSlotLog::single(&self.target.shared.config.firmware_revision)
                    .map(|l| l.as_bytes().to_vec())
                    .unwrap_or_default()
            }
            (Some(LogPageId::ChangedNamespaceList), false) => {
                let list = match ctrl.changed_namespaces(g.rae) {
                    Some(nsids) => log::changed_namespace_list(nsids),
                    None => log::changed_namespace_list([log::CHANGED_NS_LIST_OVERFLOW]),
                };
                list.as_bytes().to_vec()
            }
            (Some(LogPageId::CommandsSupportedEffects), false) => commands_supported().as_bytes().to_vec(),
            _ => {
                self.respond(cid, Status::INVALID_LOG_PAGE.with_dnr(), 0);
                return;
            }
        };
        let start = usize::try_from(g.offset).ok().filter(|&o| o < page.len());
        let mut data = match start {
            Some(o) => {
                let end = o + (page.len() - o).min(len);
                Payload::from(Bytes::from(page).slice(o..end))
            }
            None => Payload::new(),
        };
        pad_with_zeros(&mut data, len);
        self.send_data(cid, data, Status::SUCCESS, 0);
    }

    /// Bytes `offset .. offset + len` of `hostnqn`'s discovery log page, built for that window only:
    /// the header (when the window covers it) and the entries the window overlaps, asked of the target
    /// by position; zeros past the end of the page. What is allocated is what the window holds of the
    /// page, whatever the number of entries and whatever `len` (which MDTS bounds).
    fn discovery_log_window(&self, hostnqn: &str, offset: u64, len: usize) -> Payload {
        const HEADER: u64 = DISCOVERY_LOG_HEADER_LEN as u64;
        const ENTRY: u64 = DISCOVERY_LOG_ENTRY_LEN as u64;
        let genctr = self.target.shared.discovery_genctr.load(std::sync::atomic::Ordering::Acquire);
        let end = offset.saturating_add(len as u64);
        // Entries whose bytes overlap the window: positions first .. last.
        let first = offset.saturating_sub(HEADER) / ENTRY;
        let last = end.saturating_sub(HEADER).div_ceil(ENTRY);
        let count = usize::try_from(last - first.min(last)).unwrap_or(0);
        let window = self.target.discovery_window(hostnqn, first, count);
        let page_len = discovery_log_len(window.total);
        let real = usize::try_from(page_len.saturating_sub(offset)).unwrap_or(usize::MAX).min(len);
        let mut out = vec![0u8; real];
        let header = DiscoveryLogHeader::new(genctr, window.total);
        log::copy_window(header.as_bytes(), offset, &mut out);
        let addr = self.params.local_addr;
        // A dual-stack listener sees IPv4 hosts as ::ffff:a.b.c.d: report the IPv4 address.
        let traddr = addr.ip().to_canonical().to_string();
        let trsvcid = addr.port().to_string();
        for (i, nqn) in window.nqns.iter().enumerate() {
            let Some(entry) = self.discovery_entry(nqn, &traddr, &trsvcid) else { continue };
            // Where this entry's bytes start relative to the window (negative: before it).
            let at = HEADER + (first + i as u64) * ENTRY;
            if at >= offset {
                let skip = usize::try_from(at - offset).unwrap_or(usize::MAX);
                if let Some(dst) = out.get_mut(skip..) {
                    let n = dst.len().min(DISCOVERY_LOG_ENTRY_LEN);
                    if let (Some(d), Some(src)) = (dst.get_mut(..n), entry.as_bytes().get(..n)) {
                        d.copy_from_slice(src);
                    }
                }
            } else {
                let from = usize::try_from(offset - at).unwrap_or(usize::MAX);
                if let Some(src) = entry.as_bytes().get(from..) {
                    let n = src.len().min(out.len());
                    if let (Some(d), Some(src)) = (out.get_mut(..n), src.get(..n)) {
                        d.copy_from_slice(src);
                    }
                }
            }
        }
        let mut data = Payload::from(out);
        pad_with_zeros(&mut data, len);
        data
    }

    fn discovery_entry(&self, nqn: &str, traddr: &str, trsvcid: &str) -> Option<DiscoveryLogEntry> {
        let mut e =
            DiscoveryLogEntry::tcp(nqn, traddr, trsvcid, self.params.port_id, DiscoverySubtype::NvmSubsystem)
                .ok()?;
        e.treq |= TREQ_DISABLE_SQ_FLOW_CONTROL;
        e.asqsz.set(32);
        Some(e)
    }

    fn smart_log(&self, ctrl: &Controller) -> Vec<u8> {
        let mut log = SmartLog::zeroed();
        // No sensor: Composite Temperature stays 0 (not reported), as in Linux's target; a made-up
        // value would look real to monitoring.
        log.available_spare = 100;
        log.available_spare_threshold = 10;
        let (mut read, mut written, mut reads, mut writes) = (0u128, 0u128, 0u128, 0u128);
        if let Some(s) = &ctrl.subsystem {
            for ns in s.namespaces().values() {
                let st = ns.stats().snapshot();
                read += u128::from(st.read_bytes);
                written += u128::from(st.write_bytes);
                reads += u128::from(st.reads);
                writes += u128::from(st.writes);
            }
        }
        log.data_units_read.set(SmartLog::data_units(read));
        log.data_units_written.set(SmartLog::data_units(written));
        log.host_read_commands.set(reads);
        log.host_write_commands.set(writes);
        log.as_bytes().to_vec()
    }

    // ---- features ----

    fn set_features(&mut self, cmd: &CapsuleCmd, ctrl: &Arc<Controller>) {
        let cid = cmd.sqe.cid.get();
        let f = SetFeaturesCommand::from_sqe(&cmd.sqe);
        if f.save {
            self.respond(cid, Status::FEATURE_NOT_SAVEABLE.with_dnr(), 0);
            return;
        }
        let value = cmd.sqe.cdw11.get();
        let discovery = ctrl.is_discovery();
        let (status, result) = match f.feature() {
            Some(FeatureId::NumberOfQueues) if !discovery => {
                let asked = NumberOfQueues::from_dw(value);
                if asked.nsq == 0xffff || asked.ncq == 0xffff {
                    (Status::INVALID_FIELD.with_dnr(), 0)
                } else if ctrl.io_queue_count() > 0 {
                    // May only be set before I/O queues exist.
                    (Status::COMMAND_SEQUENCE_ERROR, 0)
                } else {
                    let max = u32::from(self.target.shared.config.max_io_queues);
                    let n = asked.submission_queues().min(asked.completion_queues()).min(max);
                    ctrl.set_io_queues_granted(n as u16);
                    (Status::SUCCESS, u64::from(NumberOfQueues::from_counts(n, n).to_dw()))
                }
            }
            Some(FeatureId::AsyncEventConfig) => {
                let supported = if discovery {
                    AsyncEventConfig::DISCOVERY_LOG_CHANGE
                } else {
                    AsyncEventConfig::NAMESPACE_ATTRIBUTE
                };
                ctrl.set_async_event_config(value & supported);
                (Status::SUCCESS, 0)
            }
            Some(FeatureId::KeepAliveTimer) => {
                ctrl.set_kato_ms(KeepAliveTimer::from_dw(value).kato_ms);
                (Status::SUCCESS, 0)
            }
            Some(FeatureId::VolatileWriteCache) if !discovery => {
                if VolatileWriteCache::from_dw(value).enabled {
                    (Status::SUCCESS, 0)
                } else {
                    (Status::FEATURE_NOT_CHANGEABLE.with_dnr(), 0)
                }
            }
            _ => (Status::INVALID_FIELD.with_dnr(), 0),
        };
        self.respond(cid, status, result);
    }

    fn get_features(&mut self, cmd: &CapsuleCmd, ctrl: &Arc<Controller>) {
        let cid = cmd.sqe.cid.get();
        let f = GetFeaturesCommand::from_sqe(&cmd.sqe);
        let discovery = ctrl.is_discovery();
        let value: Option<u32> = match f.feature() {
            Some(FeatureId::NumberOfQueues) if !discovery => {
                let n = u32::from(ctrl.io_queues_granted());
                Some(NumberOfQueues::from_counts(n, n).to_dw())
            }
            Some(FeatureId::AsyncEventConfig) => Some(ctrl.async_event_config()),
            Some(FeatureId::KeepAliveTimer) => Some(KeepAliveTimer { kato_ms: ctrl.kato_ms() }.to_dw()),
            Some(FeatureId::VolatileWriteCache) if !discovery => {
                Some(VolatileWriteCache { enabled: true }.to_dw())
            }
            Some(FeatureId::Arbitration | FeatureId::PowerManagement) if !discovery => Some(0),
            _ => None,
        };
        // SEL = 3 (supported capabilities): bit 2 changeable; nothing is saveable or per namespace.
        let changeable = !matches!(
            f.feature(),
            Some(FeatureId::VolatileWriteCache | FeatureId::Arbitration | FeatureId::PowerManagement)
        );
        match value {
            Some(_) if f.select == nvmeof_proto::nvme::features::FeatureSelect::SupportedCapabilities => {
                self.respond(cid, Status::SUCCESS, if changeable { 0b100 } else { 0 })
            }
            Some(v) => self.respond(cid, Status::SUCCESS, u64::from(v)),
            None => self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0),
        }
    }

    // ---- asynchronous events ----

    fn async_event_request(&mut self, cid: u16, ctrl: &Arc<Controller>, now: Instant) {
        let limit = usize::from(self.target.shared.config.max_async_events);
        let Some(q) = self.queue.as_mut() else { return };
        let outstanding = q.inflight.values().filter(|c| matches!(c.state, CmdState::Aer)).count();
        if outstanding >= limit {
            self.respond(cid, Status::AER_LIMIT_EXCEEDED.with_dnr(), 0);
            return;
        }
        q.inflight.insert(cid, Cmd::new(now, None, OpClass::Other, CmdState::Aer));
        let _ = ctrl;
        self.deliver_async_events();
    }

    /// Completes parked Asynchronous Event Requests with queued events.
    pub(crate) fn deliver_async_events(&mut self) {
        loop {
            let Some(q) = self.queue.as_mut() else { return };
            if q.qid != 0 {
                return;
            }
            let Some(&cid) =
                q.inflight.iter().find(|(_, c)| matches!(c.state, CmdState::Aer)).map(|(cid, _)| cid)
            else {
                return;
            };
            let Some(event) = q.ctrl.next_event() else { return };
            q.inflight.remove(&cid);
            tracing::debug!(parent: &self.span, ?event, "asynchronous event");
            self.respond(cid, Status::SUCCESS, u64::from(event.to_dw0()));
        }
    }

    // ---- helpers ----

    /// Checks that a controller-to-host command's SGL describes exactly `len` bytes via data PDUs.
    fn check_c2h_len(&self, cmd: &CapsuleCmd, len: u64) -> Result<(), Status> {
        match self.data_location(cmd)? {
            DataLocation::Transport { length } if u64::from(length) == len => Ok(()),
            _ => Err(Status::DATA_SGL_LENGTH_INVALID.with_dnr()),
        }
    }
}

/// What is wrong with an NQN field, for the log.
fn nqn_problem(e: NqnError, which: &'static str) -> &'static str {
    match (e, which) {
        (NqnError::Empty, "host") => "empty host NQN",
        (NqnError::Empty, _) => "empty subsystem NQN",
        (NqnError::NotTerminated, "host") => "host NQN not NUL-terminated",
        (NqnError::NotTerminated, _) => "subsystem NQN not NUL-terminated",
        (NqnError::TooLong { .. }, "host") => "host NQN longer than 223 bytes",
        (NqnError::TooLong { .. }, _) => "subsystem NQN longer than 223 bytes",
        (NqnError::InvalidUtf8, "host") => "host NQN not UTF-8",
        (NqnError::InvalidUtf8, _) => "subsystem NQN not UTF-8",
        (_, "host") => "invalid host NQN",
        _ => "invalid subsystem NQN",
    }
}

/// An NQN field as it can be shown in a log, even when it is not valid: the bytes before the first
/// NUL (at most 223), lossily decoded and escaped.
fn nqn_for_log(field: &[u8; NQN_FIELD_LEN]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(NQN_FIELD_LEN).min(223);
    let text = String::from_utf8_lossy(field.get(..end).unwrap_or_default());
    text.escape_debug().to_string()
}

/// Zeros sent after a log page's end (a read past the end of a log page returns zeros), shared
/// instead of allocated per command.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Appends zeros to `data` until it is `len` bytes long.
fn pad_with_zeros(data: &mut Payload, len: usize) {
    let mut missing = len.saturating_sub(data.len());
    while missing > 0 {
        let n = missing.min(ZEROS.len());
        data.push(Bytes::from_static(ZEROS.get(..n).unwrap_or_default()));
        missing -= n;
    }
}

fn zeros() -> Bytes {
    Bytes::from(BytesMut::zeroed(IDENTIFY_DATA_LEN))
}

fn identify_namespace(ns: &crate::Namespace) -> Bytes {
    let mut id = IdentifyNamespace::zeroed();
    let blocks = ns.size_blocks();
    id.nsze.set(blocks);
    id.ncap.set(blocks);
    id.nuse.set(blocks);
    id.nlbaf = 0;
    id.flbas = 0;
    // Shared namespace (several controllers may attach it).
    id.nmic = 1;
    // Deallocated blocks read as zeros; Write Zeroes may deallocate.
    id.dlfeat = 0b001 | (1 << 3);
    id.nguid = ns.nguid();
    if let Some(lbaf) = LbaFormat::with_data_size(ns.block_size()) {
        let _ = id.set_lba_formats(&[lbaf]);
    }
    id.nlbaf = 0;
    Bytes::copy_from_slice(id.as_bytes())
}

fn commands_supported() -> CommandsSupportedEffects {
    let mut e = CommandsSupportedEffects::zeroed();
    for op in [
        AdminOpcode::GetLogPage,
        AdminOpcode::Identify,
        AdminOpcode::Abort,
        AdminOpcode::SetFeatures,
        AdminOpcode::GetFeatures,
        AdminOpcode::AsyncEventRequest,
        AdminOpcode::KeepAlive,
    ] {
        e.set_admin(op as u8, log::EFFECTS_CSUPP);
    }
    e.set_io(IoOpcode::Flush as u8, log::EFFECTS_CSUPP);
    e.set_io(IoOpcode::Read as u8, log::EFFECTS_CSUPP);
    for op in [IoOpcode::Write, IoOpcode::WriteZeroes, IoOpcode::DatasetManagement] {
        e.set_io(op as u8, log::EFFECTS_CSUPP | log::EFFECTS_LBCC);
    }
    e
}

/// A property's value and width, or `None` if the offset is not a property of a fabrics controller.
fn property_value(ctrl: &Controller, offset: u32, cfg: &crate::TargetConfig) -> Option<(u64, PropertyWidth)> {
    use registers::offset::{CAP, CC, CSTS, NSSR, VS};
    Some(match offset {
        CAP => {
            let mqes = u16::try_from(cfg.max_queue_entries - 1).unwrap_or(u16::MAX);
            let cap = Cap(0).with_mqes(mqes).with_cqr(true).with_to(CAP_TIMEOUT).with_css(1);
            (cap.raw(), PropertyWidth::Eight)
        }
        VS => (u64::from(VERSION.raw()), PropertyWidth::Four),
        CC => (u64::from(ctrl.cc().raw()), PropertyWidth::Four),
        CSTS => (u64::from(ctrl.csts().raw()), PropertyWidth::Four),
        NSSR => (0, PropertyWidth::Four),
        _ => return None,
    })
}
