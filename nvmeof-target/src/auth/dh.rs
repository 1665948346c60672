//! The finite-field Diffie-Hellman groups of RFC 7919 (ffdhe2048 … ffdhe8192, generator 2), as
//! DH-HMAC-CHAP uses them: values are big-endian and left-padded with zeros to the size of the prime
//! (a value with a leading zero byte keeps its full length: the interoperability bug SPDK had in
//! spdk#3400 was a shortened value).
//!
//! The private exponent is a random number of the size RFC 7919 (Appendix A, "short exponents")
//! gives for each group (225, 275, 325, 375 and 400 bits) with its top bit set, so that every
//! exponentiation takes the same number of steps; the exponentiation itself is crypto-bigint's
//! constant-time Montgomery ladder. A peer's value must lie in 2..=p-2 (1 and p-1 would make the
//! shared secret guessable); the primes are safe primes, so no further subgroup check is needed
//! beyond that (a value of the order-2 subgroup is exactly what the range check excludes).

use std::sync::OnceLock;

use crypto_bigint::modular::{BoxedMontyForm, BoxedMontyParams};
use crypto_bigint::{BoxedUint, Odd};
use nvmeof_proto::nvme::auth::DhGroup;
use zeroize::Zeroizing;

use super::{Entropy, EntropyError};

/// RFC 7919 ffdhe2048 prime, big-endian hex.
const FFDHE2048_P: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF",
);

/// RFC 7919 ffdhe3072 prime, big-endian hex.
const FFDHE3072_P: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B66C62E37FFFFFFFFFFFFFFFF",
);

/// RFC 7919 ffdhe4096 prime, big-endian hex.
const FFDHE4096_P: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A",
    "7135C886EFB4318AED6A1E012D9E6832A907600A918130C46DC778F971AD0038",
    "092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E655F6AFFFFFFFFFFFFFFFF",
);

/// RFC 7919 ffdhe6144 prime, big-endian hex.
const FFDHE6144_P: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A",
    "7135C886EFB4318AED6A1E012D9E6832A907600A918130C46DC778F971AD0038",
    "092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E0DD9020BFD64B645036C7A",
    "4E677D2C38532A3A23BA4442CAF53EA63BB454329B7624C8917BDD64B1C0FD4C",
    "B38E8C334C701C3ACDAD0657FCCFEC719B1F5C3E4E46041F388147FB4CFDB477",
    "A52471F7A9A96910B855322EDB6340D8A00EF092350511E30ABEC1FFF9E3A26E",
    "7FB29F8C183023C3587E38DA0077D9B4763E4E4B94B2BBC194C6651E77CAF992",
    "EEAAC0232A281BF6B3A739C1226116820AE8DB5847A67CBEF9C9091B462D538C",
    "D72B03746AE77F5E62292C311562A846505DC82DB854338AE49F5235C95B9117",
    "8CCF2DD5CACEF403EC9D1810C6272B045B3B71F9DC6B80D63FDD4A8E9ADB1E69",
    "62A69526D43161C1A41D570D7938DAD4A40E329CD0E40E65FFFFFFFFFFFFFFFF",
);

/// RFC 7919 ffdhe8192 prime, big-endian hex.
const FFDHE8192_P: &str = concat!(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A",
    "7135C886EFB4318AED6A1E012D9E6832A907600A918130C46DC778F971AD0038",
    "092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E0DD9020BFD64B645036C7A",
    "4E677D2C38532A3A23BA4442CAF53EA63BB454329B7624C8917BDD64B1C0FD4C",
    "B38E8C334C701C3ACDAD0657FCCFEC719B1F5C3E4E46041F388147FB4CFDB477",
    "A52471F7A9A96910B855322EDB6340D8A00EF092350511E30ABEC1FFF9E3A26E",
    "7FB29F8C183023C3587E38DA0077D9B4763E4E4B94B2BBC194C6651E77CAF992",
    "EEAAC0232A281BF6B3A739C1226116820AE8DB5847A67CBEF9C9091B462D538C",
    "D72B03746AE77F5E62292C311562A846505DC82DB854338AE49F5235C95B9117",
    "8CCF2DD5CACEF403EC9D1810C6272B045B3B71F9DC6B80D63FDD4A8E9ADB1E69",
    "62A69526D43161C1A41D570D7938DAD4A40E329CCFF46AAA36AD004CF600C838",
    "1E425A31D951AE64FDB23FCEC9509D43687FEB69EDD1CC5E0B8CC3BDF64B10EF",
    "86B63142A3AB8829555B2F747C932665CB2C0F1CC01BD70229388839D2AF05E4",
    "54504AC78B7582822846C0BA35C35F5C59160CC046FD8251541FC68C9C86B022",
    "BB7099876A460E7451A8A93109703FEE1C217E6C3826E52C51AA691E0E423CFC",
    "99E9E31650C1217B624816CDAD9A95F9D5B8019488D9C0A0A1FE3075A577E231",
    "83F81D4A3F2FA4571EFC8CE0BA8A4FE8B6855DFE72B0A66EDED2FBABFBE58A30",
    "FAFABE1C5D71A87E2F741EF8C1FE86FEA6BBFDE530677F0D97D11D49F7A8443D",
    "0822E506A9F4614E011E2A94838FF88CD68C8BB7C5C6424CFFFFFFFFFFFFFFFF",
);

/// Why a Diffie-Hellman computation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DhError {
    /// The group is the null group (no exchange) or unknown.
    NoSuchGroup,
    /// The peer's value has the wrong length or lies outside 2..=p-2.
    InvalidPeerValue,
    /// No random bytes for the private exponent.
    Entropy,
}

impl From<EntropyError> for DhError {
    fn from(_: EntropyError) -> Self {
        Self::Entropy
    }
}

/// Size of the private exponent in bits (RFC 7919, Appendix A).
pub(crate) const fn exponent_bits(group: DhGroup) -> u32 {
    match group {
        DhGroup::Ffdhe2048 => 225,
        DhGroup::Ffdhe3072 => 275,
        DhGroup::Ffdhe4096 => 325,
        DhGroup::Ffdhe6144 => 375,
        _ => 400,
    }
}

fn prime_hex(group: DhGroup) -> Option<&'static str> {
    Some(match group {
        DhGroup::Ffdhe2048 => FFDHE2048_P,
        DhGroup::Ffdhe3072 => FFDHE3072_P,
        DhGroup::Ffdhe4096 => FFDHE4096_P,
        DhGroup::Ffdhe6144 => FFDHE6144_P,
        DhGroup::Ffdhe8192 => FFDHE8192_P,
        _ => return None,
    })
}

fn hex_to_bytes(hex: &str) -> Option<Vec<u8>> {
    let digits = hex.as_bytes();
    if digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// The prime of `group` and its Montgomery parameters, computed once per process.
struct Group {
    bits: u32,
    params: BoxedMontyParams,
    /// p - 1: peer values must be below it.
    p_minus_1: BoxedUint,
}

fn group(group: DhGroup) -> Option<&'static Group> {
    static GROUPS: [OnceLock<Option<Group>>; 5] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = GROUPS.get(usize::from(group.code()).checked_sub(1)?)?;
    slot.get_or_init(|| {
        let bytes = hex_to_bytes(prime_hex(group)?)?;
        let bits = u32::try_from(bytes.len() * 8).ok()?;
        let p = BoxedUint::from_be_slice(&bytes, bits).ok()?;
        let p_minus_1 = p.wrapping_sub(&BoxedUint::one_with_precision(bits));
        let odd = Option::<Odd<BoxedUint>>::from(Odd::new(p))?;
        Some(Group { bits, params: BoxedMontyParams::new_vartime(odd), p_minus_1 })
    })
    .as_ref()
}

/// The prime of `group`, big-endian, `group.value_len()` bytes; `None` for the null group.
#[cfg(test)]
pub(crate) fn prime(group: DhGroup) -> Option<Vec<u8>> {
    hex_to_bytes(prime_hex(group)?)
}

/// One side's ephemeral key pair for one authentication transaction.
pub(crate) struct KeyPair {
    group: DhGroup,
    private: Zeroizing<BoxedUint>,
    public: Vec<u8>,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("group", &self.group).finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair from `entropy`.
    pub(crate) fn generate(dh_group: DhGroup, entropy: &dyn Entropy) -> Result<Self, DhError> {
        let bits = exponent_bits(dh_group);
        let mut raw = Zeroizing::new(vec![0u8; bits.div_ceil(8) as usize]);
        entropy.fill(&mut raw)?;
        // Keep `bits` bits, the top one set.
        let excess = raw.len() as u32 * 8 - bits;
        if let Some(first) = raw.first_mut() {
            *first &= 0xff >> excess;
            *first |= 0x80 >> excess;
        }
        Self::from_private(dh_group, &raw)
    }

    /// The key pair with private exponent `private` (big-endian, at most [`exponent_bits`] bits).
    pub(crate) fn from_private(dh_group: DhGroup, private: &[u8]) -> Result<Self, DhError> {
        let g = group(dh_group).ok_or(DhError::NoSuchGroup)?;
        let bits = exponent_bits(dh_group);
        let x = Zeroizing::new(
            BoxedUint::from_be_slice(private, bits.next_multiple_of(64))
                .map_err(|_| DhError::InvalidPeerValue)?,
        );
        let generator = BoxedMontyForm::new(BoxedUint::from(2u8).widen(g.bits), g.params.clone());
        let public = generator.pow_bounded_exp(&x, bits).retrieve().to_be_bytes().into_vec();
        Ok(Self { group: dh_group, private: x, public })
    }

    /// g^x mod p, left-padded to the group size.
    pub(crate) fn public_value(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret peer^x mod p, left-padded to the group size, after checking the peer's value.
    pub(crate) fn shared_secret(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, DhError> {
        let g = group(self.group).ok_or(DhError::NoSuchGroup)?;
        if peer.len() != self.group.value_len() {
            return Err(DhError::InvalidPeerValue);
        }
        let y = BoxedUint::from_be_slice(peer, g.bits).map_err(|_| DhError::InvalidPeerValue)?;
        // 2 <= y <= p - 2 (public data: comparing in variable time is fine).
        if y <= BoxedUint::one_with_precision(g.bits) || y >= g.p_minus_1 {
            return Err(DhError::InvalidPeerValue);
        }
        let base = BoxedMontyForm::new(y, g.params.clone());
        let power = Zeroizing::new(base.pow_bounded_exp(&self.private, exponent_bits(self.group)));
        let s = Zeroizing::new(power.retrieve());
        Ok(Zeroizing::new(s.to_be_bytes().into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DeterministicEntropy;

    fn unhex(s: &str) -> Vec<u8> {
        hex_to_bytes(s).unwrap()
    }

    struct Vector {
        name: String,
        group: DhGroup,
        x: Vec<u8>,
        gx: Vec<u8>,
        peer: Vec<u8>,
        shared: Vec<u8>,
    }

    fn vectors() -> Vec<Vector> {
        let text = include_str!("../../tests/vectors/ffdhe.txt");
        let mut out = Vec::new();
        for block in text.split('[').skip(1) {
            let (name, body) = block.split_once(']').unwrap();
            let field = |k: &str| {
                body.lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")))
                    .unwrap_or_else(|| panic!("{name}: {k}"))
            };
            let group = match field("group") {
                "ffdhe2048" => DhGroup::Ffdhe2048,
                "ffdhe3072" => DhGroup::Ffdhe3072,
                "ffdhe4096" => DhGroup::Ffdhe4096,
                "ffdhe6144" => DhGroup::Ffdhe6144,
                "ffdhe8192" => DhGroup::Ffdhe8192,
                g => panic!("{g}"),
            };
            out.push(Vector {
                name: name.to_owned(),
                group,
                x: unhex(field("x")),
                gx: unhex(field("gx")),
                peer: unhex(field("peer")),
                shared: unhex(field("shared")),
            });
        }
        out
    }

    /// OpenSSL's key pairs and shared secrets for every group, byte for byte; this also checks the
    /// primes (a wrong prime gives other values).
    #[test]
    fn openssl_vectors_byte_exact() {
        let v = vectors();
        assert_eq!(v.len(), 7);
        for t in &v {
            let kp = KeyPair::from_private(t.group, &t.x).unwrap();
            assert_eq!(kp.public_value(), &t.gx[..], "{}: g^x", t.name);
            assert_eq!(kp.public_value().len(), t.group.value_len(), "{}: padded", t.name);
            assert_eq!(*kp.shared_secret(&t.peer).unwrap(), t.shared, "{}: shared secret", t.name);
        }
        assert_eq!(v.iter().filter(|t| t.gx[0] == 0 || t.shared[0] == 0).count(), 2, "leading-zero cases");
    }

    #[test]
    fn primes_are_the_rfc_7919_ones() {
        for (g, len) in [
            (DhGroup::Ffdhe2048, 256),
            (DhGroup::Ffdhe3072, 384),
            (DhGroup::Ffdhe4096, 512),
            (DhGroup::Ffdhe6144, 768),
            (DhGroup::Ffdhe8192, 1024),
        ] {
            let p = prime(g).unwrap();
            assert_eq!(p.len(), len);
            // RFC 7919: the top and bottom 64 bits are all ones, and the next bits are those of e.
            assert_eq!(p[..8], [0xff; 8]);
            assert_eq!(p[len - 8..], [0xff; 8]);
            assert_eq!(p[8..12], [0xad, 0xf8, 0x54, 0x58]);
        }
        assert!(prime(DhGroup::Null).is_none());
    }

    #[test]
    fn both_sides_agree_and_values_are_full_length() {
        let e = DeterministicEntropy::new(11);
        for g in [DhGroup::Ffdhe2048, DhGroup::Ffdhe3072] {
            let a = KeyPair::generate(g, &e).unwrap();
            let b = KeyPair::generate(g, &e).unwrap();
            assert_ne!(a.public_value(), b.public_value());
            let s1 = a.shared_secret(b.public_value()).unwrap();
            let s2 = b.shared_secret(a.public_value()).unwrap();
            assert_eq!(*s1, *s2);
            assert_eq!(s1.len(), g.value_len());
        }
    }

    #[test]
    fn peer_values_out_of_range_are_refused() {
        let kp = KeyPair::generate(DhGroup::Ffdhe2048, &DeterministicEntropy::new(1)).unwrap();
        let p = prime(DhGroup::Ffdhe2048).unwrap();
        let mut p_minus_1 = p.clone();
        *p_minus_1.last_mut().unwrap() -= 1;
        let mut two = vec![0u8; 256];
        two[255] = 2;
        let mut one = vec![0u8; 256];
        one[255] = 1;
        for bad in
            [vec![0u8; 256], one, p_minus_1, p, vec![0xff; 256], vec![2u8; 255], vec![2u8; 257], vec![]]
        {
            assert_eq!(kp.shared_secret(&bad).unwrap_err(), DhError::InvalidPeerValue, "{:?}", &bad.get(..4));
        }
        assert!(kp.shared_secret(&two).is_ok(), "2 is the smallest value allowed");
        assert_eq!(
            KeyPair::generate(DhGroup::Null, &DeterministicEntropy::new(1)).unwrap_err(),
            DhError::NoSuchGroup
        );
    }

    #[test]
    fn private_exponents_have_their_full_size() {
        let e = DeterministicEntropy::new(5);
        for g in [DhGroup::Ffdhe2048, DhGroup::Ffdhe8192] {
            let kp = KeyPair::generate(g, &e).unwrap();
            assert_eq!(kp.private.bits(), exponent_bits(g));
        }
    }
}
