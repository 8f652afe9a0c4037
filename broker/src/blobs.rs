//! Firmware images, read in chunks for devices' `devices/D/fetch` requests.
//!
//! The controller stores each published image as `<firmware_dir>/<sha256>`
//! (lowercase hex, written atomically: temp file, fsync, rename), so a name
//! always means the same bytes. The edge opens an image once, keeps a few
//! open files ([`OPEN_FILES`]) and reads each chunk with `read_at` straight
//! into the connection's write buffer: no copy of an image per device, and
//! memory in use is only the chunks being written (one per fetching
//! connection at most, since the pump writes each answer out before it
//! reads the next packet).
//!
//! Reads are synchronous, inside the connection's task: a chunk is at most
//! [`MAX_CHUNK`] (64 KiB), an image being rolled out is read by every
//! device and so stays in the page cache, and a page-cache copy of 64 KiB
//! takes microseconds, less than handing it to a blocking thread and back
//! would. A cold first read of an image stalls one worker for one disk
//! read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cityplane_proto::firmware::{encode_blob, is_sha256_hex, BlobHeader, FetchRequest, MAX_CHUNK};

/// Images kept open. A rollout serves one image (two while a new one is
/// published next to the old); a few more cost a descriptor each.
pub const OPEN_FILES: usize = 8;

/// Why a fetch gets no bytes; [`BlobError::code`] goes into the blob
/// header's `error` (docs/PROTOCOL.md, "Firmware").
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("no_firmware_store")]
    NoStore,
    #[error("not_found")]
    NotFound,
    #[error("out_of_range")]
    OutOfRange { total: u64 },
    /// Not a name of an image (checked before it becomes a path).
    #[error("bad_request: sha256 must be 64 lowercase hex digits")]
    BadName,
    #[error("unavailable: {0}")]
    Io(io::Error),
}

impl BlobError {
    /// The image's size when it is known (for the header's `total`).
    pub fn total(&self) -> u64 {
        match self {
            BlobError::OutOfRange { total } => *total,
            _ => 0,
        }
    }
}

/// One open image; its size is read once, at open (a name is never
/// rewritten in place, see the module docs).
#[derive(Debug)]
pub struct Image {
    file: File,
    len: u64,
}

impl Image {
    pub fn total(&self) -> u64 {
        self.len
    }

    /// Fills `buf` from `offset`. A file cut short under us (someone
    /// truncated it in place) is an error, not short data.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// What to send for one valid request: `len` bytes of `image` at `offset`.
#[derive(Debug)]
pub struct Chunk {
    pub image: Arc<Image>,
    pub offset: u64,
    pub len: usize,
}

#[derive(Debug)]
pub struct Blobs {
    dir: Option<PathBuf>,
    /// Most recently used last. Only found images are kept: one that is
    /// not there yet may be published in a moment.
    open: Mutex<Vec<(String, Arc<Image>)>>,
}

impl Blobs {
    pub fn new(dir: Option<PathBuf>) -> Blobs {
        Blobs {
            dir,
            open: Mutex::new(Vec::with_capacity(OPEN_FILES)),
        }
    }

    /// The chunk a request asks for: its length clamped to [`MAX_CHUNK`]
    /// and to the end of the image (at the end: zero bytes).
    pub fn locate(&self, req: &FetchRequest) -> Result<Chunk, BlobError> {
        let image = self.image(&req.sha256)?;
        let total = image.total();
        if req.offset > total {
            return Err(BlobError::OutOfRange { total });
        }
        let len = u64::from(req.length.min(MAX_CHUNK)).min(total - req.offset);
        Ok(Chunk {
            image,
            offset: req.offset,
            // At most MAX_CHUNK: fits.
            len: usize::try_from(len).unwrap_or(0),
        })
    }

    /// The whole answer to a fetch as one blob payload (header and bytes),
    /// for a server that publishes it rather than writing it into a
    /// connection (`cityplane controller` behind an external broker).
    pub fn answer(&self, req: &FetchRequest) -> Vec<u8> {
        let header = |offset, total, error| BlobHeader {
            sha256: req.sha256.clone(),
            offset,
            total,
            error,
        };
        let served = self.locate(req).and_then(|chunk| {
            let mut bytes = vec![0; chunk.len];
            chunk
                .image
                .read_into(chunk.offset, &mut bytes)
                .map_err(BlobError::Io)?;
            Ok(encode_blob(
                &header(chunk.offset, chunk.image.total(), None),
                &bytes,
            ))
        });
        served.unwrap_or_else(|e| {
            encode_blob(&header(req.offset, e.total(), Some(e.to_string())), &[])
        })
    }

    fn image(&self, sha256: &str) -> Result<Arc<Image>, BlobError> {
        let dir = self.dir.as_ref().ok_or(BlobError::NoStore)?;
        // The name becomes a path: only 64 hex digits, so no `/`, no `..`.
        if !is_sha256_hex(sha256) {
            return Err(BlobError::BadName);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = open.iter().position(|(name, _)| name == sha256) {
            let entry = open.remove(at);
            let image = entry.1.clone();
            open.push(entry);
            return Ok(image);
        }
        let file = match File::open(dir.join(sha256)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(e) => return Err(BlobError::Io(e)),
        };
        let meta = file.metadata().map_err(BlobError::Io)?;
        if !meta.is_file() {
            return Err(BlobError::NotFound);
        }
        let image = Arc::new(Image {
            file,
            len: meta.len(),
        });
        if open.len() >= OPEN_FILES {
            open.remove(0);
        }
        open.push((sha256.to_owned(), image.clone()));
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sha256: &str, offset: u64, length: u32) -> FetchRequest {
        FetchRequest {
            sha256: sha256.into(),
            offset,
            length,
        }
    }

    #[test]
    fn chunks_are_clamped_to_the_limit_and_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = "ab".repeat(32);
        let bytes: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        std::fs::write(dir.path().join(&name), &bytes).expect("write");
        let blobs = Blobs::new(Some(dir.path().to_owned()));
        let read = |offset, length| {
            let chunk = blobs
                .locate(&request(&name, offset, length))
                .expect("chunk");
            let mut buf = vec![0; chunk.len];
            chunk.image.read_into(chunk.offset, &mut buf).expect("read");
            buf
        };
        assert_eq!(read(0, 10), &bytes[..10]);
        assert_eq!(read(1, u32::MAX).len(), MAX_CHUNK as usize);
        assert_eq!(read(99_990, 64), &bytes[99_990..]);
        assert!(read(100_000, 64).is_empty());
        assert!(matches!(
            blobs.locate(&request(&name, 100_001, 1)),
            Err(BlobError::OutOfRange { total: 100_000 })
        ));
        assert!(matches!(
            blobs.locate(&request(&"cd".repeat(32), 0, 1)),
            Err(BlobError::NotFound)
        ));
        for bad in ["../../etc/passwd", &"AB".repeat(32), ""] {
            assert!(matches!(
                blobs.locate(&request(bad, 0, 1)),
                Err(BlobError::BadName)
            ));
        }
        assert!(matches!(
            Blobs::new(None).locate(&request(&name, 0, 1)),
            Err(BlobError::NoStore)
        ));
    }

    #[test]
    fn at_most_a_few_images_stay_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = Blobs::new(Some(dir.path().to_owned()));
        for i in 0..OPEN_FILES + 3 {
            let name = format!("{i:064x}");
            std::fs::write(dir.path().join(&name), b"x").expect("write");
            blobs.locate(&request(&name, 0, 1)).expect("chunk");
        }
        let open = blobs.open.lock().expect("lock");
        assert_eq!(open.len(), OPEN_FILES);
        assert_eq!(
            open.last().map(|(n, _)| n.clone()),
            Some(format!("{:064x}", OPEN_FILES + 2))
        );
    }
}
