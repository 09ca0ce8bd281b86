//! Everything that depends on which kind of KVM this host has, in one place.
//!
//! Users run on hardware-virtualised KVM (VMX/SVM). Development and CI
//! machines of this project expose a PVM hypervisor (`kvm_pvm`) in its
//! emulating mode: guest kernel code is interpreted, CPUID cannot be
//! filtered by the VMM, some instructions (cmpxchg16b, xrstor, popcnt,
//! SMAP, ...) cannot be emulated and KVM's PV features misbehave. On such a
//! host the guest kernel must be told on its command line to leave those
//! features alone.

use std::path::Path;

/// The kind of KVM this process runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualisation (VMX or SVM): nothing special.
    Hardware,
    /// PVM hypervisor; `emulating` when `pvm_native` is set, i.e. guest
    /// kernel code is interpreted.
    Pvm { emulating: bool },
}

/// Command line a Linux 6.1 guest needs on an emulating PVM host:
/// `nopv` (no KVM PV features: PV IPIs never complete there), `noxsave`,
/// and `clearcpuid=` for every feature whose instructions the emulator
/// cannot execute (X86_FEATURE_* bit numbers of Linux 6.1: CX16, POPCNT,
/// MOVBE, RDRAND, AVX*, FMA, AES, PCLMULQDQ, SSE4.x, SSSE3, BMI*, INVPCID,
/// RDSEED, ADX, CLFLUSHOPT, CLWB, SHA_NI, FSGSBASE, RDPID, PCID, SMAP,
/// SMEP, UMIP, PKU, GFNI, VAES, MOVDIR*, FSRM, SERIALIZE, XSAVE*, AVX-512*,
/// AMX*, RTM/HLE).
pub const PVM_CMDLINE: &str = "nopv noxsave clearcpuid=141,151,150,158,156,157,140,153,129,147,148,137,293,291,296,298,306,307,311,312,304,317,288,534,145,308,295,514,515,516,520,521,522,539,540,580,537,590,154,320,321,323,305,318,319,316,309,513,518,523,524,526,389,599,600,598,601,388,299,292";

/// Environment for the guest's user space on a PVM host, passed on the
/// kernel command line (the kernel hands `NAME=value` arguments to init,
/// and the guest agent hands them on to every process it starts).
///
/// `noxsave` makes the guest kernel switch tasks with FXSAVE, which keeps
/// only the x87 and SSE registers, but guest user code runs natively and
/// this hypervisor neither masks CPUID nor applies the guest's XCR0 (both
/// measured: a guest kernel that sets CR4.OSXSAVE and XCR0 = x87|SSE still
/// leaves XGETBV at the host's 0xe7 in user mode). So user space sees AVX
/// and AVX-512 as usable, and their upper register halves leak between
/// tasks: `mvm-vsock fpu` finds a %ymm8 pattern changed under it in a few
/// percent of its rounds, and PostgreSQL's workers crashed on corrupted
/// pointers. These variables keep the run-time dispatchers of glibc,
/// OpenSSL and Go to SSE code. Programs that probe CPUID themselves (Rust's
/// `is_x86_feature_detected!`, JITs) are not covered.
pub const PVM_USER_ENV: &[&str] = &[
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load,-FMA,-F16C",
    // OpenSSL's first word is CPUID.1 EDX:ECX (FMA, OSXSAVE, AVX, F16C off),
    // the second CPUID.7 EBX:ECX (AVX2, AVX-512*, VAES, VPCLMULQDQ off).
    "OPENSSL_ia32cap=~0x3800100000000000:~0x00005e42dc230020",
    "GODEBUG=cpu.avx=off,cpu.avx2=off",
];

impl HostKind {
    /// Detect the host's KVM from sysfs.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detection against a sysfs module directory (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        let pvm = sys_module.join("kvm_pvm");
        if !pvm.exists() {
            return HostKind::Hardware;
        }
        let emulating = std::fs::read_to_string(pvm.join("parameters/pvm_native"))
            .map(|v| v.trim() == "Y" || v.trim() == "1")
            .unwrap_or(false);
        HostKind::Pvm { emulating }
    }

    /// Kernel arguments this host needs, if any.
    pub fn required_cmdline(self) -> Option<&'static str> {
        match self {
            HostKind::Hardware => None,
            HostKind::Pvm { .. } => Some(PVM_CMDLINE),
        }
    }

    /// `NAME=value` environment the guest's user space needs here.
    pub fn user_env(self) -> &'static [&'static str] {
        match self {
            HostKind::Hardware => &[],
            HostKind::Pvm { .. } => PVM_USER_ENV,
        }
    }

    /// The one warning to log at VM start, if any.
    pub fn warning(self, host_cmdline: bool) -> Option<String> {
        match self {
            HostKind::Hardware => None,
            HostKind::Pvm { emulating } => Some(format!(
                "host KVM is PVM{}: guest kernel code runs {}; {}",
                if emulating { " in emulating mode" } else { "" },
                if emulating {
                    "interpreted (boots take minutes)"
                } else {
                    "paravirtualised"
                },
                if host_cmdline {
                    "adding nopv noxsave clearcpuid=... and SSE-only settings for user space (GLIBC_TUNABLES, ...) to the kernel command line"
                } else {
                    "boot.host_cmdline = false, so the guest kernel may stop on an instruction this host cannot emulate"
                }
            )),
        }
    }
}

/// Append the host's arguments to a command line unless already present.
///
/// On PVM the guest also gets the TSC frequency (`tsc_early_khz=`, from
/// `KVM_GET_TSC_KHZ`) and `tsc=reliable`: its interpreted kernel is far too
/// slow to calibrate the TSC against the PIT, and without a calibrated TSC
/// it falls back to jiffies and crawls.
///
/// Arguments after a `--` are init's own, so the host's go before it.
pub fn compose_cmdline(user: &str, host: HostKind, add_host: bool, tsc_khz: Option<u32>) -> String {
    let user = user.trim();
    let (kernel, init_args) = match user.split_once(" -- ") {
        Some((k, i)) => (k.trim_end(), Some(i)),
        None if user == "--" || user.starts_with("-- ") => ("", user.strip_prefix("--").map(str::trim_start)),
        None => (user, None),
    };
    let mut cmdline = kernel.to_string();
    if let (true, Some(required)) = (add_host, host.required_cmdline()) {
        let mut extra: Vec<String> = required.split(' ').map(String::from).collect();
        if let Some(khz) = tsc_khz.filter(|k| *k > 0) {
            extra.push("tsc=reliable".into());
            extra.push(format!("tsc_early_khz={khz}"));
        }
        extra.extend(host.user_env().iter().map(|e| e.to_string()));
        for arg in extra {
            let key = arg.split('=').next().unwrap_or(&arg);
            let present = cmdline.split_whitespace().any(|a| a.split('=').next() == Some(key));
            if !present {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&arg);
            }
        }
    }
    if let Some(init_args) = init_args {
        cmdline.push_str(" -- ");
        cmdline.push_str(init_args);
    }
    cmdline.trim().to_string()
}

/// A decoded `KVM_EXIT_INTERNAL_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    pub suberror: u32,
    /// Bytes of the instruction the emulator failed on, when KVM reports them.
    pub instruction: Vec<u8>,
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

impl InternalError {
    /// Decode `kvm_run.internal`: `data[0]` holds flags; with the
    /// instruction-bytes flag, `data[1]`'s low byte is the instruction
    /// length and the bytes follow. Never trusts `ndata` or the length.
    pub fn decode(suberror: u32, ndata: u32, data: &[u64]) -> Self {
        let ndata = (ndata as usize).min(data.len());
        let mut instruction = Vec::new();
        if suberror == KVM_INTERNAL_ERROR_EMULATION && ndata >= 2 && data[0] & EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
            let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(bytes[0]).min(15).min(bytes.len() - 1);
            instruction = bytes[1..=len].to_vec();
        }
        InternalError { suberror, instruction }
    }

    /// A human name for a few instructions known to fail on PVM hosts.
    pub fn known_instruction(&self) -> Option<&'static str> {
        let i = self.instruction.as_slice();
        let body = i
            .iter()
            .position(|b| !matches!(b, 0xf0 | 0xf2 | 0xf3 | 0x66 | 0x40..=0x4f))
            .map(|p| &i[p..])?;
        let modrm_reg = |m: u8| (m >> 3) & 7;
        Some(match body {
            [0xcc, ..] => "int3",
            [0x9b, ..] => "fwait",
            [0x0f, 0x01, 0xca, ..] => "clac (SMAP)",
            [0x0f, 0x01, 0xcb, ..] => "stac (SMAP)",
            [0x0f, 0xb8, ..] => "popcnt",
            [0x0f, 0xc7, m, ..] if modrm_reg(*m) == 1 => "cmpxchg8b/cmpxchg16b",
            [0x0f, 0xae, m, ..] if modrm_reg(*m) == 5 && *m < 0xc0 => "xrstor",
            [0x0f, 0xae, m, ..] if modrm_reg(*m) == 4 && *m < 0xc0 => "xsave",
            _ => return None,
        })
    }
}

impl std::fmt::Display for InternalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.suberror == KVM_INTERNAL_ERROR_EMULATION {
            write!(f, "KVM could not emulate an instruction")?;
        } else {
            write!(f, "KVM internal error, suberror {}", self.suberror)?;
        }
        if !self.instruction.is_empty() {
            let hex: Vec<String> = self.instruction.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, "; instruction bytes: {}", hex.join(" "))?;
            if let Some(name) = self.known_instruction() {
                write!(f, " ({name})")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("mvm-host-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Hardware);
        std::fs::create_dir_all(dir.join("kvm_pvm/parameters")).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Pvm { emulating: false });
        std::fs::write(dir.join("kvm_pvm/parameters/pvm_native"), "Y\n").unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Pvm { emulating: true });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cmdline_gets_host_args_once() {
        let pvm = HostKind::Pvm { emulating: true };
        assert_eq!(
            compose_cmdline(" console=ttyS0 ", HostKind::Hardware, true, Some(1000)),
            "console=ttyS0"
        );
        assert_eq!(
            compose_cmdline("console=ttyS0", pvm, false, Some(1000)),
            "console=ttyS0"
        );
        let c = compose_cmdline("console=ttyS0", pvm, true, None);
        assert!(c.starts_with("console=ttyS0 nopv noxsave clearcpuid=141,"), "{c}");
        assert!(!c.contains("tsc"), "{c}");
        let c = compose_cmdline("console=ttyS0", pvm, true, Some(2_596_134));
        assert!(
            c.contains(",292 tsc=reliable tsc_early_khz=2596134 GLIBC_TUNABLES="),
            "{c}"
        );
        let env = PVM_USER_ENV.join(" ");
        assert!(c.ends_with(&env), "{c}");
        // A user who set clearcpuid=, tsc= or GODEBUG= themselves keeps theirs.
        let c = compose_cmdline("nopv clearcpuid=1 tsc=unstable GODEBUG=x=1", pvm, true, Some(5));
        assert!(
            c.starts_with("nopv clearcpuid=1 tsc=unstable GODEBUG=x=1 noxsave tsc_early_khz=5 GLIBC_TUNABLES="),
            "{c}"
        );
        assert_eq!(c.matches("GODEBUG=").count(), 1, "{c}");
        // Init's own arguments stay last, after "--".
        let c = compose_cmdline("console=ttyS0 -- -s x", pvm, true, None);
        assert!(c.starts_with("console=ttyS0 nopv noxsave "), "{c}");
        assert!(c.ends_with(" -- -s x"), "{c}");
        assert_eq!(compose_cmdline("-- single", pvm, false, None), "-- single");
        assert_eq!(compose_cmdline("quiet", HostKind::Hardware, true, None), "quiet");
    }

    #[test]
    fn decodes_instruction_bytes() {
        // flags = 1, then len 4 and lock cmpxchg16b (%rdi): f0 48 0f c7 0f -> 5 bytes
        let mut raw = [0u8; 24];
        raw[0] = 5;
        raw[1..6].copy_from_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        let words: Vec<u64> = raw
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let data = [1, words[0], words[1], words[2]];
        let e = InternalError::decode(1, 4, &data);
        assert_eq!(e.instruction, vec![0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
        assert_eq!(e.known_instruction(), Some("cmpxchg8b/cmpxchg16b"));
        let msg = e.to_string();
        assert!(msg.contains("f0 48 0f c7 0f (cmpxchg8b/cmpxchg16b)"), "{msg}");

        let xrstor = InternalError {
            suberror: 1,
            instruction: vec![0x48, 0x0f, 0xae, 0x2f],
        };
        assert_eq!(xrstor.known_instruction(), Some("xrstor"));
        assert_eq!(
            InternalError {
                suberror: 1,
                instruction: vec![0xcc]
            }
            .known_instruction(),
            Some("int3")
        );
    }

    #[test]
    fn decode_never_trusts_guest_lengths() {
        // Claimed length 255 with only 8 bytes present.
        let e = InternalError::decode(1, 2, &[1, 0xffff_ffff_ffff_ffff]);
        assert_eq!(e.instruction.len(), 7);
        // ndata larger than the array.
        let e = InternalError::decode(1, 1000, &[1, 0x0000_0000_0000_cc01]);
        assert_eq!(e.instruction, vec![0xcc]);
        // No instruction-bytes flag, other suberrors, short data.
        assert!(InternalError::decode(1, 2, &[0, 0x01cc]).instruction.is_empty());
        assert!(InternalError::decode(3, 2, &[1, 0x01cc]).instruction.is_empty());
        assert!(InternalError::decode(1, 1, &[1]).instruction.is_empty());
        assert!(InternalError::decode(1, 0, &[]).instruction.is_empty());
        assert_eq!(
            InternalError::decode(2, 0, &[]).to_string(),
            "KVM internal error, suberror 2"
        );
        let all_prefix = InternalError {
            suberror: 1,
            instruction: vec![0xf0, 0x66],
        };
        assert_eq!(all_prefix.known_instruction(), None);
    }
}
