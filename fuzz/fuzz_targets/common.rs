// Shared by the fuzz targets: the first two input bytes choose the decoder configuration.

use nvmeof_proto::{DecoderConfig, Digests, Direction, EncodeOptions};

/// Splits `data` into a decoder configuration (from its first two bytes) and the rest.
pub fn config(data: &[u8]) -> Option<(DecoderConfig, EncodeOptions, &[u8])> {
    let (&[mode, pda], rest) = data.split_first_chunk::<2>()?;
    let direction = match mode & 0x3 {
        1 => Some(Direction::HostToController),
        2 => Some(Direction::ControllerToHost),
        _ => None,
    };
    let digests = Digests { header: mode & 0x4 != 0, data: mode & 0x8 != 0 };
    let pda = pda & 0x1f;
    let cfg = DecoderConfig { direction, digests, pda, max_capsule_data: 8192, max_data_pdu: 64 * 1024 };
    Some((cfg, EncodeOptions { digests, pda }, rest))
}
