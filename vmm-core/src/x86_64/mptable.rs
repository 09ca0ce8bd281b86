//! Intel MultiProcessor Specification 1.4 table: how a kernel without ACPI
//! (or with `acpi=off`) finds the vCPUs, the IOAPIC and the IRQ routing.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// Highest vCPU count the table can describe: APIC IDs are one byte and
/// the IOAPIC takes the ID after the last vCPU.
pub const MAX_VCPUS: u8 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_FEATURE_FPU_APIC: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Build the floating pointer followed by the configuration table, for
/// placement at guest address `addr`. `cpu_signature` is CPUID leaf 1 EAX.
pub fn build(addr: u64, vcpus: u8, cpu_signature: u32) -> Result<Vec<u8>, String> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(format!("the MP table describes 1 to {MAX_VCPUS} vCPUs, not {vcpus}"));
    }
    let table_addr =
        u32::try_from(addr + FLOATING_LEN as u64).map_err(|_| format!("MP table address {addr:#x} is above 4 GiB"))?;
    let ioapic_id = vcpus;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id,
            LAPIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&cpu_signature.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // KVM's default routing sends ISA IRQ n to IOAPIC pin n; say exactly that.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_VECTORED, 0, 0, ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_EXTINT, 0u8), (INT_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = u16::try_from(HEADER_LEN + entries.len()).map_err(|_| "MP table too large".to_string())?;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"MVMDEV  ");
    table.extend_from_slice(b"microvm-dev ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: table present, no IMCR
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_hold() {
        for vcpus in [1u8, 2, 37, MAX_VCPUS] {
            let t = build(0xf_0000, vcpus, 0x806f8).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(ptr, 0xf_0010);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as usize;
            assert_eq!(count, vcpus as usize + 1 + 1 + IOAPIC_PINS as usize + 2);
            // Walk the entries: processors first, each with a unique APIC ID.
            let mut off = HEADER_LEN;
            let mut cpus = Vec::new();
            for _ in 0..count {
                let kind = cfg[off];
                if kind == ENTRY_PROCESSOR {
                    cpus.push((cfg[off + 1], cfg[off + 3]));
                    off += 20;
                } else {
                    off += 8;
                }
            }
            assert_eq!(off, len);
            assert_eq!(cpus.len(), vcpus as usize);
            assert_eq!(cpus[0], (0, CPU_ENABLED | CPU_BSP));
            assert!(cpus[1..]
                .iter()
                .enumerate()
                .all(|(i, c)| *c == (i as u8 + 1, CPU_ENABLED)));
        }
    }

    #[test]
    fn rejects_impossible_counts_and_addresses() {
        assert!(build(0xf_0000, 0, 0).is_err());
        assert!(build(0xf_0000, 255, 0).is_err());
        assert!(build(1 << 32, 1, 0).is_err());
    }
}
