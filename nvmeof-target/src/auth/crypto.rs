//! The hash computations of DH-HMAC-CHAP (NVMe Base Specification, "DH-HMAC-CHAP Protocol"), in the
//! byte order the Linux host and target use:
//!
//! ```text
//!  transformed key  Kt = HMAC_hh(K, NQN || "NVMe-over-Fabrics")            (hh = 0: Kt = K)
//!  augmented chal.  Ca = HMAC_H(H(g^xy mod p), C)                          (null group: Ca = C)
//!  host response    R1 = HMAC_H(Kt_host, Ca1 || S1 || T_ID || SC_C || "HostHost"   || NQNh || 00h || NQNc)
//!  ctrl response    R2 = HMAC_H(Kt_ctrl, Ca2 || S2 || T_ID || SC_C || "Controller" || NQNc || 00h || NQNh)
//! ```
//!
//! S is 4 bytes and T_ID 2 bytes, little-endian; SC_C is one byte (0); NQNs without terminator. The
//! host's key is transformed with the host NQN, the controller's with the subsystem NQN.

use hmac::{Hmac, Mac};
use nvmeof_proto::nvme::auth::DhchapHash;
use sha2::{Digest, Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// HMAC-H(key, parts concatenated).
pub(crate) fn hmac(hash: DhchapHash, key: &[u8], parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    macro_rules! run {
        ($d:ty) => {{
            // HMAC takes keys of any length: this cannot fail, and an empty result never verifies.
            let Ok(mut mac) = <Hmac<$d> as Mac>::new_from_slice(key) else {
                return Zeroizing::new(Vec::new());
            };
            for p in parts {
                mac.update(p);
            }
            Zeroizing::new(mac.finalize().into_bytes().to_vec())
        }};
    }
    match hash {
        DhchapHash::Sha256 => run!(Sha256),
        DhchapHash::Sha384 => run!(Sha384),
        DhchapHash::Sha512 => run!(Sha512),
        // A hash this crate does not know is never negotiated; an empty value never verifies.
        _ => Zeroizing::new(Vec::new()),
    }
}

/// H(data).
pub(crate) fn digest(hash: DhchapHash, data: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(match hash {
        DhchapHash::Sha256 => Sha256::digest(data).to_vec(),
        DhchapHash::Sha384 => Sha384::digest(data).to_vec(),
        DhchapHash::Sha512 => Sha512::digest(data).to_vec(),
        _ => Vec::new(),
    })
}

/// Equality in constant time (for responses; lengths are public).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The key transformation of a DHHC-1 secret: HMAC with the NQN, by the secret's own hash.
pub(crate) fn transform_key(key: &[u8], transform: Option<DhchapHash>, nqn: &str) -> Zeroizing<Vec<u8>> {
    match transform {
        None => Zeroizing::new(key.to_vec()),
        Some(h) => hmac(h, key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"]),
    }
}

/// The challenge as it enters the response: augmented with the DH shared secret when there is one.
pub(crate) fn augmented_challenge(
    hash: DhchapHash,
    challenge: &[u8],
    shared_secret: Option<&[u8]>,
) -> Zeroizing<Vec<u8>> {
    match shared_secret {
        None => Zeroizing::new(challenge.to_vec()),
        Some(ks) => hmac(hash, &digest(hash, ks), &[challenge]),
    }
}

/// Label of the host's response R1.
pub(crate) const HOST_LABEL: &[u8] = b"HostHost";
/// Label of the controller's response R2.
pub(crate) const CONTROLLER_LABEL: &[u8] = b"Controller";

/// The inputs of one response (R1 or R2).
pub(crate) struct Response<'a> {
    pub(crate) hash: DhchapHash,
    /// The transformed key of the side that answers.
    pub(crate) key: &'a [u8],
    /// The challenge it answers (C1 or C2).
    pub(crate) challenge: &'a [u8],
    /// g^xy mod p, left-padded to the group size; `None` for the null group.
    pub(crate) shared_secret: Option<&'a [u8]>,
    pub(crate) seqnum: u32,
    pub(crate) t_id: u16,
    /// [`HOST_LABEL`] or [`CONTROLLER_LABEL`].
    pub(crate) label: &'static [u8],
    /// The answering side's NQN first (host NQN for R1, subsystem NQN for R2).
    pub(crate) nqn1: &'a str,
    pub(crate) nqn2: &'a str,
}

impl Response<'_> {
    /// The response value (hash-length bytes).
    pub(crate) fn compute(&self) -> Zeroizing<Vec<u8>> {
        let ca = augmented_challenge(self.hash, self.challenge, self.shared_secret);
        hmac(
            self.hash,
            self.key,
            &[
                &ca,
                &self.seqnum.to_le_bytes(),
                &self.t_id.to_le_bytes(),
                &[0u8], // SC_C: no secure channel concatenation
                self.label,
                self.nqn1.as_bytes(),
                &[0u8],
                self.nqn2.as_bytes(),
            ],
        )
    }

    /// True if `value` is the response (compared in constant time).
    pub(crate) fn verify(&self, value: &[u8]) -> bool {
        ct_eq(&self.compute(), value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 4231 test case 2 (HMAC with a short key) for the three hash functions: the HMAC plumbing
    /// is the standard one.
    #[test]
    fn hmac_matches_rfc_4231() {
        let key = b"Jefe";
        let data: &[&[u8]] = &[b"what do ya want ", b"for nothing?"];
        assert_eq!(
            *hmac(DhchapHash::Sha256, key, data),
            unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
        assert_eq!(
            *hmac(DhchapHash::Sha384, key, data),
            unhex(concat!(
                "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e",
                "8e2240ca5e69e2c78b3239ecfab21649"
            ))
        );
        assert_eq!(
            *hmac(DhchapHash::Sha512, key, data),
            unhex(concat!(
                "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554",
                "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
            ))
        );
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
