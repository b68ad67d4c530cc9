//! Validation of a VM configuration before anything is allocated. Every error names the
//! field and the value that was wrong.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ray_api::vmm::VmConfig;

use crate::boot::BootSpec;

/// Most vCPUs a VM of this VMM can have. It is the VMM's own limit, not a guest's: vCPU
/// `i` gets APIC ID `i` (CPUID leaf 1 EBX[31:24] and the x2APIC ID of leaves 0xb/0x1f),
/// and the MADT describes IDs 0..=253 with xAPIC entries, 0xff being the broadcast ID and
/// the I/O APIC taking the ID after the last CPU's (see [`crate::boot::MAX_VCPUS`]). A
/// guest that supports fewer CPUs (rayvisor's own runs on at most
/// [`ray_guest_abi::MAX_CPUS`]) leaves the others parked. The host's KVM may allow fewer:
/// see [`KvmVcpuLimits`].
pub const MAX_VCPUS: u8 = crate::boot::MAX_VCPUS;

pub const MIN_MEMORY: u64 = 32 << 20;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error(
        "vcpus {vcpus} is more than this host's KVM allows: {} vCPUs (KVM_CAP_MAX_VCPUS {}, \
         KVM_CAP_MAX_VCPU_ID {}); this VMM supports up to {MAX_VCPUS}",
        host.max_vcpus(), host.max_vcpus, host.max_vcpu_id
    )]
    HostVcpus { vcpus: u8, host: KvmVcpuLimits },
    #[error("memory_bytes must be a multiple of 4096 (a whole number of pages), got {0}")]
    MemoryUnaligned(u64),
    #[error("memory_bytes must be at least {MIN_MEMORY} (32 MiB), got {0}")]
    MemoryTooSmall(u64),
    #[error("memory_bytes {got} is more than this host has ({host} bytes)")]
    MemoryTooLarge { got: u64, host: u64 },
    #[error("kernel file {0} does not exist or is not a regular file")]
    KernelMissing(PathBuf),
    #[error("initrd file {0} does not exist or is not a regular file")]
    InitrdMissing(PathBuf),
    #[error("{0}")]
    Boot(String),
    #[error("disk {id}: {why}")]
    Disk { id: String, why: String },
    #[error("devices.net[{index}]: {why}")]
    Net { index: usize, why: String },
    #[error(transparent)]
    Numa(#[from] crate::numa::NumaError),
    #[error("cannot read this host's NUMA topology: {0}")]
    Topology(String),
    #[error("numa_migration: {0}")]
    NumaMigration(String),
    #[error("{0}")]
    Gpus(String),
    #[error("devices.vsock: {0}")]
    Vsock(String),
}

/// Checks the disks of `devices`: ids unique and usable as serials, files present with a
/// whole number of sectors, rates above zero.
pub fn check_disks(devices: &ray_api::vmm::DevicesConfig) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for d in &devices.disks {
        let bad = |why: String| ConfigError::Disk {
            id: d.id.clone(),
            why,
        };
        let id_ok = !d.id.is_empty()
            && d.id.len() <= 20
            && d.id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok || d.id == "rng" || d.id == "vsock" {
            return Err(bad(
                "an id is 1 to 20 of A-Z a-z 0-9 - _ (and not 'rng' or 'vsock')".into(),
            ));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(bad("two disks have this id".into()));
        }
        if d.rate_bytes == Some(0) || d.rate_ops == Some(0) {
            return Err(bad("a rate limit must be above zero".into()));
        }
        let path = Path::new(&d.path);
        let file = crate::jailed::open_disk(path, false, false)
            .map_err(|e| bad(format!("cannot open {}: {e}", d.path)))?;
        let size =
            ray_devices::virtio::blk::disk_size(&file, path).map_err(|e| bad(e.to_string()))?;
        if !size.is_multiple_of(512) || size == 0 {
            return Err(bad(format!(
                "{} has {size} bytes; a disk is a whole, non-zero number of 512-byte sectors",
                d.path
            )));
        }
    }
    Ok(())
}

/// Total RAM of the host in bytes, from /proc/meminfo.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

/// What the host's KVM allows for one VM's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmVcpuLimits {
    /// `KVM_CAP_MAX_VCPUS` (`KVM_CAP_NR_VCPUS` on kernels without it): vCPUs per VM.
    pub max_vcpus: u32,
    /// `KVM_CAP_MAX_VCPU_ID` (`max_vcpus` on kernels without it): vCPU (= APIC) IDs must
    /// be below it.
    pub max_vcpu_id: u32,
}

impl KvmVcpuLimits {
    /// Most vCPUs a VM can have here: this VMM numbers them 0..n, so n must fit both.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus.min(self.max_vcpu_id)
    }
}

/// The vCPU limits of this host's KVM, asked once per process; `None` if /dev/kvm cannot
/// be opened (creating the VM then fails with its own error).
pub fn host_kvm_limits() -> Option<KvmVcpuLimits> {
    static LIMITS: OnceLock<Option<KvmVcpuLimits>> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Some(KvmVcpuLimits {
            max_vcpus: clamp(kvm.get_max_vcpus()),
            max_vcpu_id: clamp(kvm.get_max_vcpu_id()),
        })
    })
}

/// Checks a vCPU count against this VMM's limit and, when known, the host's.
pub fn check_vcpus(vcpus: u8, host: Option<KvmVcpuLimits>) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::Vcpus(vcpus));
    }
    match host {
        Some(host) if u32::from(vcpus) > host.max_vcpus() => {
            Err(ConfigError::HostVcpus { vcpus, host })
        }
        _ => Ok(()),
    }
}

fn regular_file(path: &Path) -> bool {
    path.metadata().map(|m| m.is_file()).unwrap_or(false)
}

/// Checks `config` against the limits of this VMM and host (`host_mem` bytes of RAM).
pub fn validate(config: &VmConfig, host_mem: u64) -> Result<BootSpec, ConfigError> {
    validate_shape(config, host_mem)?;
    let mem = config.memory_bytes;
    let kernel = PathBuf::from(&config.kernel);
    if !regular_file(&kernel) {
        return Err(ConfigError::KernelMissing(kernel));
    }
    let initrd = config.initrd.as_ref().map(PathBuf::from);
    if let Some(p) = &initrd {
        if !regular_file(p) {
            return Err(ConfigError::InitrdMissing(p.clone()));
        }
    }
    check_disks(&config.devices)?;
    let spec = BootSpec {
        kernel,
        initrd,
        cmdline: config.cmdline.clone(),
        vcpus: config.vcpus,
        mem_bytes: mem,
        devices: config.devices.clone(),
        numa: guest_numa(config)?,
        attribution: config.numa_attribution == ray_api::vmm::NumaAttribution::Ring,
    };
    crate::boot::validate(&spec).map_err(|e| ConfigError::Boot(e.to_string()))?;
    Ok(spec)
}

/// The page migration policy needs a window of at least 100 ms and a positive rate limit
/// (also while it is off: a value given is a value checked), and, unless it is off, the
/// rings' attribution and guest nodes to act on.
pub fn check_numa_migration(config: &VmConfig) -> Result<(), ConfigError> {
    let m = &config.numa_migration;
    let why = if m.window_ms < 100 {
        format!("window_ms {} is shorter than 100", m.window_ms)
    } else if !(m.rate_limit_mib_s.is_finite() && m.rate_limit_mib_s > 0.0) {
        format!(
            "rate_limit_mib_s {} is not a positive number",
            m.rate_limit_mib_s
        )
    } else if m.mode == ray_api::vmm::NumaMigrationMode::Off {
        return Ok(());
    } else if config.numa_attribution != ray_api::vmm::NumaAttribution::Ring {
        "it needs numa_attribution ring (--numa-attribution ring)".to_string()
    } else if config.numa.is_empty() {
        "it needs guest NUMA nodes (--numa) to know each vCPU's host node".to_string()
    } else {
        return Ok(());
    };
    Err(ConfigError::NumaMigration(why))
}

/// How long the host's CPU load is sampled to place guest nodes automatically.
const LOAD_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// The guest NUMA nodes of `config`, checked against this host's topology (read only
/// when there are nodes), with host nodes chosen for the nodes given none.
pub fn guest_numa(config: &VmConfig) -> Result<Option<crate::numa::GuestNuma>, ConfigError> {
    if config.numa.is_empty() {
        return Ok(None);
    }
    let topology = ray_numa::Topology::host().map_err(|e| ConfigError::Topology(e.to_string()))?;
    // CPU load matters only to nodes placed automatically: measure it only for them.
    let load = if config.numa.iter().any(|n| n.host_nodes.is_empty()) {
        ray_numa::placement::cpu_load(&topology, LOAD_WINDOW)
    } else {
        Vec::new()
    };
    Ok(crate::numa::plan(config, &topology, &load)?)
}

/// The checks of [`validate`] but the files: vCPUs (against this VMM's limit and the
/// host KVM's), memory and guest NUMA nodes. Enough for a migration target, whose
/// machine comes from the source's state rather than from a kernel.
pub fn validate_shape(config: &VmConfig, host_mem: u64) -> Result<(), ConfigError> {
    check_vcpus(config.vcpus, host_kvm_limits())?;
    for (index, net) in config.devices.net.iter().enumerate() {
        net.validate()
            .map_err(|why| ConfigError::Net { index, why })?;
    }
    check_numa_migration(config)?;
    // First: a binding to host nodes is more specific than the host's total memory.
    guest_numa(config)?;
    if let Some(v) = &config.devices.vsock {
        v.validate().map_err(ConfigError::Vsock)?;
    }
    let mem = config.memory_bytes;
    if !mem.is_multiple_of(PAGE) {
        return Err(ConfigError::MemoryUnaligned(mem));
    }
    if mem < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(mem));
    }
    if mem > host_mem {
        return Err(ConfigError::MemoryTooLarge {
            got: mem,
            host: host_mem,
        });
    }
    crate::boot::vram(&config.devices, mem).map_err(|e| ConfigError::Gpus(e.to_string()))?;
    crate::display::check_remote_gpus(&config.devices.gpus).map_err(ConfigError::Gpus)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_checks_vcpus_and_memory_but_no_files() {
        let c = config(2, 64 << 20, "");
        assert_eq!(validate_shape(&c, 1 << 30), Ok(()));
        assert_eq!(
            validate_shape(&config(0, 64 << 20, ""), 1 << 30),
            Err(ConfigError::Vcpus(0))
        );
        assert!(matches!(
            validate(&c, 1 << 30),
            Err(ConfigError::KernelMissing(_))
        ));
    }

    fn config(vcpus: u8, memory_bytes: u64, kernel: &str) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus,
            memory_bytes,
            devices: Default::default(),
            numa: Vec::new(),
            numa_attribution: Default::default(),
            numa_migration: Default::default(),
        }
    }

    fn kernel_file() -> PathBuf {
        let p = std::env::temp_dir().join(format!("ray-config-kernel-{}", std::process::id()));
        std::fs::write(&p, b"not really a kernel").unwrap();
        p
    }

    #[test]
    fn zero_and_too_many_vcpus_are_refused_with_the_value() {
        let k = kernel_file();
        let k = k.to_str().unwrap();
        assert_eq!(
            validate(&config(0, 64 << 20, k), u64::MAX)
                .unwrap_err()
                .to_string(),
            "vcpus must be between 1 and 254, got 0"
        );
        assert_eq!(
            validate(&config(255, 64 << 20, k), u64::MAX).unwrap_err(),
            ConfigError::Vcpus(255)
        );
    }

    #[test]
    fn the_limit_is_the_vmms_254_not_the_test_guests() {
        assert_eq!(MAX_VCPUS, 254);
        assert!(usize::from(MAX_VCPUS) > ray_guest_abi::MAX_CPUS);
        let roomy = Some(KvmVcpuLimits {
            max_vcpus: 1024,
            max_vcpu_id: 4096,
        });
        for n in [1, 2, 64, 65, 70, 253, 254] {
            assert_eq!(check_vcpus(n, roomy), Ok(()), "{n}");
            assert_eq!(check_vcpus(n, None), Ok(()), "{n}");
        }
        assert_eq!(check_vcpus(0, roomy), Err(ConfigError::Vcpus(0)));
        assert_eq!(check_vcpus(255, roomy), Err(ConfigError::Vcpus(255)));
        assert_eq!(check_vcpus(255, None), Err(ConfigError::Vcpus(255)));
    }

    #[test]
    fn a_host_kvm_allowing_fewer_vcpus_is_named_with_both_numbers() {
        let few = Some(KvmVcpuLimits {
            max_vcpus: 64,
            max_vcpu_id: 1024,
        });
        assert_eq!(check_vcpus(64, few), Ok(()));
        let err = check_vcpus(65, few).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vcpus 65 is more than this host's KVM allows: 64 vCPUs (KVM_CAP_MAX_VCPUS 64, \
             KVM_CAP_MAX_VCPU_ID 1024); this VMM supports up to 254"
        );
        // vCPU i has id i, so ids are as binding as the count.
        let ids = KvmVcpuLimits {
            max_vcpus: 288,
            max_vcpu_id: 100,
        };
        assert_eq!(check_vcpus(100, Some(ids)), Ok(()));
        assert_eq!(
            check_vcpus(101, Some(ids)),
            Err(ConfigError::HostVcpus {
                vcpus: 101,
                host: ids
            })
        );
    }

    #[test]
    fn this_hosts_kvm_limits_are_read_when_there_is_kvm() {
        if !Path::new("/dev/kvm").exists() {
            return;
        }
        let host = host_kvm_limits().expect("/dev/kvm exists but its limits cannot be read");
        assert!(host.max_vcpus() >= 1, "{host:?}");
        eprintln!("this host's KVM: {host:?}");
    }

    #[test]
    fn memory_must_be_page_aligned_large_enough_and_available() {
        let k = kernel_file();
        let k = k.to_str().unwrap();
        assert_eq!(
            validate(&config(1, (64 << 20) + 1, k), u64::MAX).unwrap_err(),
            ConfigError::MemoryUnaligned((64 << 20) + 1)
        );
        assert_eq!(
            validate(&config(1, 16 << 20, k), u64::MAX).unwrap_err(),
            ConfigError::MemoryTooSmall(16 << 20)
        );
        let err = validate(&config(1, 8 << 30, k), 4 << 30).unwrap_err();
        assert!(err.to_string().contains("8589934592"), "{err}");
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = validate(&config(1, 64 << 20, "/nonexistent/vmlinux"), u64::MAX).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel file /nonexistent/vmlinux does not exist or is not a regular file"
        );
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory() > MIN_MEMORY);
    }
}
