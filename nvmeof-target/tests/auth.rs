//! DH-HMAC-CHAP between the in-tree host and the target.

mod common;

use common::*;
use nvmeof_proto::nvme::auth::{DhGroup, DhchapHash};
use nvmeof_proto::nvme::fabrics::CONNECT_AUTHREQ_ATR;
use nvmeof_proto::nvme::Status;
use nvmeof_target::host::HostOptions;

#[test]
#[allow(clippy::disallowed_methods)]
fn timing_probe() {
    let now = Clock::new().0;
    for g in [DhGroup::Null, DhGroup::Ffdhe2048, DhGroup::Ffdhe8192] {
        let (target, _keys) = target_with_auth(true);
        let mut link = Link::new(&target, HostOptions::default(), now);
        let c = connect_admin(&mut link, SUBNQN, HOSTNQN, 5000, now);
        assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0);
        let mut cfg = (*host_auth(HOST_SECRET, Some(CTRL_SECRET))).clone();
        cfg.dh_groups = vec![g];
        cfg.hashes = vec![DhchapHash::Sha512];
        let t = std::time::Instant::now();
        let out = authenticate(&mut link, std::sync::Arc::new(cfg), 1, 3, now).unwrap();
        eprintln!("{g:?}: {:?} {out:?}", t.elapsed());
        let _ = Status::SUCCESS;
    }
}
