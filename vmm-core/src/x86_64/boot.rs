//! Loading the kernel, initrd and command line, and writing the boot
//! protocol's structures: boot_params with its e820 map, `setup_data`
//! (RNG seed), MP table and ACPI tables.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::{Error, Result};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const SETUP_RNG_SEED: u32 = 9;
const RNG_SEED_LEN: usize = 32;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Memory the kernel needs beyond its image and the initrd to get to
/// userspace at all; below this a boot fails in confusing ways.
pub const KERNEL_RUNTIME_HEADROOM: u64 = 8 << 20;
const MIB: u64 = 1 << 20;

/// How the kernel image was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`, entered at its 64-bit entry point.
    Elf,
    /// `bzImage`, entered at its 64-bit entry (protected-mode code + 0x200).
    BzImage,
}

/// Facts about a kernel image read from its headers, before loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub format: KernelFormat,
    /// Lowest guest-physical address the image occupies.
    pub load_start: u64,
    /// First guest-physical address above what the kernel needs to start
    /// (its image, or for a bzImage the decompression buffer).
    pub end: u64,
    /// Longest command line the kernel accepts, NUL excluded.
    pub cmdline_max: usize,
    /// Highest address the initrd may end at.
    pub initrd_addr_max: u64,
}

fn image_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::KernelImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Recognise and check a kernel image from its headers: ELF64 x86-64 with
/// loadable segments inside the file, or a bzImage with a 64-bit entry.
pub fn inspect_kernel(path: &Path, file: &mut File) -> Result<KernelInfo> {
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| image_error(path, format!("cannot read: {e}")))?;
    let mut head = vec![0u8; len.min(4096) as usize];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut head))
        .map_err(|e| image_error(path, format!("cannot read: {e}")))?;
    let mut read_at = |off: u64, size: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; size];
        file.seek(SeekFrom::Start(off))
            .and_then(|_| file.read_exact(&mut buf))
            .ok()?;
        Some(buf)
    };
    inspect_image(&head, len, &mut read_at).map_err(|reason| image_error(path, reason))
}

/// [`inspect_kernel`] for an image in memory (tests and fuzzing).
pub fn inspect_kernel_bytes(image: &[u8]) -> std::result::Result<KernelInfo, String> {
    let head = &image[..image.len().min(4096)];
    let mut read_at = |off: u64, size: usize| -> Option<Vec<u8>> {
        let start = usize::try_from(off).ok()?;
        image.get(start..start.checked_add(size)?).map(<[u8]>::to_vec)
    };
    inspect_image(head, image.len() as u64, &mut read_at)
}

fn inspect_image(
    head: &[u8],
    file_len: u64,
    read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>,
) -> std::result::Result<KernelInfo, String> {
    if head.starts_with(b"\x7fELF") {
        inspect_elf(head, file_len, read_at)
    } else {
        inspect_bzimage(head, file_len)
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]))
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]))
}

const TRUNCATED_PHDRS: &str = "ELF image is truncated: its program headers lie beyond the end of the file";

/// Check an ELF image: `head` is the start of the file (up to 4 KiB),
/// `file_len` its length, `read_at` reads program headers.
fn inspect_elf(
    head: &[u8],
    file_len: u64,
    read_at: &mut dyn FnMut(u64, usize) -> Option<Vec<u8>>,
) -> std::result::Result<KernelInfo, String> {
    const PT_LOAD: u32 = 1;
    if head.len() < 64 {
        return Err(format!(
            "ELF image is truncated: {} bytes, an ELF header needs 64",
            head.len()
        ));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF; build an x86_64 vmlinux".into());
    }
    if le16(head, 18) != 0x3e {
        return Err(format!("ELF machine {:#x} is not x86_64", le16(head, 18)));
    }
    let phoff = le64(head, 32);
    let phentsize = usize::from(le16(head, 54));
    let phnum = usize::from(le16(head, 56));
    if phentsize != 56 || phnum == 0 {
        return Err(format!(
            "ELF has {phnum} program headers of {phentsize} bytes; a vmlinux has 56-byte ones"
        ));
    }
    let table_len = phentsize * phnum;
    if phoff.checked_add(table_len as u64).is_none_or(|end| end > file_len) {
        return Err(TRUNCATED_PHDRS.into());
    }
    let phdrs = read_at(phoff, table_len).ok_or(TRUNCATED_PHDRS)?;
    let (mut start, mut end) = (u64::MAX, 0u64);
    for (i, ph) in phdrs.chunks_exact(56).enumerate() {
        if le32(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (le64(ph, 8), le64(ph, 24), le64(ph, 32), le64(ph, 40));
        let file_end = offset.checked_add(filesz);
        if file_end.is_none_or(|e| e > file_len) {
            return Err(format!(
                "ELF image is truncated: segment {i} needs file bytes {offset:#x}..{:#x}, the file has {file_len:#x}",
                offset.saturating_add(filesz)
            ));
        }
        let seg_end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or_else(|| format!("ELF segment {i} wraps around the address space"))?;
        if paddr < HIGH_MEMORY_START {
            return Err(format!(
                "ELF segment {i} loads at {paddr:#x}, below 1 MiB where boot structures live"
            ));
        }
        start = start.min(paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err("ELF image has no loadable segment".into());
    }
    let entry = le64(head, 24);
    if entry < start || entry >= end {
        return Err(format!("ELF entry point {entry:#x} lies outside its loaded segments"));
    }
    Ok(KernelInfo {
        format: KernelFormat::Elf,
        load_start: start,
        end,
        cmdline_max: CMDLINE_MAX_DEFAULT - 1,
        initrd_addr_max: MMIO_GAP_START - 1,
    })
}

fn inspect_bzimage(head: &[u8], file_len: u64) -> std::result::Result<KernelInfo, String> {
    let not_kernel = "not a Linux kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" at offset 0x202)";
    if head.len() < 0x268 || le32(head, 0x202) != HDRS_MAGIC {
        return Err(not_kernel.into());
    }
    let version = le16(head, 0x206);
    if version < 0x020c {
        return Err(format!(
            "bzImage boot protocol {}.{:02} is too old; 2.12 (Linux 3.8) or newer is needed for 64-bit entry",
            version >> 8,
            version & 0xff
        ));
    }
    let xloadflags = le16(head, 0x236);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("bzImage has no 64-bit entry point (XLF_KERNEL_64); build it for x86_64".into());
    }
    let setup_sects = match head[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    if (setup_sects + 1) * 512 >= file_len {
        return Err("bzImage is truncated: it ends inside its setup code".into());
    }
    let code32_start = u64::from(le32(head, 0x214));
    let pref_address = le64(head, 0x258);
    let init_size = u64::from(le32(head, 0x260));
    let payload = file_len - (setup_sects + 1) * 512;
    let end = (code32_start + payload).max(pref_address.max(code32_start) + init_size);
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        load_start: code32_start,
        end,
        cmdline_max: (le32(head, 0x238) as usize).clamp(255, 1 << 20),
        initrd_addr_max: u64::from(le32(head, 0x22c)),
    })
}

/// Where the kernel was put; input to [`build_boot_params`].
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub info: KernelInfo,
    pub entry: u64,
    pub setup_header: Option<setup_header>,
}

/// Load the kernel image into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, file: &mut File, info: KernelInfo) -> Result<LoadedKernel> {
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let result = match info.format {
        KernelFormat::Elf => Elf::load(mem, None, file, highmem),
        KernelFormat::BzImage => BzImage::load(mem, None, file, highmem),
    }
    .map_err(|e| image_error(path, format!("cannot load: {e}")))?;
    let entry = match info.format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel {
        info,
        entry,
        setup_header: result.setup_header,
    })
}

/// Check that RAM of `mem_size` bytes holds the kernel and an initrd of
/// `initrd_size` bytes, and pick the initrd's address: page-aligned at the
/// top of low RAM, as bootloaders do.
pub fn place_initrd(memory_mib: u32, info: &KernelInfo, initrd_size: u64) -> Result<u64> {
    let mem_size = u64::from(memory_mib) * MIB;
    let needed = info.end + initrd_size.next_multiple_of(4096) + KERNEL_RUNTIME_HEADROOM;
    let too_small = |reason: String| Error::MemoryTooSmall {
        memory_mib,
        needed_mib: needed.div_ceil(MIB),
        reason,
    };
    let low_end = mem_size.min(MMIO_GAP_START).min(info.initrd_addr_max.saturating_add(1));
    let describe = || {
        format!(
            "the kernel occupies memory up to {:.1} MiB, the initrd takes {:.1} MiB and the kernel needs {} MiB to run",
            info.end as f64 / MIB as f64,
            initrd_size as f64 / MIB as f64,
            KERNEL_RUNTIME_HEADROOM / MIB
        )
    };
    if mem_size < needed {
        return Err(too_small(describe()));
    }
    let addr = low_end.checked_sub(initrd_size).map(|a| a & !0xfff);
    match addr {
        Some(a) if a >= info.end + KERNEL_RUNTIME_HEADROOM => Ok(a),
        _ => Err(too_small(describe())),
    }
}

/// The e820 map for a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(BIOS_AREA_START, HIGH_MEMORY_START - BIOS_AREA_START, E820_RESERVED),
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIGH_MEMORY_START {
        map.push(entry(HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM));
    }
    if mem_size > MMIO_GAP_START {
        map.push(entry(MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Everything boot_params points to.
pub struct BootParamsInput<'a> {
    pub kernel: &'a LoadedKernel,
    pub mem_size: u64,
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    pub rsdp_addr: Option<u64>,
    pub setup_data: Option<u64>,
}

/// Build the zero page.
pub fn build_boot_params(input: &BootParamsInput) -> Result<boot_params> {
    let hdr = match input.kernel.setup_header {
        Some(hdr) => hdr,
        None => setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            // Protocol 2.12: the fields below are meaningful.
            version: 0x020c,
            kernel_alignment: 0x0100_0000,
            ..Default::default()
        },
    };
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = input.cmdline_len as u32;
    if let Some((addr, size)) = input.initrd {
        let (addr32, size32) = (u32::try_from(addr), u32::try_from(size));
        match (addr32, size32) {
            (Ok(a), Ok(s)) => {
                params.hdr.ramdisk_image = a;
                params.hdr.ramdisk_size = s;
            }
            _ => {
                return Err(Error::GuestMemory(format!(
                    "initrd at {addr:#x}+{size:#x} is not below 4 GiB"
                )))
            }
        }
    }
    params.hdr.setup_data = input.setup_data.unwrap_or(0);
    params.acpi_rsdp_addr = input.rsdp_addr.unwrap_or(0);
    let map = e820_map(input.mem_size);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

/// A `setup_data` node of type `SETUP_RNG_SEED` with fresh host entropy,
/// so the guest's random pool is initialised at once (with
/// CONFIG_RANDOM_TRUST_BOOTLOADER) instead of after a long, here
/// interpreted, jitter-entropy wait.
pub fn rng_seed_setup_data() -> Result<Vec<u8>> {
    let mut seed = [0u8; RNG_SEED_LEN];
    mvm_devices::virtio::rng::getrandom(&mut seed).map_err(Error::host("getrandom for the guest's RNG seed"))?;
    let mut node = Vec::with_capacity(16 + RNG_SEED_LEN);
    node.extend_from_slice(&0u64.to_le_bytes()); // next: end of chain
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node.extend_from_slice(&seed);
    Ok(node)
}

/// Write a blob into guest memory with a message naming it on failure.
pub fn write_blob(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8], what: &str) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory(format!("cannot write {what} at {addr:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(segments: &[(u64, u64, u64, u64)], entry: u64, file_len: u64) -> (Vec<u8>, u64) {
        let mut head = vec![0u8; 64 + 56 * segments.len()];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[18] = 0x3e;
        head[24..32].copy_from_slice(&entry.to_le_bytes());
        head[32..40].copy_from_slice(&64u64.to_le_bytes());
        head[54] = 56;
        head[56] = segments.len() as u8;
        for (i, (off, paddr, filesz, memsz)) in segments.iter().enumerate() {
            let p = 64 + 56 * i;
            head[p] = 1;
            head[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            head[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            head[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            head[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        (head, file_len)
    }

    fn check_elf(head: &[u8], len: u64) -> std::result::Result<KernelInfo, String> {
        let h = head.to_vec();
        inspect_elf(&h, len, &mut |off, n| {
            h.get(off as usize..off as usize + n).map(<[u8]>::to_vec)
        })
    }

    #[test]
    fn bytes_api_agrees_and_never_panics_on_short_input() {
        let (mut h, _) = elf(&[(0x100, 0x100_0000, 0x10, 0x10)], 0x100_0000, 0);
        h.resize(0x200, 0);
        assert_eq!(inspect_kernel_bytes(&h).unwrap().end, 0x100_0010);
        for n in 0..h.len() {
            let _ = inspect_kernel_bytes(&h[..n]);
        }
        assert!(inspect_kernel_bytes(b"").unwrap_err().starts_with("not a Linux kernel"));
    }

    #[test]
    fn elf_sizes_come_from_segments() {
        let (h, len) = elf(
            &[(0x1000, 0x100_0000, 0x2000, 0x3000), (0x3000, 0x200_0000, 0x100, 0x100)],
            0x100_0000,
            0x4000,
        );
        let info = check_elf(&h, len).unwrap();
        assert_eq!(info.format, KernelFormat::Elf);
        assert_eq!((info.load_start, info.end), (0x100_0000, 0x200_0100));
    }

    #[test]
    fn elf_damage_is_named() {
        let (h, _) = elf(&[(0x1000, 0x100_0000, 0x2000, 0x2000)], 0x100_0000, 0);
        assert!(check_elf(&h, 0x1800).unwrap_err().contains("truncated: segment 0"));
        assert!(check_elf(&h[..40], 40).unwrap_err().contains("truncated: 40 bytes"));
        assert!(check_elf(&h, 100).unwrap_err().contains("program headers lie beyond"));
        let (h2, len) = elf(&[(0x1000, 0x1000, 0x100, 0x100)], 0x1000, 0x2000);
        assert!(check_elf(&h2, len).unwrap_err().contains("below 1 MiB"));
        let (h3, len) = elf(&[(0x1000, 0x100_0000, 0x100, 0x100)], 0x5000_0000, 0x2000);
        assert!(check_elf(&h3, len).unwrap_err().contains("entry point"));
        let (h4, len) = elf(&[(0, u64::MAX - 4, 0, 0x100)], 0, 0x2000);
        assert!(check_elf(&h4, len).unwrap_err().contains("wraps"));
        let (mut h5, len) = elf(&[(0x1000, 0x100_0000, 0x100, 0x100)], 0x100_0000, 0x2000);
        h5[4] = 1;
        assert!(check_elf(&h5, len).unwrap_err().contains("64-bit"));
        h5[4] = 2;
        h5[18] = 0x28;
        assert!(check_elf(&h5, len).unwrap_err().contains("not x86_64"));
    }

    fn bzimage_head(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[0x1f1] = 27;
        h[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        h[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        h[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        h[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        h[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        h[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        h[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        h[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
        h
    }

    #[test]
    fn bzimage_header_checks() {
        let info = inspect_bzimage(&bzimage_head(0x020f, 3), 5 << 20).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.end, 0x300_0000);
        assert_eq!(info.cmdline_max, 2048);
        assert_eq!(info.initrd_addr_max, 0x7fff_ffff);
        assert!(inspect_bzimage(&bzimage_head(0x0206, 3), 5 << 20)
            .unwrap_err()
            .contains("too old"));
        assert!(inspect_bzimage(&bzimage_head(0x020f, 0), 5 << 20)
            .unwrap_err()
            .contains("64-bit"));
        assert!(inspect_bzimage(&bzimage_head(0x020f, 1), 1000)
            .unwrap_err()
            .contains("truncated"));
        let garbage = vec![0x42u8; 4096];
        assert!(inspect_bzimage(&garbage, 4096)
            .unwrap_err()
            .starts_with("not a Linux kernel"));
        assert!(inspect_bzimage(&[1, 2, 3], 3)
            .unwrap_err()
            .starts_with("not a Linux kernel"));
    }

    fn elf_info(end: u64) -> KernelInfo {
        KernelInfo {
            format: KernelFormat::Elf,
            load_start: 0x100_0000,
            end,
            cmdline_max: 2047,
            initrd_addr_max: MMIO_GAP_START - 1,
        }
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let info = elf_info(0x180_0000);
        assert_eq!(place_initrd(128, &info, 0x20_0001).unwrap(), (128 << 20) - 0x20_1000);
        // Above 3 GiB of RAM the initrd stays below the MMIO gap.
        assert_eq!(place_initrd(8192, &info, 0x1000).unwrap(), MMIO_GAP_START - 0x1000);
        let e = place_initrd(30, &info, 20 << 20).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("machine.memory_mib = 30: too small"), "{msg}");
        assert!(msg.ends_with("give the VM at least 52 MiB"), "{msg}");
        assert!(e.is_config_error());
    }

    #[test]
    fn e820_covers_ram_and_reserves_bios_area() {
        let map = e820_map(128 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!((map[0].addr, map[0].size, map[0].r#type), (0, EBDA_START, E820_RAM));
        assert_eq!({ map[1].r#type }, E820_RESERVED);
        assert!(map[1].addr <= ACPI_ADDR && MPTABLE_ADDR + MPTABLE_MAX <= map[1].addr + map[1].size);
        assert_eq!((map[2].addr, map[2].addr + map[2].size), (HIGH_MEMORY_START, 128 << 20));
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[2].addr + big[2].size, MMIO_GAP_START);
        assert_eq!((big[3].addr, big[3].size), (MMIO_GAP_END, 2 << 30));
        let ram: u64 = big.iter().filter(|e| e.r#type == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (5 << 30) - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn boot_params_point_at_everything() {
        let kernel = LoadedKernel {
            info: elf_info(0x200_0000),
            entry: 0x100_0000,
            setup_header: None,
        };
        let p = build_boot_params(&BootParamsInput {
            kernel: &kernel,
            mem_size: 128 << 20,
            cmdline_len: 42,
            initrd: Some((0x700_0000, 0x1234)),
            rsdp_addr: Some(ACPI_ADDR),
            setup_data: Some(SETUP_DATA_ADDR),
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.setup_data }, SETUP_DATA_ADDR);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_ADDR);
        assert_eq!(p.e820_entries, 3);
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn rng_seed_node_layout() {
        let a = rng_seed_setup_data().unwrap();
        let b = rng_seed_setup_data().unwrap();
        assert_eq!(a.len(), 16 + RNG_SEED_LEN);
        assert_eq!(le64(&a, 0), 0);
        assert_eq!(le32(&a, 8), SETUP_RNG_SEED);
        assert_eq!(le32(&a, 12), RNG_SEED_LEN as u32);
        assert_ne!(a[16..], b[16..], "seeds are fresh");
        assert!((a.len() as u64) <= SETUP_DATA_MAX);
    }
}
