//! Validation of a VM configuration before anything is allocated. Every error names the
//! field and the value that was wrong.
use std::path::{Path, PathBuf};

use ray_api::vmm::VmConfig;
use ray_guest_abi::MAX_CPUS;

use crate::boot::BootSpec;

pub const MIN_MEMORY: u64 = 32 << 20;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {MAX_CPUS}, got {0}")]
    Vcpus(u8),
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
    let spec = BootSpec {
        kernel,
        initrd,
        cmdline: config.cmdline.clone(),
        vcpus: config.vcpus,
        mem_bytes: mem,
    };
    crate::boot::validate(&spec).map_err(|e| ConfigError::Boot(e.to_string()))?;
    Ok(spec)
}

/// The checks of [`validate`] but the files: vCPUs and memory. Enough for a migration
/// target, whose machine comes from the source's state rather than from a kernel.
pub fn validate_shape(config: &VmConfig, host_mem: u64) -> Result<(), ConfigError> {
    if config.vcpus == 0 || usize::from(config.vcpus) > MAX_CPUS {
        return Err(ConfigError::Vcpus(config.vcpus));
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
            "vcpus must be between 1 and 64, got 0"
        );
        assert_eq!(
            validate(&config(65, 64 << 20, k), u64::MAX).unwrap_err(),
            ConfigError::Vcpus(65)
        );
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
