//! Guest physical memory layout for x86_64 direct kernel boot.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT (empty)
//! 0x0000_6000  setup_data chain (RNG seed)
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, PDPT, PD: identity map of the first 1 GiB
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of conventional RAM
//! 0x000e_0000  ACPI RSDP and tables  [BIOS area, reserved in e820]
//! 0x000f_0000  MP table              [BIOS area, reserved in e820]
//! 0x0010_0000  RAM: kernel (at its ELF physical address), initrd at the top
//! 0xc000_0000  32-bit MMIO gap: IOAPIC, LAPIC, later virtio-mmio
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const SETUP_DATA_ADDR: u64 = 0x6000;
pub const SETUP_DATA_MAX: u64 = 0x1000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line accepted from a kernel that does not announce its
/// own limit (boot protocol < 2.06); newer kernels report `cmdline_size`.
pub const CMDLINE_MAX_DEFAULT: usize = 2048;
/// End of conventional low memory (640 KiB minus the 1 KiB EBDA).
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS read-only area, where Linux scans for the RSDP and the MP
/// floating pointer.
pub const BIOS_AREA_START: u64 = 0xe_0000;
pub const ACPI_ADDR: u64 = BIOS_AREA_START;
pub const ACPI_MAX: u64 = 0x1_0000;
pub const MPTABLE_ADDR: u64 = 0xf_0000;
pub const MPTABLE_MAX: u64 = 0x1_0000;
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, inside
/// the MMIO gap so they never shadow RAM.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// IOAPIC pins in KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
/// virtio-mmio register windows, one page each, from here up.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSIs for virtio-mmio devices: above the legacy ones in use (COM1 = 4),
/// up to the last IOAPIC pin.
pub const VIRTIO_FIRST_GSI: u32 = 5;
pub const VIRTIO_MAX_DEVICES: usize = (IOAPIC_PINS as u32 - VIRTIO_FIRST_GSI) as usize;

/// RAM regions of a guest with `size` bytes: low RAM up to the MMIO gap,
/// the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_ADDR + 0x1000 && BOOT_STACK_POINTER < PML4_ADDR);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (SETUP_DATA_ADDR, SETUP_DATA_MAX),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x3000),
            (CMDLINE_ADDR, 0x1_0000),
            (ACPI_ADDR, ACPI_MAX),
            (MPTABLE_ADDR, MPTABLE_MAX),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        assert_eq!(MPTABLE_ADDR + MPTABLE_MAX, HIGH_MEMORY_START);
        let virtio_end = VIRTIO_MMIO_BASE + VIRTIO_MAX_DEVICES as u64 * 0x1000;
        assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && virtio_end < IOAPIC_ADDR);
    }
}
