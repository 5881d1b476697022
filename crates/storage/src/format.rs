//! The bytes on disk: file headers, checksummed records, and scanning them back.
//!
//! The layout is specified in `docs/storage-format.md`; keep the two in step. All integers are
//! little-endian and fixed-width except inside cursor snapshots, which use LEB128 varints.
//!
//! ```text
//! file header (64 bytes): magic[8] version:u16 header_len:u16 salt:u32
//!                         field0:u64 ... field4:u64 zero[4] crc32c(bytes 0..60):u32
//! record:                 body_len:u32 crc32c(body, seeded with the salt):u32 body[body_len]
//! ```

use std::path::Path;
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::io::IoFile;

/// Version of the on-disk format written by this build for files without a salt.
pub const FORMAT_VERSION: u16 = 1;
/// Version of a file with a salt (a segment written into a recycled file): its records'
/// checksums are seeded with the salt, which builds before it do not know.
pub const SALTED_FORMAT_VERSION: u16 = 2;
/// Length of every file header.
pub const HEADER_LEN: u64 = 64;
/// Length of a record's framing (length + checksum) before its body.
pub const RECORD_FRAMING_LEN: u64 = 8;

/// What a file holds; each kind has its own magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Entries of one ledger of a log. Fields: ledger id, first entry id, creation time (ms),
    /// and the position this segment continues: the previous segment's ledger id and the entry
    /// id after its last entry (both 0: not recorded, as in files written before they were).
    Segment,
    /// Snapshots of a log's cursors. Fields: the journal's generation (a random number that
    /// names this file instance; 0 in files written before it was recorded), then unused.
    CursorJournal,
    /// The engine's cursor write-ahead log (`<root>/cursors-<sequence>.wal`). Fields: unused.
    CursorWal,
    /// The engine's entry write-ahead log (`<root>/entries-<sequence>.wal`). Fields: unused.
    EntryWal,
}

impl FileKind {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            FileKind::Segment => b"MRDNSEG\x01",
            FileKind::CursorJournal => b"MRDNCUR\x01",
            FileKind::CursorWal => b"MRDNWAL\x01",
            FileKind::EntryWal => b"MRDNEWL\x01",
        }
    }
}

/// A decoded file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub kind: FileKind,
    pub fields: [u64; 5],
    /// Seeds the CRC32C of every record of the file (0: none, as in every file of version 1).
    /// A segment written into a recycled file gets a random non-zero salt, so that the records
    /// of the file's earlier life, still on disk beyond the new ones, never pass as its own.
    pub salt: u32,
}

impl FileHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut bytes = [0u8; HEADER_LEN as usize];
        bytes[0..8].copy_from_slice(self.kind.magic());
        let version = if self.salt == 0 {
            FORMAT_VERSION
        } else {
            SALTED_FORMAT_VERSION
        };
        bytes[8..10].copy_from_slice(&version.to_le_bytes());
        bytes[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        bytes[12..16].copy_from_slice(&self.salt.to_le_bytes());
        for (index, field) in self.fields.iter().enumerate() {
            let start = 16 + index * 8;
            bytes[start..start + 8].copy_from_slice(&field.to_le_bytes());
        }
        let checksum = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// Reads and validates the header of `file`. A header that is missing or torn is reported
    /// as `Corrupted` at offset 0; the caller decides whether that file may be a torn tail.
    pub fn read(file: &dyn IoFile, path: &Path, kind: FileKind) -> Result<FileHeader> {
        let mut bytes = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    StorageError::corrupted(path, 0, "file is shorter than its header")
                }
                _ => StorageError::io("read header", path, error),
            })?;
        if &bytes[0..8] != kind.magic() {
            return Err(StorageError::corrupted(
                path,
                0,
                format!("bad magic number for a {kind:?} file"),
            ));
        }
        let stored_checksum = u32::from_le_bytes([bytes[60], bytes[61], bytes[62], bytes[63]]);
        if crc32c::crc32c(&bytes[..60]) != stored_checksum {
            return Err(StorageError::corrupted(path, 0, "header checksum mismatch"));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        let salt = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        // Version 1 has zeros where the salt is; version 2 a salt that is not zero.
        let known = match version {
            FORMAT_VERSION => salt == 0,
            SALTED_FORMAT_VERSION => salt != 0,
            _ => false,
        };
        if !known {
            return Err(StorageError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
                supported: SALTED_FORMAT_VERSION,
            });
        }
        let mut fields = [0u64; 5];
        for (index, field) in fields.iter_mut().enumerate() {
            let start = 16 + index * 8;
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[start..start + 8]);
            *field = u64::from_le_bytes(word);
        }
        Ok(FileHeader { kind, fields, salt })
    }
}

/// Appends one record (framing + the concatenation of `body_parts`) to `out`.
pub fn encode_record(out: &mut Vec<u8>, body_parts: &[&[u8]]) {
    encode_salted_record(out, 0, body_parts);
}

/// [`encode_record`] for a file whose header has salt `salt`.
pub fn encode_salted_record(out: &mut Vec<u8>, salt: u32, body_parts: &[&[u8]]) {
    let body_len: usize = body_parts.iter().map(|part| part.len()).sum();
    let mut checksum = salt;
    for part in body_parts {
        checksum = crc32c::crc32c_append(checksum, part);
    }
    out.extend_from_slice(&record_framing(body_len, checksum));
    for part in body_parts {
        out.extend_from_slice(part);
    }
}

/// The framing in front of a record whose body is `body_len` bytes with CRC32C `checksum`.
pub fn record_framing(body_len: usize, checksum: u32) -> [u8; RECORD_FRAMING_LEN as usize] {
    let mut framing = [0u8; RECORD_FRAMING_LEN as usize];
    framing[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    framing[4..].copy_from_slice(&checksum.to_le_bytes());
    framing
}

/// The CRC32C of `A` followed by `B`, from `crc32c(A)`, `crc32c(B)` and `B`'s length, in a
/// few thousand instructions whatever the length (the `crc32c` crate's combine squares 32×32
/// bit matrices per length bit, which costs more than the hardware CRC of a 128 KiB entry).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    // Appending len_b bytes multiplies A's CRC by x^(8·len_b) modulo the polynomial; B's CRC
    // (with its own initial and final inversion) accounts for the rest.
    let mut shift = X_POW_0;
    let mut remaining = len_b;
    let mut power = 3; // x^(8·2^i) = x^(2^(i+3))
    while remaining != 0 {
        if remaining & 1 != 0 {
            shift = multiply_mod_crc32c(shift, X_POW_2K[power]);
        }
        remaining >>= 1;
        power += 1;
    }
    multiply_mod_crc32c(shift, crc_a) ^ crc_b
}

/// The CRC32C polynomial, bit-reversed: bit 31 is the coefficient of x^0, as in CRC values.
const CRC32C_POLYNOMIAL: u32 = 0x82F6_3B78;
/// x^0 in that bit order.
const X_POW_0: u32 = 1 << 31;
/// `X_POW_2K[k]` = x^(2^k) modulo the polynomial, for every length a `usize` can hold
/// (times 8 bits).
static X_POW_2K: [u32; 67] = powers_of_x();

const fn powers_of_x() -> [u32; 67] {
    let mut table = [0u32; 67];
    let mut power = X_POW_0 >> 1; // x^1
    let mut k = 0;
    while k < table.len() {
        table[k] = power;
        power = multiply_mod_crc32c(power, power);
        k += 1;
    }
    table
}

/// `a·b` modulo the CRC32C polynomial, both in CRC bit order.
const fn multiply_mod_crc32c(mut a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    // Walk a's coefficients from x^0 up, with b multiplied by x at each step.
    while a != 0 {
        if a & X_POW_0 != 0 {
            product ^= b;
        }
        a <<= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLYNOMIAL
        } else {
            b >> 1
        };
    }
    product
}

/// Validates one record held entirely in `bytes` and returns its body.
pub fn decode_record(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    decode_salted_record(bytes, 0)
}

/// [`decode_record`] for a file whose header has salt `salt`.
pub fn decode_salted_record(bytes: &[u8], salt: u32) -> std::result::Result<&[u8], String> {
    let framing = bytes
        .get(..RECORD_FRAMING_LEN as usize)
        .ok_or_else(|| "record shorter than its framing".to_string())?;
    let body_len = u32::from_le_bytes([framing[0], framing[1], framing[2], framing[3]]) as usize;
    let stored_checksum = u32::from_le_bytes([framing[4], framing[5], framing[6], framing[7]]);
    let body = bytes
        .get(RECORD_FRAMING_LEN as usize..RECORD_FRAMING_LEN as usize + body_len)
        .ok_or_else(|| format!("record body of {body_len} bytes runs past the end"))?;
    if crc32c::crc32c_append(salt, body) != stored_checksum {
        return Err("record checksum mismatch".to_string());
    }
    Ok(body)
}

/// How a scan of a file's records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte up to the end of the file belonged to a valid record.
    Clean,
    /// The record at `offset` is incomplete or invalid.
    Damaged { offset: u64, reason: String },
}

/// Reads a file's records from `start` to `end` in chunks, calling `on_record(offset, body)` for
/// each valid one. A record that fails its checksum, runs past `end`, or that `on_record` rejects
/// stops the scan with [`ScanEnd::Damaged`].
///
/// Validity depends only on the bytes and the file, never on today's configuration: a record
/// written under a larger entry limit than the one configured now is as valid as it was then.
/// A length field of garbage cannot make the scan allocate more than the file holds. `salt` is
/// the file header's.
pub fn scan_records(
    file: &dyn IoFile,
    path: &Path,
    start: u64,
    end: u64,
    salt: u32,
    mut on_record: impl FnMut(u64, &[u8]) -> std::result::Result<(), String>,
) -> Result<ScanEnd> {
    const CHUNK: u64 = 1 << 20;
    let mut buffer: Vec<u8> = Vec::new();
    let mut buffer_start = start;
    let mut offset = start;
    // Makes sure bytes [offset, offset + wanted) are in the buffer; false if the file ends first.
    let fill =
        |buffer: &mut Vec<u8>, buffer_start: &mut u64, offset: u64, wanted: u64| -> Result<bool> {
            if offset + wanted > end {
                return Ok(false);
            }
            let have_end = *buffer_start + buffer.len() as u64;
            if offset + wanted <= have_end {
                return Ok(true);
            }
            let consumed = (offset - *buffer_start) as usize;
            buffer.drain(..consumed);
            *buffer_start = offset;
            let read_from = *buffer_start + buffer.len() as u64;
            let read_to = (offset + wanted.max(CHUNK)).min(end);
            let old_len = buffer.len();
            buffer.resize(old_len + (read_to - read_from) as usize, 0);
            file.read_exact_at(&mut buffer[old_len..], read_from)
                .map_err(|error| StorageError::io("read", path, error))?;
            Ok(true)
        };
    while offset < end {
        if !fill(&mut buffer, &mut buffer_start, offset, RECORD_FRAMING_LEN)? {
            return Ok(ScanEnd::Damaged {
                offset,
                reason: "partial record framing at end of file".into(),
            });
        }
        let at = (offset - buffer_start) as usize;
        let body_len =
            u32::from_le_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]]) as u64;
        let record_len = RECORD_FRAMING_LEN + body_len;
        if !fill(&mut buffer, &mut buffer_start, offset, record_len)? {
            return Ok(ScanEnd::Damaged {
                offset,
                reason: format!("record of {record_len} bytes runs past the end of the file"),
            });
        }
        let at = (offset - buffer_start) as usize;
        let record = &buffer[at..at + record_len as usize];
        let body = match decode_salted_record(record, salt) {
            Ok(body) => body,
            Err(reason) => return Ok(ScanEnd::Damaged { offset, reason }),
        };
        if let Err(reason) = on_record(offset, body) {
            return Ok(ScanEnd::Damaged { offset, reason });
        }
        offset += record_len;
    }
    Ok(ScanEnd::Clean)
}

/// Looks for any valid record after the damaged record at `damaged_at`. Used to tell a torn
/// tail (nothing valid follows the damage: the unsynced end of the last write) from interior
/// corruption (valid records follow: bytes that were once durable went bad). `plausible`
/// cheaply filters candidate bodies before their checksum is computed.
///
/// The search starts where the damaged record claims to end, never inside it: its body is an
/// entry whose bytes a producer chooses, and may well hold a valid record. A damaged record
/// whose framing is cut off, or whose length reaches past the end of the file, is the last one
/// written, torn: nothing follows it.
pub fn valid_record_follows(
    file: &dyn IoFile,
    path: &Path,
    damaged_at: u64,
    end: u64,
    plausible: impl Fn(&[u8]) -> bool,
) -> Result<Option<u64>> {
    if damaged_at + RECORD_FRAMING_LEN > end {
        return Ok(None);
    }
    let mut framing = [0u8; RECORD_FRAMING_LEN as usize];
    file.read_exact_at(&mut framing, damaged_at)
        .map_err(|error| StorageError::io("read", path, error))?;
    let body_len = u32::from_le_bytes([framing[0], framing[1], framing[2], framing[3]]) as u64;
    let first = damaged_at + RECORD_FRAMING_LEN + body_len;
    if first >= end {
        return Ok(None);
    }
    let mut bytes = vec![0u8; (end - first) as usize];
    file.read_exact_at(&mut bytes, first)
        .map_err(|error| StorageError::io("read", path, error))?;
    for at in 0..bytes.len() {
        let Some(framing) = bytes.get(at..at + RECORD_FRAMING_LEN as usize) else {
            break;
        };
        let body_len = u32::from_le_bytes([framing[0], framing[1], framing[2], framing[3]]) as u64;
        let body_start = at + RECORD_FRAMING_LEN as usize;
        let Some(body) = bytes.get(body_start..body_start.saturating_add(body_len as usize)) else {
            continue;
        };
        if plausible(body) && decode_record(&bytes[at..body_start + body.len()]).is_ok() {
            return Ok(Some(first + at as u64));
        }
    }
    Ok(None)
}

/// A random non-zero salt for a file written over its earlier life (a recycled segment, an
/// entry WAL file), so that the records of that life never pass for its own.
pub(crate) fn fresh_salt() -> u32 {
    let random = crate::cursor::fresh_generation();
    ((random >> 32) as u32 ^ random as u32).max(1)
}

/// Creates a file with `header`, makes it and its directory entry durable, and returns it.
pub fn create_file(
    io: &dyn crate::io::Io,
    path: &Path,
    header: FileHeader,
) -> Result<Arc<dyn IoFile>> {
    let file = io
        .create(path)
        .map_err(|error| StorageError::io("create", path, error))?;
    file.write_all_at(&header.encode(), 0)
        .map_err(|error| StorageError::io("write header", path, error))?;
    file.sync()
        .map_err(|error| StorageError::io("fsync", path, error))?;
    let directory = crate::io::parent_dir(path);
    io.sync_dir(&directory)
        .map_err(|error| StorageError::io("fsync directory", &directory, error))?;
    Ok(file)
}

/// Makes the retired file `free` the file `path` with `header`, to be written over from the
/// header on: the header is written and synced while the file still has its free name (a crash
/// leaves a free file), then the file is renamed, durably. The bytes after the header stay as
/// they were, records of the file's earlier life, which fail the checksums of the new header's
/// salt. If a step fails, the free file is removed if it is still there, and the caller
/// creates a new file (a rename that happened but could not be made durable leaves `path`
/// taken: the creation fails on it).
pub(crate) fn recycle_file(
    io: &dyn crate::io::Io,
    free: &Path,
    path: &Path,
    header: FileHeader,
) -> Result<Arc<dyn IoFile>> {
    let recycled = (|| {
        let file = io
            .open(free)
            .map_err(|error| StorageError::io("open", free, error))?;
        file.write_all_at(&header.encode(), 0)
            .map_err(|error| StorageError::io("write header", free, error))?;
        file.sync()
            .map_err(|error| StorageError::io("fsync", free, error))?;
        io.rename(free, path)
            .map_err(|error| StorageError::io("rename", free, error))?;
        let directory = crate::io::parent_dir(path);
        io.sync_dir(&directory)
            .map_err(|error| StorageError::io("fsync directory", &directory, error))?;
        Ok(file)
    })();
    if recycled.is_err() && io.exists(free) {
        let _ = io.remove_file(free);
    }
    recycled
}

/// Little-endian and varint encoding into a byte vector.
#[derive(Default)]
pub struct ByteWriter {
    pub bytes: Vec<u8>,
}

impl ByteWriter {
    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.bytes.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.bytes.push(value as u8);
    }

    /// A length-prefixed byte string.
    pub fn bytes(&mut self, value: &[u8]) {
        self.varint(value.len() as u64);
        self.bytes.extend_from_slice(value);
    }
}

/// The reading side of [`ByteWriter`]; every read fails cleanly on short input.
pub struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        ByteReader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }

    fn take(&mut self, count: usize) -> std::result::Result<&'a [u8], String> {
        if self.bytes.len() < count {
            return Err(format!(
                "needed {count} more bytes, found {}",
                self.bytes.len()
            ));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    pub fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut word = [0u8; 8];
        word.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(word))
    }

    pub fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 64 bits".into())
    }

    pub fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let length = usize::try_from(self.varint()?).map_err(|error| error.to_string())?;
        self.take(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_checksums_equal_the_checksum_of_the_concatenation() {
        let bytes: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for split in [0, 1, 6, 7, 63, 64, 4096, 131_071, 131_072, 199_999, 200_000] {
            let (a, b) = bytes.split_at(split);
            assert_eq!(
                crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len()),
                crc32c::crc32c(&bytes),
                "split at {split}"
            );
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let header = FileHeader {
            kind: FileKind::Segment,
            fields: [7, 42, 1_700_000_000_000, 6, 99],
            salt: 0,
        };
        let io = crate::SimIo::new();
        let path = Path::new("/x/header");
        let file = create_file(&io, path, header).expect("create");
        assert_eq!(
            FileHeader::read(file.as_ref(), path, FileKind::Segment).expect("read"),
            header
        );
        assert!(FileHeader::read(file.as_ref(), path, FileKind::CursorJournal).is_err());
        let mut bytes = header.encode().to_vec();
        bytes[20] ^= 1;
        io.write_file(path, bytes).expect("damage");
        let error = FileHeader::read(file.as_ref(), path, FileKind::Segment).expect_err("damaged");
        assert!(error.to_string().contains("header checksum"), "{error}");
    }

    #[test]
    fn varints_round_trip() {
        let mut writer = ByteWriter::default();
        let values = [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX];
        for value in values {
            writer.varint(value);
        }
        let mut reader = ByteReader::new(&writer.bytes);
        for value in values {
            assert_eq!(reader.varint().expect("varint"), value);
        }
        assert!(reader.is_empty());
        assert!(reader.varint().is_err());
    }
}
