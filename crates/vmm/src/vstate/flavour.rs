//! Which kind of KVM this host offers.
//!
//! * `Pvm`: pagetable-based virtualization (`kvm_pvm`): guest code runs in hardware ring 3
//!   under shadow paging. A guest runs natively only with every mapping user-accessible,
//!   an 8 KiB-aligned top-level page table and its PVM VIF area registered (MSR
//!   0x4b564d10, which KVM does not list as saveable: save it explicitly). CR4.PCIDE is
//!   refused. The TSC cannot be written, so guest time must come from kvmclock.
//! * `VmxSvm`: hardware-assisted KVM (`kvm_intel` / `kvm_amd`).
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Pvm,
    VmxSvm,
}

/// MSR through which a guest registers its PVM virtual-IF area.
pub const MSR_PVM_VIF: u32 = 0x4b56_4d10;

impl Flavour {
    /// Detects the flavour from the loaded KVM vendor module.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Same as [`Flavour::detect`] under another sysfs root (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            Flavour::Pvm
        } else {
            Flavour::VmxSvm
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Pvm => "pvm",
            Flavour::VmxSvm => "vmx_svm",
        }
    }

    /// MSRs to save and restore on top of KVM's own saveable list.
    pub fn extra_msrs(self) -> &'static [u32] {
        match self {
            Flavour::Pvm => &[MSR_PVM_VIF],
            Flavour::VmxSvm => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_its_module_directory() {
        let root = std::env::temp_dir().join(format!("ray-flavour-{}", std::process::id()));
        std::fs::create_dir_all(root.join("kvm_intel")).unwrap();
        assert_eq!(Flavour::detect_in(&root), Flavour::VmxSvm);
        std::fs::create_dir_all(root.join("kvm_pvm")).unwrap();
        assert_eq!(Flavour::detect_in(&root), Flavour::Pvm);
        assert_eq!(Flavour::Pvm.extra_msrs(), &[MSR_PVM_VIF]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
