//! The envelope around every object: a header naming the format version and the object kind,
//! the payload (optionally LZ4-compressed), and a CRC-32 over everything before it.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "CAIR"
//! 4       2     format version, u16 LE
//! 6       1     kind (see ObjectKind)
//! 7       1     flags: bit 0 = payload is LZ4 block-compressed (with its size prepended)
//! 8       8     stored payload length N, u64 LE
//! 16      N     payload
//! 16+N    4     CRC-32 (IEEE) of bytes 0..16+N, u32 LE
//! ```
//! A flipped bit anywhere, a truncation, or trailing garbage is detected before any payload is
//! interpreted.

use crate::{Error, Result, FORMAT_VERSION};

const MAGIC: &[u8; 4] = b"CAIR";
const HEADER: usize = 16;
const TRAILER: usize = 4;
const FLAG_LZ4: u8 = 1;

/// What an object holds; stored in its header so a misplaced object is never misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// `metadata` and `metadata.copy` (JSON [`crate::JobMetadata`]).
    Metadata = 1,
    /// `log/<batch>.plan` (JSON [`crate::BatchPlan`]).
    Plan = 2,
    /// `log/<batch>.commit` (JSON [`crate::BatchCommit`]).
    Commit = 3,
    /// `state/<batch>-<parent>.delta` (binary, LZ4-compressed state checkpoint).
    StateDelta = 4,
    /// `state/<batch>.full` (binary, LZ4-compressed state checkpoint).
    StateFull = 5,
    /// A lease claim or heartbeat, `lease/<epoch>.claim` or `.heartbeat` (JSON
    /// [`crate::LeaseRecord`]).
    Lease = 6,
    /// A lease epoch's fence record (format version 2).
    Fence = 7,
    /// A block of a receiver's write-ahead log, `receivers/<name>/<seq>.wal` (binary
    /// [`crate::wal::WalBlock`]).
    WalBlock = 8,
    /// The directory at the head of a member log object, `members/<member>/<seq>-<tasks>.log`
    /// (format version 5; JSON, followed in the object by the framed entries it lists).
    MemberLog = 9,
}

impl ObjectKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Metadata,
            2 => Self::Plan,
            3 => Self::Commit,
            4 => Self::StateDelta,
            5 => Self::StateFull,
            6 => Self::Lease,
            7 => Self::Fence,
            8 => Self::WalBlock,
            9 => Self::MemberLog,
            _ => return None,
        })
    }
}

/// Wraps a payload. `compress` chooses LZ4 for large binary payloads.
///
/// ```
/// use cairn_checkpoint::frame::{encode, decode, ObjectKind};
/// let bytes = encode(ObjectKind::Plan, b"{}", false);
/// assert_eq!(decode("x", &bytes, ObjectKind::Plan).unwrap(), b"{}");
/// let mut bad = bytes.clone();
/// bad[17] ^= 1;
/// assert!(decode("x", &bad, ObjectKind::Plan).is_err());
/// ```
pub fn encode(kind: ObjectKind, payload: &[u8], compress: bool) -> Vec<u8> {
    let compressed;
    let (flags, body) = if compress {
        compressed = lz4_flex::compress_prepend_size(payload);
        (FLAG_LZ4, compressed.as_slice())
    } else {
        (0, payload)
    };
    let mut out = Vec::with_capacity(HEADER + body.len() + TRAILER);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The length of the whole framed object whose first bytes are `head`, read from its header;
/// `None` when `head` is shorter than a header or does not start like a cairn object. Readers of
/// an object that holds several framed objects back to back use it to find where one ends.
///
/// ```
/// use cairn_checkpoint::frame::{encode, framed_len, ObjectKind};
/// let bytes = encode(ObjectKind::Plan, b"{}", false);
/// assert_eq!(framed_len(&bytes[..16]), Some(bytes.len() as u64));
/// assert_eq!(framed_len(b"CAIR"), None);
/// ```
pub fn framed_len(head: &[u8]) -> Option<u64> {
    if head.len() < HEADER || &head[0..4] != MAGIC {
        return None;
    }
    let stored = u64::from_le_bytes(head[8..16].try_into().ok()?);
    (HEADER as u64).checked_add(stored)?.checked_add(TRAILER as u64)
}

/// Checks and unwraps an object; `path` is only used in error messages.
pub fn decode(path: &str, bytes: &[u8], expected: ObjectKind) -> Result<Vec<u8>> {
    let (kind, payload) = decode_any(path, bytes)?;
    if kind != expected {
        return Err(Error::corrupt(
            path,
            format!("holds a {kind:?} object where a {expected:?} was expected"),
        ));
    }
    Ok(payload)
}

/// Checks and unwraps an object of any kind.
pub fn decode_any(path: &str, bytes: &[u8]) -> Result<(ObjectKind, Vec<u8>)> {
    decode_versioned(path, bytes).map(|(_, kind, payload)| (kind, payload))
}

/// Checks and unwraps an object of any kind, returning its format version too (binary payloads
/// whose layout grew between versions need it).
pub fn decode_versioned(path: &str, bytes: &[u8]) -> Result<(u16, ObjectKind, Vec<u8>)> {
    if bytes.len() < HEADER + TRAILER {
        return Err(Error::corrupt(
            path,
            format!("truncated: {} bytes, a header alone is {}", bytes.len(), HEADER + TRAILER),
        ));
    }
    if &bytes[0..4] != MAGIC {
        return Err(Error::corrupt(path, "not a cairn object (bad magic)"));
    }
    let stored_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let expected_total = (HEADER as u64).saturating_add(stored_len).saturating_add(TRAILER as u64);
    if expected_total != bytes.len() as u64 {
        return Err(Error::corrupt(path, format!("length mismatch: header says {expected_total} bytes, object has {} (torn or truncated write)", bytes.len())));
    }
    let body_end = HEADER + stored_len as usize;
    let crc = u32::from_le_bytes(bytes[body_end..].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..body_end]) != crc {
        return Err(Error::corrupt(path, "checksum mismatch"));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version == 0 || version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let kind = ObjectKind::from_u8(bytes[6])
        .ok_or_else(|| Error::corrupt(path, format!("unknown object kind {}", bytes[6])))?;
    let body = &bytes[HEADER..body_end];
    let payload = match bytes[7] {
        0 => body.to_vec(),
        FLAG_LZ4 => lz4_flex::decompress_size_prepended(body)
            .map_err(|e| Error::corrupt(path, format!("bad compressed payload: {e}")))?,
        f => return Err(Error::corrupt(path, format!("unknown flags {f:#x}"))),
    };
    Ok((version, kind, payload))
}
