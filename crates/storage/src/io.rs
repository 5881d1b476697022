//! The one seam between the storage engine and the file system.
//!
//! Everything the engine does to disk goes through [`Io`] and [`IoFile`]. [`RealIo`] uses the
//! operating system; [`crate::SimIo`] keeps files in memory, separates what was written from what
//! was made durable, and can crash, tear writes, fill up or fail on demand, so that the recovery
//! paths are tested without real power cuts.
//!
//! The contract mirrors POSIX: bytes written with [`IoFile::write_at`] are durable only after
//! [`IoFile::sync`]; a created, renamed or removed directory entry is durable only after
//! [`Io::sync_dir`] on its parent.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file opened for positional reads and writes.
pub trait IoFile: Send + Sync {
    /// Reads exactly `buffer.len()` bytes at `offset`, or fails with `UnexpectedEof`.
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()>;
    /// Appends exactly `len` bytes read at `offset` to `buffer`, or fails with `UnexpectedEof`
    /// (then `buffer` may hold part of them). The default zeroes the room first and reads
    /// into it; [`RealIo`]'s files read into the vector's spare capacity as it is: a read of
    /// megabytes for a consumer catching up is not preceded by a pass writing zeros.
    fn read_exact_at_into(&self, buffer: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let start = buffer.len();
        buffer.resize(start + len, 0);
        self.read_exact_at(&mut buffer[start..], offset)
    }
    /// Writes all of `bytes` at `offset`.
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the concatenation of `parts` at `offset`, as [`IoFile::write_all_at`] would
    /// write it in one piece. The default copies the parts together first; [`RealIo`]'s files
    /// hand them to the kernel as they are (`pwritev`).
    fn write_all_vectored_at(&self, parts: &[&[u8]], offset: u64) -> io::Result<()> {
        self.write_all_at(&parts.concat(), offset)
    }
    /// Makes every byte written so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current size of the file in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends the file to `length` bytes.
    fn set_len(&self, length: u64) -> io::Result<()>;
}

/// File-system operations on paths.
pub trait Io: Send + Sync {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names (not paths) of the entries of a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn IoFile>>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn IoFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

struct RealFile {
    file: File,
}

impl IoFile for RealFile {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buffer, offset)
    }

    fn read_exact_at_into(&self, buffer: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
        let start = buffer.len();
        let target = start + len;
        buffer.reserve(len);
        while buffer.len() < target {
            // The spare capacity may be larger than asked: a read may go past `len` (within
            // the file), and the surplus is cut off below.
            let at = offset + (buffer.len() - start) as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(buffer), at) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
        buffer.truncate(target);
        Ok(())
    }

    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    fn write_all_vectored_at(&self, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
        let mut slices: Vec<io::IoSlice<'_>> = parts
            .iter()
            .filter(|part| !part.is_empty())
            .map(|part| io::IoSlice::new(part))
            .collect();
        let mut remaining = &mut slices[..];
        while !remaining.is_empty() {
            // rustix hands the kernel at most IOV_MAX slices per call; the loop does the rest.
            match rustix::io::pwritev(&self.file, remaining, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    offset += written as u64;
                    io::IoSlice::advance_slices(&mut remaining, written);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, length: u64) -> io::Result<()> {
        self.file.set_len(length)
    }
}

impl Io for RealIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(RealFile { file }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(RealFile { file }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

/// Creates `path` and any missing parents, and makes each new directory's entry durable by
/// fsyncing its parent: a directory whose entry is not durable can vanish in a power cut, and
/// everything in it with it.
pub(crate) fn create_dir_durable(io: &dyn Io, path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .take_while(|ancestor| !io.exists(ancestor))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    io.create_dir_all(path)?;
    for directory in missing {
        io.sync_dir(&parent_dir(directory))?;
    }
    Ok(())
}

/// The parent directory of a path inside the engine's tree (which always has one).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vectored_write_of_more_slices_than_one_call_takes_lands_whole_and_in_order() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("file");
        let file = RealIo.create(&path).expect("create");
        let parts: Vec<Vec<u8>> = (0..3000u32)
            .map(|index| vec![(index % 251) as u8; (index % 7) as usize])
            .collect();
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        file.write_all_at(b"head", 0).expect("write");
        file.write_all_vectored_at(&slices, 4)
            .expect("vectored write");
        let mut expected = b"head".to_vec();
        expected.extend(parts.concat());
        assert_eq!(fs::read(&path).expect("read"), expected);
    }
}
