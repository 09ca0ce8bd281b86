//! ACPI tables for a hardware-reduced platform: RSDP, XSDT, FADT, MADT and
//! a DSDT. They let stock kernels find the vCPUs and IOAPIC, and give the
//! guest a way to power off (S5 through the FADT's sleep control register).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, rsdp::Rsdp, xsdt::XSDT, Aml};
use mvm_devices::legacy::{COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN, I8042_PORT_BASE, SLEEP_CONTROL_PORT};
use mvm_devices::legacy::{RTC_CENTURY_REGISTER, RTC_PORT_BASE, RTC_PORT_LEN};

use super::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: [u8; 6] = *b"MVMDEV";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: no VGA, no MSI (there is no PCI), so the guest skips
/// probing for them. The CMOS RTC is present (bit 5, CMOS_RTC_NOT_PRESENT,
/// stays clear).
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// Value written to the i8042 command port to pulse the CPU reset line.
const I8042_RESET_VALUE: u8 = 0xfe;

/// The tables laid out for guest address `base`.
pub struct AcpiTables {
    /// All tables, to be copied to `base`.
    pub bytes: Vec<u8>,
    /// Guest address of the RSDP (for boot_params.acpi_rsdp_addr).
    pub rsdp_addr: u64,
}

fn align8(v: usize) -> usize {
    (v + 7) & !7
}

fn io_register(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u32,
    pub gsi: u32,
}

fn build_dsdt(virtio: &[MmioDevice]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5: SLP_TYP for soft-off, as AcpiSleepControl decodes it.
    let s5_type = mvm_devices::legacy::SLEEP_CONTROL_S5_TYPE;
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]));
    // COM1 as an ACPI device: on a hardware-reduced platform Linux maps no
    // ISA IRQs by itself (there is no legacy PIC), so the UART's interrupt
    // reaches the guest only through this _CRS (8250_pnp binds to it).
    let io = aml::IO::new(COM1_PORT_BASE, COM1_PORT_BASE, 1, COM1_PORT_LEN as u8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &0u8);
    let crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    body.extend_from_slice(&rtc_device());
    // virtio-mmio devices as Linux's virtio_mmio driver finds them: _HID
    // LNRO0005, one memory window and one edge-triggered interrupt each.
    for (i, dev) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.len);
        let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(i as u32));
        let crs = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// The CMOS RTC (PNP0B00) with its two ports and no interrupt: it raises
/// none, and Linux's rtc-cmos driver binds to this device without one.
/// Kernels that read the RTC only through the x86 legacy path ignore it.
fn rtc_device() -> Vec<u8> {
    let io = aml::IO::new(RTC_PORT_BASE, RTC_PORT_BASE, 1, RTC_PORT_LEN as u8);
    let resources = aml::ResourceTemplate::new(vec![&io]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let crs = aml::Name::new("_CRS".into(), &resources);
    let mut bytes = Vec::new();
    aml::Device::new("_SB_.RTC_".into(), vec![&hid, &crs]).to_aml_bytes(&mut bytes);
    bytes
}

fn build_madt(vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, enabled.
        madt.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID after the last vCPU, address, GSI base 0.
    let mut ioapic = vec![1, 12, vcpus, 0];
    ioapic.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);
    madt.as_slice().to_vec()
}

/// Build the tables for `vcpus` vCPUs and the `virtio` devices at guest
/// address `base`.
pub fn build(base: u64, vcpus: u8, virtio: &[MmioDevice]) -> AcpiTables {
    let dsdt = build_dsdt(virtio);
    let madt = build_madt(vcpus);

    let rsdp_off = 0usize;
    let xsdt_off = align8(rsdp_off + Rsdp::len());
    let xsdt_len = 36 + 8 * 2;
    let fadt_off = align8(xsdt_off + xsdt_len);
    let dsdt_off = align8(fadt_off + acpi_tables::fadt::FADT::len());
    let madt_off = align8(dsdt_off + dsdt.len());
    let total = madt_off + madt.len();
    let addr = |off: usize| base + off as u64;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(addr(dsdt_off))
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED).into();
    // The spec lets a hardware-reduced OS ignore CENTURY; Linux reads the
    // century from the CMOS byte it names all the same.
    fadt.century = RTC_CENTURY_REGISTER;
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_CONTROL_PORT);
    // ACPI reboot pulses the same i8042 reset line as `reboot=k`.
    fadt.reset_reg = io_register(I8042_PORT_BASE + 4);
    fadt.reset_value = I8042_RESET_VALUE;
    let fadt = fadt.finalize();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(addr(fadt_off));
    xsdt.add_entry(addr(madt_off));

    let mut bytes = vec![0u8; total];
    let mut put = |off: usize, table: &dyn Aml| {
        let mut v = Vec::new();
        table.to_aml_bytes(&mut v);
        bytes[off..off + v.len()].copy_from_slice(&v);
    };
    put(rsdp_off, &Rsdp::new(OEM_ID, addr(xsdt_off)));
    put(xsdt_off, &xsdt);
    put(fadt_off, &fadt);
    bytes[dsdt_off..dsdt_off + dsdt.len()].copy_from_slice(&dsdt);
    bytes[madt_off..madt_off + madt.len()].copy_from_slice(&madt);
    AcpiTables {
        bytes,
        rsdp_addr: addr(rsdp_off),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Follow the pointers from the RSDP as a guest would and check every
    /// table's signature, length and checksum.
    #[test]
    fn tables_chain_and_checksum() {
        let base = 0xe_0000u64;
        let virtio = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let t = build(base, 3, &virtio);
        let b = &t.bytes;
        assert_eq!(t.rsdp_addr, base);
        assert_eq!(&b[0..8], b"RSD PTR ");
        assert_eq!(sum(&b[0..20]), 0);
        assert_eq!(sum(&b[0..36]), 0);
        let xsdt = (u64_at(b, 24) - base) as usize;
        assert_eq!(&b[xsdt..xsdt + 4], b"XSDT");
        let xlen = u32_at(b, xsdt + 4) as usize;
        assert_eq!(sum(&b[xsdt..xsdt + xlen]), 0);
        let mut sigs = Vec::new();
        for i in 0..(xlen - 36) / 8 {
            let off = (u64_at(b, xsdt + 36 + 8 * i) - base) as usize;
            let len = u32_at(b, off + 4) as usize;
            assert_eq!(sum(&b[off..off + len]), 0, "checksum of table {i}");
            sigs.push((b[off..off + 4].to_vec(), off, len));
        }
        assert_eq!(sigs[0].0, b"FACP");
        assert_eq!(sigs[1].0, b"APIC");

        // FADT: hardware-reduced, DSDT pointer valid, sleep control at our port.
        let fadt = sigs[0].1;
        assert_ne!(u32_at(b, fadt + 112) & (1 << 20), 0);
        let dsdt = (u64_at(b, fadt + 140) - base) as usize;
        assert_eq!(&b[dsdt..dsdt + 4], b"DSDT");
        let dlen = u32_at(b, dsdt + 4) as usize;
        assert_eq!(sum(&b[dsdt..dsdt + dlen]), 0);
        assert!(b[dsdt..dsdt + dlen].windows(4).any(|w| w == b"_S5_"));
        assert!(b[dsdt..dsdt + dlen].windows(4).any(|w| w == b"COM1"));
        let dsdt_bytes = &b[dsdt..dsdt + dlen];
        assert_eq!(dsdt_bytes.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(dsdt_bytes.windows(4).any(|w| w == b"V001"));
        // Memory32Fixed descriptor of the second device: tag 0x86, length 9, RW, base, size.
        let mut m32 = vec![0x86, 9, 0, 1];
        m32.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        m32.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(dsdt_bytes.windows(m32.len()).any(|w| w == m32.as_slice()));
        // EISA ID of PNP0501, compressed as AML stores it.
        assert!(b[dsdt..dsdt + dlen].windows(4).any(|w| w == [0x41, 0xd0, 0x05, 0x01]));
        // The RTC: PNP0B00 and its I/O descriptor (tag 0x47, 16-bit
        // decode, 0x70-0x70, alignment 1, 2 ports), no IRQ descriptor.
        assert!(dsdt_bytes.windows(4).any(|w| w == b"RTC_"));
        assert!(dsdt_bytes.windows(4).any(|w| w == [0x41, 0xd0, 0x0b, 0x00]));
        assert!(dsdt_bytes.windows(8).any(|w| w == [0x47, 1, 0x70, 0, 0x70, 0, 1, 2]));
        // IAPC_BOOT_ARCH (offset 109) leaves CMOS_RTC_NOT_PRESENT clear;
        // CENTURY (offset 108) names the century byte.
        assert_eq!(b[fadt + 109] & (1 << 5), 0);
        assert_eq!(b[fadt + 108], RTC_CENTURY_REGISTER);
        let sleep_ctl = fadt + 244;
        assert_eq!(b[sleep_ctl], 1, "system I/O space");
        assert_eq!(u64_at(b, sleep_ctl + 4), u64::from(SLEEP_CONTROL_PORT));

        // MADT: three enabled local APICs with IDs 0..3, then the IOAPIC.
        let madt = sigs[1].1;
        assert_eq!(u32_at(b, madt + 36), LAPIC_ADDR as u32);
        let mut off = madt + 44;
        for id in 0..3u8 {
            assert_eq!(&b[off..off + 5], &[0, 8, id, id, 1]);
            off += 8;
        }
        assert_eq!(&b[off..off + 3], &[1, 12, 3]);
        assert_eq!(u32_at(b, off + 4), IOAPIC_ADDR as u32);
        assert_eq!(off + 12, madt + sigs[1].2);
    }
}
