//! DH-HMAC-CHAP secrets in their DHHC-1 representation, as `nvme gen-dhchap-key` prints them and the
//! Linux host takes them (`--dhchap-secret`, `dhchap_secret=` in `/dev/nvme-fabrics`):
//!
//! ```text
//!  DHHC-1:<hh>:<base64 of key || CRC-32 of key, little-endian>:
//!          hh = 00: key used as it is; 01/02/03: key transformed with SHA-256/384/512 (see crypto.rs)
//!          key = 32, 48 or 64 bytes
//! ```

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nvmeof_proto::nvme::auth::DhchapHash;
use zeroize::Zeroizing;

use super::{crypto, Entropy};

/// Why a string is not a DHHC-1 secret (the messages never contain the secret).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Not of the form `DHHC-1:<hh>:<base64>:`.
    #[error("not a DHHC-1 secret (expected DHHC-1:<hh>:<base64>:)")]
    Format,
    /// The `hh` field names no key transformation (00, 01, 02 and 03 are defined).
    #[error("unknown key transformation {0:?} (expected 00, 01, 02 or 03)")]
    Transform(String),
    /// The key part is not valid base64.
    #[error("the key part is not valid base64")]
    Base64,
    /// The key has a length DH-HMAC-CHAP does not define.
    #[error("the key is {0} bytes long; DH-HMAC-CHAP keys are 32, 48 or 64 bytes")]
    Length(usize),
    /// The CRC-32 at the end of the key part does not match the key (a mistyped secret).
    #[error("the CRC-32 of the key does not match (mistyped secret?)")]
    Crc,
    /// No random bytes to generate a secret from.
    #[error("the random number source failed")]
    Entropy,
}

/// A DH-HMAC-CHAP secret: a 32-, 48- or 64-byte key and the hash that transforms it before use.
///
/// Its `Debug` output never shows the key, and the key is wiped from memory when the secret is
/// dropped. Parse one with [`DhchapSecret::parse`] (or `str::parse`), write one with
/// [`DhchapSecret::to_dhhc1`], make a new one with [`DhchapSecret::generate`].
#[derive(Clone)]
pub struct DhchapSecret {
    key: Zeroizing<Vec<u8>>,
    transform: Option<DhchapHash>,
}

impl fmt::Debug for DhchapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhchapSecret")
            .field("key", &format_args!("<{} bytes redacted>", self.key.len()))
            .field("transform", &self.transform)
            .finish()
    }
}

const PREFIX: &str = "DHHC-1:";

fn check_len(len: usize) -> Result<(), SecretError> {
    if matches!(len, 32 | 48 | 64) {
        Ok(())
    } else {
        Err(SecretError::Length(len))
    }
}

impl DhchapSecret {
    /// Parses `DHHC-1:<hh>:<base64>:` (surrounding whitespace, such as the newline of a secret file,
    /// and a missing final `:` are accepted, as the Linux host accepts them). Any of the three key
    /// lengths goes with any `hh`, as in the Linux host.
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(SecretError::Format)?;
        let (hh, b64) = rest.split_once(':').ok_or(SecretError::Format)?;
        let transform = match hh {
            "00" => None,
            "01" => Some(DhchapHash::Sha256),
            "02" => Some(DhchapHash::Sha384),
            "03" => Some(DhchapHash::Sha512),
            other => return Err(SecretError::Transform(other.chars().take(8).collect())),
        };
        let b64 = b64.strip_suffix(':').unwrap_or(b64);
        // 68 bytes (64-byte key + CRC) are 92 base64 characters; refuse anything much longer before
        // decoding into memory.
        if b64.len() > 128 {
            return Err(SecretError::Length(b64.len() / 4 * 3));
        }
        let mut raw = Zeroizing::new(vec![0u8; 96]);
        let n = STANDARD.decode_slice(b64, &mut raw[..]).map_err(|_| SecretError::Base64)?;
        let decoded = raw.get(..n).ok_or(SecretError::Base64)?;
        let key_len = n.checked_sub(4).ok_or(SecretError::Length(n))?;
        check_len(key_len)?;
        let (key, crc) = decoded.split_at(key_len);
        let stored = u32::from_le_bytes(crc.try_into().map_err(|_| SecretError::Format)?);
        if crc32fast::hash(key) != stored {
            return Err(SecretError::Crc);
        }
        Ok(Self { key: Zeroizing::new(key.to_vec()), transform })
    }

    /// A secret made of `key` (32, 48 or 64 bytes) to be transformed with `transform`.
    pub fn from_key(key: &[u8], transform: Option<DhchapHash>) -> Result<Self, SecretError> {
        check_len(key.len())?;
        Ok(Self { key: Zeroizing::new(key.to_vec()), transform })
    }

    /// A new random secret of `key_len` bytes (32, 48 or 64), like `nvme gen-dhchap-key`.
    pub fn generate(
        entropy: &dyn Entropy,
        key_len: usize,
        transform: Option<DhchapHash>,
    ) -> Result<Self, SecretError> {
        check_len(key_len)?;
        let mut key = Zeroizing::new(vec![0u8; key_len]);
        entropy.fill(&mut key).map_err(|_| SecretError::Entropy)?;
        Ok(Self { key, transform })
    }

    /// The DHHC-1 representation, `DHHC-1:<hh>:<base64 of key || CRC-32>:` (wiped when dropped).
    #[must_use]
    pub fn to_dhhc1(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new(Vec::with_capacity(self.key.len() + 4));
        raw.extend_from_slice(&self.key);
        raw.extend_from_slice(&crc32fast::hash(&self.key).to_le_bytes());
        let hh = self.transform.map_or(0, DhchapHash::code);
        let mut out = Zeroizing::new(String::with_capacity(PREFIX.len() + 4 + raw.len() * 4 / 3 + 4));
        out.push_str(PREFIX);
        out.push_str(&format!("{hh:02}:"));
        STANDARD.encode_string(&raw[..], &mut out);
        out.push(':');
        out
    }

    /// Length of the key in bytes.
    #[must_use]
    pub fn key_len(&self) -> usize {
        self.key.len()
    }

    /// The hash the key is transformed with before use (`None`: used as it is).
    #[must_use]
    pub fn transform(&self) -> Option<DhchapHash> {
        self.transform
    }

    /// The key as used in responses: transformed with `nqn` (the host NQN for a host secret, the
    /// subsystem NQN for a controller secret).
    pub(crate) fn transformed_key(&self, nqn: &str) -> Zeroizing<Vec<u8>> {
        crypto::transform_key(&self.key, self.transform, nqn)
    }
}

impl FromStr for DhchapSecret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

    /// Printed by nvme-cli 2.3 / libnvme 1.3 (Debian 12):
    /// `nvme gen-dhchap-key --secret=<00 01 02 … (len-1)> --key-length=<len> --hmac=<m> --nqn=HOSTNQN`.
    /// That version writes the key already transformed with the NQN when `--hmac` is nonzero — the
    /// same transformation the Linux host and this crate apply — so these lines are byte-exact
    /// vectors for the representation (base64, CRC-32) and for the key transformation.
    const NVME_CLI_2_3: [(u8, usize, &str); 6] = [
        (0, 32, "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"),
        (0, 48, "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vcSEgBQ==:"),
        (
            0,
            64,
            "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P4zODhA=:",
        ),
        (1, 32, "DHHC-1:01:bHuByyp0b3RFSx1xQPMVO1HKmUWfzveoahfydpW4fNgSLMVm:"),
        (2, 48, "DHHC-1:02:yRbznXvUOKyUzpjxLyIgLGvEOxsb9/CBo2/XbRG0sXMHJv918yV2tXSc+gbRp7T1eXmwtA==:"),
        (
            3,
            64,
            "DHHC-1:03:XaedOIjF3axQewl4QMTIr4xwmePzL78hYgnSQQP1S88iKE5wNLtXmomXR19QrsC/88ytGEVjd56B9IxAUHG5cMGgMCQ=:",
        ),
    ];

    fn counting(len: usize) -> Vec<u8> {
        (0..len as u8).collect()
    }

    #[test]
    fn nvme_cli_vectors_parse_and_round_trip() {
        for (hh, len, text) in NVME_CLI_2_3 {
            let s = DhchapSecret::parse(text).unwrap();
            assert_eq!(s.key_len(), len);
            assert_eq!(s.transform().map_or(0, DhchapHash::code), hh);
            assert_eq!(&*s.to_dhhc1(), text, "re-encoding gives the same string");
        }
    }

    #[test]
    fn key_transformation_matches_nvme_cli() {
        for (hh, len, text) in NVME_CLI_2_3 {
            let printed = DhchapSecret::parse(text).unwrap();
            let transform = DhchapHash::from_u8(hh);
            let mine = DhchapSecret::from_key(&counting(len), transform).unwrap();
            // nvme-cli 2.3 printed transform(secret, NQN) as the key: ours must be that exactly.
            assert_eq!(*mine.transformed_key(HOSTNQN), *printed.key, "hh={hh:02} len={len}");
        }
    }

    #[test]
    fn malformed_secrets_are_refused_with_the_reason() {
        let good = NVME_CLI_2_3[0].2;
        assert!(DhchapSecret::parse(&format!("  {good}\n")).is_ok(), "whitespace of a file");
        assert!(DhchapSecret::parse(good.strip_suffix(':').unwrap()).is_ok(), "no final colon");
        assert_eq!(DhchapSecret::parse("DHHC-2:00:AAAA:").unwrap_err(), SecretError::Format);
        assert_eq!(DhchapSecret::parse("DHHC-1:00").unwrap_err(), SecretError::Format);
        assert_eq!(
            DhchapSecret::parse(&good.replace(":00:", ":04:")).unwrap_err(),
            SecretError::Transform("04".into())
        );
        assert_eq!(DhchapSecret::parse("DHHC-1:00:!!!!:").unwrap_err(), SecretError::Base64);
        // 16-byte key + CRC.
        let short = STANDARD.encode([0u8; 20]);
        assert_eq!(DhchapSecret::parse(&format!("DHHC-1:00:{short}:")).unwrap_err(), SecretError::Length(16));
        let long = "A".repeat(4000);
        assert!(matches!(DhchapSecret::parse(&format!("DHHC-1:00:{long}:")), Err(SecretError::Length(_))));
        // One changed character: the CRC catches it.
        let typo = good.replacen("AAEC", "AAED", 1);
        assert_eq!(DhchapSecret::parse(&typo).unwrap_err(), SecretError::Crc);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let s = DhchapSecret::parse(NVME_CLI_2_3[3].2).unwrap();
        let dbg = format!("{s:?}");
        assert!(dbg.contains("redacted"), "{dbg}");
        assert!(!dbg.contains("bHuB") && !dbg.contains("108"), "{dbg}");
        let key_bytes = format!("{:?}", &s.key[..4]);
        assert!(!dbg.contains(&key_bytes));
    }

    #[test]
    fn generated_secrets_round_trip() {
        let e = crate::auth::DeterministicEntropy::new(7);
        for (len, t) in [(32, None), (48, Some(DhchapHash::Sha384)), (64, Some(DhchapHash::Sha512))] {
            let s = DhchapSecret::generate(&e, len, t).unwrap();
            let back = DhchapSecret::parse(&s.to_dhhc1()).unwrap();
            assert_eq!(*back.key, *s.key);
            assert_eq!(back.transform(), t);
        }
        assert_eq!(DhchapSecret::generate(&e, 40, None).unwrap_err(), SecretError::Length(40));
    }
}
