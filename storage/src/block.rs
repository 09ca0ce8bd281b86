//! virtio-blk (device type 2) over a raw image file.
//!
//! Every request is checked before it touches the file: a header that does
//! not fit the readable part of the chain, a missing status byte, a loop in
//! the chain or buffers outside guest memory make the device fail
//! (`DEVICE_NEEDS_RESET`); a request that is well formed but wrong (beyond
//! the end of the disk, a write to a read-only disk, a length that is not
//! whole sectors) completes with `VIRTIO_BLK_S_IOERR`; an unknown request
//! type with `VIRTIO_BLK_S_UNSUPP`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mvm_devices::virtio::{serve_queue, DeviceError, VirtioDevice};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::Error;

const DEVICE_TYPE_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Bytes moved between file and guest per copy step: bounds the buffer a
/// request can make the VMM allocate, whatever its length.
const COPY_CHUNK: usize = 64 * 1024;
const SERIAL_LEN: usize = 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_T_DISCARD: u32 = 11;
const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Segments per discard / write-zeroes request (config max_*_seg).
const MAX_RANGE_SEGMENTS: u32 = 1;
/// Sectors per discard / write-zeroes segment (config max_*_sectors).
const MAX_RANGE_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// A raw disk image.
pub struct Block {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    sizes: [u16; 1],
    /// The host file system can punch holes (discard, write-zeroes).
    punch_hole: bool,
    /// Copy buffer reused by every request (allocated once, at most COPY_CHUNK).
    scratch: Vec<u8>,
}

/// Whether `file`'s file system supports punching holes: punching past
/// the end of the file changes nothing but fails where unsupported.
fn supports_punch_hole(file: &File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(offset) = libc::off_t::try_from(size) else {
        return false;
    };
    // SAFETY: fallocate on our own descriptor, beyond EOF with KEEP_SIZE.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            512,
        ) == 0
    }
}

impl Block {
    /// Open `path` as a disk. Its size must be whole 512-byte sectors.
    /// `serial` (at most 20 bytes) is what the guest reads as the disk's ID.
    pub fn open(path: &Path, read_only: bool, serial: &str) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size % SECTOR_SIZE != 0 {
            return Err(Error::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        if serial.len() > SERIAL_LEN {
            return Err(Error::Serial {
                path: path.to_path_buf(),
                serial: serial.to_string(),
            });
        }
        let mut id = [0u8; SERIAL_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let punch_hole = !read_only && supports_punch_hole(&file, size);
        Ok(Block {
            file,
            path: path.to_path_buf(),
            sectors: size / SECTOR_SIZE,
            read_only,
            serial: id,
            sizes: [QUEUE_SIZE],
            punch_hole,
            scratch: Vec::new(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let mut put = |off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        // size_max (8) unused; seg_max: a request fits one queue.
        put(12, u32::from(QUEUE_SIZE - 2));
        // geometry (16) unused; blk_size:
        put(20, SECTOR_SIZE as u32);
        if self.punch_hole {
            put(36, MAX_RANGE_SECTORS); // max_discard_sectors
            put(40, MAX_RANGE_SEGMENTS); // max_discard_seg
            put(44, 1); // discard_sector_alignment
            put(48, MAX_RANGE_SECTORS); // max_write_zeroes_sectors
            put(52, MAX_RANGE_SEGMENTS); // max_write_zeroes_seg
        }
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[56] = u8::from(self.punch_hole); // write_zeroes_may_unmap
        c
    }

    /// Discard or zero `[sector, sector + sectors)`: punching a hole does
    /// both (reads return zeroes afterwards) and frees the host blocks.
    fn punch(&self, sector: u64, sectors: u32) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(sector * SECTOR_SIZE).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let len = libc::off_t::from(sectors) * SECTOR_SIZE as libc::off_t;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own descriptor within the image.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// A discard or write-zeroes request: one segment of
    /// `{sector: u64, num_sectors: u32, flags: u32}`.
    fn ranges(&self, kind: u32, reader: &mut (impl Read + AvailableBytes)) -> u8 {
        if self.read_only || !self.punch_hole {
            return if self.read_only {
                VIRTIO_BLK_S_IOERR
            } else {
                VIRTIO_BLK_S_UNSUPP
            };
        }
        let len = reader.available();
        if len == 0 || len % 16 != 0 || len / 16 > MAX_RANGE_SEGMENTS as usize {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut seg = [0u8; 16];
        if reader.read_exact(&mut seg).is_err() {
            return VIRTIO_BLK_S_IOERR;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
        let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        if sectors > MAX_RANGE_SECTORS || self.range(sector, sectors as usize * SECTOR_SIZE as usize).is_none() {
            return VIRTIO_BLK_S_IOERR;
        }
        match self.punch(sector, sectors) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("disk {}: discard/write-zeroes failed: {e}", self.path.display());
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// Check that `len` bytes at `sector` lie on the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len as u64)?;
        (len as u64 % SECTOR_SIZE == 0 && end <= self.sectors * SECTOR_SIZE).then_some(start)
    }

    fn read_into(&mut self, offset: u64, out: &mut impl Write, len: usize) -> std::io::Result<()> {
        let buf = scratch(&mut self.scratch, len);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], offset + done as u64)?;
            out.write_all(&buf[..n])?;
            done += n;
        }
        Ok(())
    }

    fn write_from(&mut self, offset: u64, input: &mut impl Read, len: usize) -> std::io::Result<()> {
        let buf = scratch(&mut self.scratch, len);
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            input.read_exact(&mut buf[..n])?;
            self.file.write_all_at(&buf[..n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        let ranges = if self.punch_hole {
            VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        } else {
            0
        };
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | ro | ranges
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start.checked_add(data.len()).and_then(|end| config.get(start..end)) {
            data.copy_from_slice(src);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        serve_queue(index, queue, mem, |chain| {
            let head = chain.head_index();
            let fail = |reason: String| DeviceError::Chain { head, reason };
            let mut reader = chain
                .clone()
                .reader(mem)
                .map_err(|e| fail(format!("readable buffers: {e}")))?;
            let mut writer = chain.writer(mem).map_err(|e| fail(format!("writable buffers: {e}")))?;
            let mut header = [0u8; 16];
            reader
                .read_exact(&mut header)
                .map_err(|_| fail("request header (16 bytes) missing or cut short".into()))?;
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let writable = writer.available_bytes();
            if writable == 0 {
                return Err(fail("no device-writable byte for the status".into()));
            }
            let mut status_writer = writer.split_at(writable - 1).map_err(|e| fail(e.to_string()))?;
            let status = self.handle(kind, sector, &mut reader, &mut writer);
            status_writer
                .write_all(&[status])
                .map_err(|e| fail(format!("status byte: {e}")))?;
            Ok(writer.bytes_written() as u32 + 1)
        })
    }
}

impl Block {
    /// Carry out one well-formed request; the result is its status byte.
    fn handle(
        &mut self,
        kind: u32,
        sector: u64,
        reader: &mut (impl Read + AvailableBytes),
        writer: &mut (impl Write + AvailableBytes),
    ) -> u8 {
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available();
                match self.range(sector, len) {
                    Some(offset) => io_status(self.read_into(offset, writer, len), "read", &self.path),
                    None => VIRTIO_BLK_S_IOERR,
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = reader.available();
                match (self.read_only, self.range(sector, len)) {
                    (false, Some(offset)) => io_status(self.write_from(offset, reader, len), "write", &self.path),
                    _ => VIRTIO_BLK_S_IOERR,
                }
            }
            // The guest sees completion only after the data is on the
            // file's storage.
            VIRTIO_BLK_T_FLUSH if self.read_only => VIRTIO_BLK_S_OK,
            VIRTIO_BLK_T_FLUSH => io_status(self.file.sync_data(), "flush", &self.path),
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available().min(SERIAL_LEN);
                io_status(writer.write_all(&self.serial[..n]), "get id", &self.path)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.ranges(kind, reader),
            _ => VIRTIO_BLK_S_UNSUPP,
        }
    }
}

/// The status byte for an I/O result, logging failures with the disk.
fn io_status(result: std::io::Result<()>, what: &str, path: &Path) -> u8 {
    match result {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            log::warn!("disk {}: {what} failed: {e}", path.display());
            VIRTIO_BLK_S_IOERR
        }
    }
}

/// The reusable copy buffer, grown on first use up to what `len` needs.
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let want = len.clamp(1, COPY_CHUNK);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    &mut buf[..want]
}

/// Remaining bytes of a chain reader or writer.
pub trait AvailableBytes {
    fn available(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> AvailableBytes for virtio_queue::Reader<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

impl<B: vm_memory::bitmap::BitmapSlice> AvailableBytes for virtio_queue::Writer<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    // Descriptor flags (virtio 1.x, 2.7.5).
    const N: u16 = 1;
    const W: u16 = 2;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x5000;
    const STATUS: u64 = 0x6000;

    struct Disk {
        path: PathBuf,
    }

    impl Disk {
        fn new(name: &str, sectors: u64) -> Disk {
            let path = std::env::temp_dir().join(format!("mvm-blk-{name}-{}", std::process::id()));
            let content: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|i| (i / SECTOR_SIZE) as u8).collect();
            std::fs::write(&path, content).unwrap();
            Disk { path }
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Submit one chain; return (result, status byte, used length).
    fn submit(dev: &mut Block, m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (Result<bool, DeviceError>, u8, u32) {
        let vq = MockSplitQueue::create(m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(descs, 0).unwrap();
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = dev.process_queue(0, &mut q, m);
        let used = if vq.used().idx().load() > 0 {
            vq.used().ring().ref_at(0).unwrap().load().len()
        } else {
            0
        };
        (r, m.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    fn request(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            d(HDR, 16, N, 1),
            d(DATA, data_len, data_flags | N, 2),
            d(STATUS, 1, W, 0),
        ]
    }

    #[test]
    fn reads_and_writes_sectors() {
        let disk = Disk::new("rw", 8);
        let mut dev = Block::open(&disk.path, false, "disk-1").unwrap();
        assert_eq!(dev.sectors(), 8);
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 3);
        let (r, status, used) = submit(&mut dev, &m, &request(1024, W));
        assert_eq!((r, status, used), (Ok(true), VIRTIO_BLK_S_OK, 1025));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));

        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 7);
        let (r, status, used) = submit(&mut dev, &m, &request(512, 0));
        assert_eq!((r, status, used), (Ok(true), VIRTIO_BLK_S_OK, 1));
        let bytes = disk.bytes();
        assert!(bytes[7 * 512..].iter().all(|b| *b == 0xab));
        assert!(bytes[6 * 512..7 * 512].iter().all(|b| *b == 6), "neighbour untouched");

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (r, status, _) = submit(&mut dev, &m, &[d(HDR, 16, N, 1), d(STATUS, 1, W, 0)]);
        assert_eq!((r, status), (Ok(true), VIRTIO_BLK_S_OK));
    }

    #[test]
    fn header_split_across_descriptors_is_fine() {
        let disk = Disk::new("split", 4);
        let mut dev = Block::open(&disk.path, false, "").unwrap();
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 1);
        let descs = [
            d(HDR, 5, N, 1),
            d(HDR + 5, 11, N, 2),
            d(DATA, 512, W | N, 3),
            d(STATUS, 1, W, 0),
        ];
        let (r, status, used) = submit(&mut dev, &m, &descs);
        assert_eq!((r, status, used), (Ok(true), VIRTIO_BLK_S_OK, 513));
    }

    #[test]
    fn read_only_disk_refuses_writes_and_file_is_untouched() {
        let disk = Disk::new("ro", 4);
        let before = disk.bytes();
        let mut dev = Block::open(&disk.path, true, "ro").unwrap();
        assert_ne!(dev.features() & VIRTIO_BLK_F_RO, 0);
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (r, status, _) = submit(&mut dev, &m, &request(512, 0));
        assert_eq!((r, status), (Ok(true), VIRTIO_BLK_S_IOERR));
        assert_eq!(disk.bytes(), before);
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_io_errors() {
        let disk = Disk::new("range", 4);
        let mut dev = Block::open(&disk.path, false, "").unwrap();
        let m = mem();
        for (sector, len) in [(4u64, 512u32), (3, 1024), (u64::MAX / 256, 512), (0, 100)] {
            header(&m, VIRTIO_BLK_T_IN, sector);
            let (r, status, _) = submit(&mut dev, &m, &request(len, W));
            assert_eq!((r, status), (Ok(true), VIRTIO_BLK_S_IOERR), "sector {sector} len {len}");
        }
    }

    #[test]
    fn get_id_and_unknown_requests() {
        let disk = Disk::new("id", 1);
        let mut dev = Block::open(&disk.path, false, "my-serial").unwrap();
        let m = mem();
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (r, status, used) = submit(&mut dev, &m, &request(20, W));
        assert_eq!((r, status, used), (Ok(true), VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"my-serial");
        header(&m, 0x7777, 0);
        let (r, status, _) = submit(&mut dev, &m, &request(512, W));
        assert_eq!((r, status), (Ok(true), VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn malformed_chains_need_reset() {
        let disk = Disk::new("bad", 4);
        let before = disk.bytes();
        let mut dev = Block::open(&disk.path, false, "").unwrap();
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
            ("short header", vec![d(HDR, 8, N, 1), d(STATUS, 1, W, 0)]),
            ("no status byte", vec![d(HDR, 16, N, 1), d(DATA, 512, 0, 0)]),
            (
                "header outside memory",
                vec![d(0xffff_0000, 16, N, 1), d(STATUS, 1, W, 0)],
            ),
            (
                "data outside memory",
                vec![d(HDR, 16, N, 1), d(0xf_ff00, 512, N, 2), d(STATUS, 1, W, 0)],
            ),
            (
                "wrapping address",
                vec![d(HDR, 16, N, 1), d(u64::MAX - 8, 512, N, 2), d(STATUS, 1, W, 0)],
            ),
            ("next past the table", vec![d(HDR, 16, N, 40)]),
        ];
        for (what, descs) in cases {
            let (r, _, _) = submit(&mut dev, &m, &descs);
            assert!(matches!(r, Err(DeviceError::Chain { .. })), "{what}: {r:?}");
        }
        assert_eq!(disk.bytes(), before, "nothing was written");
    }

    #[test]
    fn discard_and_write_zeroes_punch_holes() {
        let disk = Disk::new("discard", 16);
        let mut dev = Block::open(&disk.path, false, "").unwrap();
        if !dev.punch_hole {
            eprintln!("host file system cannot punch holes; only the refusal is checked");
            let m = mem();
            header(&m, VIRTIO_BLK_T_DISCARD, 0);
            let (_, status, _) = submit(&mut dev, &m, &request(16, 0));
            assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
            return;
        }
        assert_ne!(dev.features() & VIRTIO_BLK_F_DISCARD, 0);
        let m = mem();
        let segment = |sector: u64, sectors: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&s, GuestAddress(DATA)).unwrap();
        };
        segment(8, 8, 0);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let (r, status, _) = submit(&mut dev, &m, &request(16, 0));
        assert_eq!((r, status), (Ok(true), VIRTIO_BLK_S_OK));
        let bytes = disk.bytes();
        assert!(
            bytes[8 * 512..].iter().all(|b| *b == 0),
            "discarded range reads as zeroes"
        );
        assert!(bytes[7 * 512..8 * 512].iter().all(|b| *b == 7), "neighbour untouched");
        segment(2, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (_, status, _) = submit(&mut dev, &m, &request(16, 0));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(disk.bytes()[2 * 512..3 * 512].iter().all(|b| *b == 0));
        // Beyond the end, bad flags, two segments, a partial segment.
        for (sector, sectors, flags, len, want) in [
            (15u64, 2u32, 0u32, 16u32, VIRTIO_BLK_S_IOERR),
            (0, 1, 2, 16, VIRTIO_BLK_S_UNSUPP),
            (0, 1, 0, 32, VIRTIO_BLK_S_IOERR),
            (0, 1, 0, 8, VIRTIO_BLK_S_IOERR),
        ] {
            segment(sector, sectors, flags);
            header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
            let (_, status, _) = submit(&mut dev, &m, &request(len, 0));
            assert_eq!(
                status, want,
                "sector {sector} sectors {sectors} flags {flags} len {len}"
            );
        }
    }

    #[test]
    fn open_rejects_odd_sizes_and_long_serials() {
        let path = std::env::temp_dir().join(format!("mvm-blk-odd-{}", std::process::id()));
        std::fs::write(&path, [0u8; 1000]).unwrap();
        let e = Block::open(&path, false, "").err().unwrap().to_string();
        assert!(e.contains("1000 bytes is not a multiple of 512"), "{e}");
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let e = Block::open(&path, false, "123456789012345678901")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("longer than 20 bytes"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(Block::open(&path, false, "")
            .err()
            .unwrap()
            .to_string()
            .contains("cannot open"));
    }
}
