//! The GPT partition table of the A/B disk, written in place: only the attribute
//! fields of the entries asked for, the two entry-array CRCs and the two header CRCs
//! change. Every other byte of both headers and both entry arrays stays as it was, so
//! entry numbers (what `/dev/sda9` means), names, GUIDs and the gaps a real Flatcar
//! disk has between its entries are never touched.
//!
//! It refuses to write a table whose headers or arrays do not verify: it never
//! "repairs" a disk it does not understand.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::Path,
};

use thiserror::Error;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// Where the attribute field sits in an entry.
const ATTRIBUTES_AT: usize = 48;

/// Why the table could not be read or written.
#[derive(Debug, Error)]
pub enum TableError {
    /// Reading or writing the device failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The table is not one this code writes in place.
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TableError {
    let what = what.into();
    move |source| TableError::Io { what, source }
}

/// One GPT header, as found on the disk.
#[derive(Debug, Clone)]
struct Header {
    /// Its LBA.
    lba: u64,
    /// Its bytes (`header_size` of them).
    bytes: Vec<u8>,
    /// Where its entry array starts.
    entries_lba: u64,
    /// How many entries the array holds.
    count: u32,
    /// The size of one entry.
    entry_size: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The CRC of a header, computed with its CRC field zeroed.
fn header_crc(bytes: &[u8]) -> u32 {
    let mut copy = bytes.to_vec();
    copy[16..20].fill(0);
    CRC32.checksum(&copy)
}

fn read_at(file: &mut File, at: u64, len: usize, what: &str) -> Result<Vec<u8>, TableError> {
    file.seek(SeekFrom::Start(at)).map_err(io(what))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf).map_err(io(what))?;
    Ok(buf)
}

fn write_at(file: &mut File, at: u64, bytes: &[u8], what: &str) -> Result<(), TableError> {
    file.seek(SeekFrom::Start(at)).map_err(io(what))?;
    file.write_all(bytes).map_err(io(what))
}

impl Header {
    /// Reads and verifies the header at `lba`.
    fn read(file: &mut File, lba: u64, block: u64, which: &str) -> Result<Header, TableError> {
        let first = read_at(
            file,
            lba * block,
            92,
            &format!("reading the {which} GPT header"),
        )?;
        if &first[0..8] != SIGNATURE {
            return Err(TableError::Invalid(format!(
                "no GPT {which} header at LBA {lba}"
            )));
        }
        let size = le_u32(&first, 12) as usize;
        if !(92..=block as usize).contains(&size) {
            return Err(TableError::Invalid(format!(
                "the {which} GPT header claims {size} bytes"
            )));
        }
        let bytes = read_at(
            file,
            lba * block,
            size,
            &format!("reading the {which} GPT header"),
        )?;
        if header_crc(&bytes) != le_u32(&bytes, 16) {
            return Err(TableError::Invalid(format!(
                "the {which} GPT header's CRC does not verify: not writing to this disk"
            )));
        }
        let header = Header {
            lba,
            entries_lba: le_u64(&bytes, 72),
            count: le_u32(&bytes, 80),
            entry_size: le_u32(&bytes, 84),
            bytes,
        };
        if header.entry_size < 128 || header.count == 0 || header.count > 4096 {
            return Err(TableError::Invalid(format!(
                "the {which} GPT header describes {} entries of {} bytes",
                header.count, header.entry_size
            )));
        }
        Ok(header)
    }

    fn array_len(&self) -> usize {
        self.count as usize * self.entry_size as usize
    }
}

/// The logical block size of the disk: where the primary header is found.
fn block_size(file: &mut File) -> Result<u64, TableError> {
    for block in [512u64, 4096] {
        if let Ok(sig) = read_at(file, block, 8, "looking for the GPT header")
            && sig == SIGNATURE
        {
            return Ok(block);
        }
    }
    Err(TableError::Invalid(
        "no GPT header at LBA 1 (for 512- or 4096-byte blocks)".into(),
    ))
}

/// Rewrites the attribute field of each entry in `numbers` (1-based entry indices, as
/// in `/dev/sda9`) to `f(number, current)`, in the backup table then in the primary,
/// and syncs the device. An entry that is empty is an error, and nothing is written.
pub fn set_attributes(
    path: &Path,
    numbers: &[u32],
    f: impl Fn(u32, u64) -> u64,
) -> Result<(), TableError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let block = block_size(&mut file)?;
    let primary = Header::read(&mut file, 1, block, "primary")?;
    let backup = Header::read(&mut file, le_u64(&primary.bytes, 32), block, "backup")?;
    let mut updates = Vec::new();
    for (which, header) in [("backup", &backup), ("primary", &primary)] {
        let what = format!("reading the {which} GPT entries");
        let mut array = read_at(
            &mut file,
            header.entries_lba * block,
            header.array_len(),
            &what,
        )?;
        if CRC32.checksum(&array) != le_u32(&header.bytes, 88) {
            return Err(TableError::Invalid(format!(
                "the {which} GPT entry array's CRC does not verify: not writing to this disk"
            )));
        }
        for number in numbers {
            let index = number
                .checked_sub(1)
                .filter(|i| *i < header.count)
                .ok_or_else(|| TableError::Invalid(format!("no GPT entry {number}")))?;
            let at = index as usize * header.entry_size as usize;
            if array[at..at + 16].iter().all(|b| *b == 0) {
                return Err(TableError::Invalid(format!("GPT entry {number} is empty")));
            }
            let flags = f(*number, le_u64(&array, at + ATTRIBUTES_AT));
            array[at + ATTRIBUTES_AT..at + ATTRIBUTES_AT + 8].copy_from_slice(&flags.to_le_bytes());
        }
        let mut bytes = header.bytes.clone();
        bytes[88..92].copy_from_slice(&CRC32.checksum(&array).to_le_bytes());
        let crc = header_crc(&bytes);
        bytes[16..20].copy_from_slice(&crc.to_le_bytes());
        updates.push((which, header.clone(), array, bytes));
    }
    // Backup first: a crash between the two leaves a primary that still verifies.
    for (which, header, array, bytes) in updates {
        let what = format!("writing the {which} GPT table");
        write_at(&mut file, header.entries_lba * block, &array, &what)?;
        write_at(&mut file, header.lba * block, &bytes, &what)?;
        file.sync_data().map_err(io(&what))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_that_does_not_verify_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        crate::slot::create_image(&image, ["USR-A", "USR-B"], 1 << 20).unwrap();
        let before = std::fs::read(&image).unwrap();
        // Corrupt one byte of the primary entry array (entry 1's name).
        let mut bytes = before.clone();
        bytes[2 * 512 + 60] ^= 0xff;
        std::fs::write(&image, &bytes).unwrap();
        let err = set_attributes(&image, &[1], |_, f| f | 1).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        assert_eq!(std::fs::read(&image).unwrap(), bytes, "nothing written");
        // An empty entry is refused too.
        std::fs::write(&image, &before).unwrap();
        let err = set_attributes(&image, &[7], |_, f| f | 1).unwrap_err();
        assert!(err.to_string().contains("entry 7 is empty"), "{err}");
        assert_eq!(std::fs::read(&image).unwrap(), before);
    }
}
