//! Guest RAM: anonymous memory, or one memfd that another process (a
//! vhost-user backend such as virtiofsd) can map to reach the guest's
//! buffers directly.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::x86_64::layout;
use crate::{Error, Result};

/// Map `size` bytes of guest RAM at the guest addresses of
/// [`layout::ram_regions`]. Pages cost nothing until touched either way.
///
/// With `shared`, the regions are `MAP_SHARED` windows into one memfd,
/// each region at its own offset, so `region.file_offset()` gives the
/// descriptor and offset to pass in `VHOST_USER_SET_MEM_TABLE`. Without
/// it, the memory is private and anonymous: no other process can map it.
pub fn allocate(size: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let regions = layout::ram_regions(size);
    let cannot_map = |e: &dyn std::fmt::Display| Error::GuestMemory(format!("cannot map {} MiB: {e}", size >> 20));
    let mut ranges = Vec::with_capacity(regions.len());
    let file = if shared { Some(memfd(size)?) } else { None };
    let mut offset = 0u64;
    for (start, len) in regions {
        let len_usize = usize::try_from(len).map_err(|_| cannot_map(&"region larger than the address space"))?;
        let file_offset = file.as_ref().map(|f| FileOffset::from_arc(Arc::clone(f), offset));
        ranges.push((GuestAddress(start), len_usize, file_offset));
        offset += len;
    }
    GuestMemoryMmap::<()>::from_ranges_with_files(&ranges).map_err(|e| cannot_map(&e))
}

/// An anonymous in-memory file of `size` bytes (sparse: nothing is
/// allocated until the guest touches it). Close-on-exec: it reaches a
/// backend only as a descriptor passed over its socket.
fn memfd(size: u64) -> Result<Arc<File>> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"mvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::host("creating the guest memory file (memfd_create)")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::host(format!(
        "sizing the guest memory file to {} MiB",
        size >> 20
    )))?;
    Ok(Arc::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn private_memory_has_no_file() {
        let mem = allocate(16 << 20, false).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }

    #[test]
    fn shared_memory_is_one_file_at_increasing_offsets() {
        // Past the MMIO gap, so there are two regions.
        let size = layout::MMIO_GAP_START + (64 << 20);
        let mem = allocate(size, true).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let first = regions[0].file_offset().unwrap();
        let second = regions[1].file_offset().unwrap();
        assert_eq!(first.start(), 0);
        assert_eq!(second.start(), layout::MMIO_GAP_START);
        assert!(Arc::ptr_eq(first.arc(), second.arc()));
        assert_eq!(first.file().metadata().unwrap().len(), size);

        // What the guest writes is in the file, where another process's
        // mapping of it would see it.
        mem.write_obj(0xfeed_u64, GuestAddress(layout::MMIO_GAP_END + 8))
            .unwrap();
        let mut buf = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(second.file(), &mut buf, layout::MMIO_GAP_START + 8).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 0xfeed);
    }
}
