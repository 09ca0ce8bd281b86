//! Per-vCPU CPUID: KVM's supported set with this vCPU's APIC ID and a
//! topology of one socket with `vcpus` single-threaded cores.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjust KVM's supported CPUID `entries` for vCPU `id` of `vcpus`.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], id: u8, vcpus: u8) {
    let apic_id = u32::from(id);
    let vcpus = u32::from(vcpus);
    let core_bits = id_bits(vcpus);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: initial APIC ID, logical processors per package, CLFLUSH line.
                e.ebx = (apic_id << 24) | (vcpus.min(255) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((sharing.min(0xfff)) << 14) | ((vcpus - 1).min(63) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_SMT << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = vcpus;
                        e.ecx = (LEVEL_CORE << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                e.ebx = 0; // one thread per core, compute unit = core
                e.ecx = 0; // one node
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let base = vec![
            entry(1, 0),
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                eax: 0x121,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 0x163,
                ..Default::default()
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_001e, 0),
        ];
        for (id, vcpus) in [(0u8, 1u8), (1, 2), (5, 6)] {
            let mut e = base.clone();
            adjust(&mut e, id, vcpus);
            assert_eq!(e[0].ebx >> 24, u32::from(id));
            assert_eq!((e[0].ebx >> 16) & 0xff, u32::from(vcpus));
            assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
            assert_eq!(e[0].edx & EDX_HTT != 0, vcpus > 1);
            assert_eq!(e[1].eax >> 26, u32::from(vcpus) - 1);
            assert_eq!((e[1].eax >> 14) & 0xfff, 0, "L1 not shared");
            assert_eq!((e[2].eax >> 14) & 0xfff, u32::from(vcpus) - 1, "L3 shared");
            assert_eq!(e[2].eax & 0x3ff, 0x163);
            assert_eq!(e[3].edx, u32::from(id));
            assert_eq!((e[4].ebx, e[4].ecx >> 8), (u32::from(vcpus), LEVEL_CORE));
            assert!(1u32 << e[4].eax >= u32::from(vcpus));
            assert_eq!((e[5].eax, e[5].ebx, e[5].ecx), (0, 0, 2));
            assert_eq!(e[6].eax, u32::from(id));
        }
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
