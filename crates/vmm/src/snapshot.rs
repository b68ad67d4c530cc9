//! Full snapshots of a paused VM, and restoring them into a new VMM process.
//!
//! A snapshot is a directory:
//! - `manifest.json`: human-readable: id, VM id and configuration, creation time, format
//!   version, hypervisor flavour, CPU fingerprint, sizes and checksums;
//! - `state.bin`: a `ray_snapshot::StateFile` (magic, version, length, payload, CRC32, read
//!   with a size limit); the payload is the machine state (vCPUs, VM, devices);
//! - `memory.raw`: guest RAM laid out by guest-physical address, zero pages left as holes.
//!
//! It is written into `.tmp-<id>` beside its final place, every file fsynced, then renamed
//! and the parent directory fsynced: a half-written snapshot never looks like one.
//! Restore maps `memory.raw` privately (copy-on-write), so restoring a 1 GiB guest costs
//! about what restoring a 128 MiB one does. Memory checksums are verified unless asked not
//! to, which is the one step whose cost follows the guest's size.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ray_api::vmm::VmConfig;
use serde::{Deserialize, Serialize};

use crate::machine::MachineState;
use crate::memory::GuestMem;

pub const FORMAT_VERSION: u32 = 1;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The state file: ray-snapshot's container reads and checks it.
    #[error(transparent)]
    State(#[from] ray_snapshot::FileError),
    #[error("{path} has format version {got}; this rayvisor reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, got: u32 },
    #[error("{path} is damaged: checksum {got:#010x}, expected {expected:#010x}{location}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        got: u32,
        location: String,
    },
    #[error("the manifest {path} is invalid: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("the snapshot's state cannot be decoded: {0}")]
    Decode(String),
    #[error("{0}")]
    Incompatible(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A run of non-zero guest pages saved in `memory.raw` (at file offset = `gpa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRun {
    pub gpa: u64,
    pub len: u64,
    pub crc32: u32,
}

/// The human-readable description of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub vm_id: String,
    pub created_ms: u64,
    pub config: VmConfig,
    /// `pvm` or `vmx_svm`: a snapshot only restores on the same flavour.
    pub hypervisor: String,
    /// Hash of the CPUID the host's KVM supports; a snapshot only restores where it matches.
    pub cpu_fingerprint: String,
    pub memory_bytes: u64,
    /// Bytes of `memory.raw` actually allocated on disk (holes excluded).
    pub memory_allocated_bytes: u64,
    pub state_bytes: u64,
    pub state_crc32: u32,
    /// Every run of non-zero pages in `memory.raw` with its CRC32; everything else is zero.
    pub memory_runs: Vec<MemoryRun>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest, SnapshotError> {
        let path = dir.join("manifest.json");
        let text = fs::read(&path).map_err(io("read", &path))?;
        let m: Manifest = serde_json::from_slice(&text).map_err(|e| SnapshotError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path,
                got: m.format_version,
            });
        }
        Ok(m)
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), SnapshotError> {
    let mut f = File::create(path).map_err(io("create", path))?;
    f.write_all(data).map_err(io("write", path))?;
    f.sync_all().map_err(io("fsync", path))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 words is always valid; align_to
        // gives the unaligned head and tail back as bytes.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// The guest memory at `gpa..gpa + len` (which lies inside one region).
fn guest_slice<'a>(slices: &[(u64, &'a [u8])], gpa: u64, len: u64) -> Option<&'a [u8]> {
    slices.iter().find_map(|(start, s)| {
        let off = gpa.checked_sub(*start)?;
        s.get(off as usize..(off + len) as usize)
    })
}

/// Writes the non-zero pages of guest memory at file offset = guest-physical address and
/// returns the runs written with their checksums.
fn write_memory(mem: &GuestMem, path: &Path) -> Result<Vec<MemoryRun>, SnapshotError> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io("create", path))?;
    // SAFETY: the VM is paused while its snapshot is written.
    let slices = unsafe { crate::memory::host_slices(mem) };
    let end = slices
        .iter()
        .map(|(gpa, s)| gpa + s.len() as u64)
        .max()
        .unwrap_or(0);
    f.set_len(end).map_err(io("size", path))?;
    let mut runs = Vec::new();
    let mut emit = |gpa: u64, bytes: &[u8]| -> Result<(), SnapshotError> {
        f.write_all_at(bytes, gpa).map_err(io("write", path))?;
        runs.push(MemoryRun {
            gpa,
            len: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        });
        Ok(())
    };
    for (gpa, len) in crate::memory::data_extents(mem) {
        let Some(extent) = guest_slice(&slices, gpa, len) else {
            continue;
        };
        // Runs of non-zero pages are written with one call each.
        let mut run: Option<usize> = None;
        for (i, page) in extent.chunks(PAGE).enumerate() {
            match (is_zero(page), run) {
                (false, None) => run = Some(i),
                (true, Some(start)) => {
                    emit(gpa + (start * PAGE) as u64, &extent[start * PAGE..i * PAGE])?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            emit(gpa + (start * PAGE) as u64, &extent[start * PAGE..])?;
        }
    }
    f.sync_all().map_err(io("fsync", path))?;
    Ok(runs)
}

/// What a new snapshot describes.
pub struct SnapshotMeta<'a> {
    pub id: &'a str,
    pub vm_id: &'a str,
    pub config: &'a VmConfig,
    pub hypervisor: &'a str,
    pub cpu_fingerprint: String,
}

/// Writes a full snapshot of a paused VM to `dir` (which must not exist yet).
pub fn create(
    dir: &Path,
    meta: SnapshotMeta,
    state: &MachineState,
    mem: &GuestMem,
) -> Result<Manifest, SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Incompatible(format!(
            "{} already exists; a snapshot never overwrites another",
            dir.display()
        )));
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io("create", parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".tmp-{name}"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io("create", &tmp))?;

    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    let (state_bytes, state_crc32) =
        ray_snapshot::StateFile::write(&tmp.join("state.bin"), &payload)?;
    let memory_path = tmp.join("memory.raw");
    let memory_runs = write_memory(mem, &memory_path)?;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&memory_path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id: meta.id.to_string(),
        vm_id: meta.vm_id.to_string(),
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        config: meta.config.clone(),
        hypervisor: meta.hypervisor.to_string(),
        cpu_fingerprint: meta.cpu_fingerprint,
        memory_bytes: meta.config.memory_bytes,
        memory_allocated_bytes: allocated,
        state_bytes,
        state_crc32,
        memory_runs,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    write_synced(&tmp.join("manifest.json"), &text)?;
    sync_dir(&tmp)?;
    fs::rename(&tmp, dir).map_err(io("rename", &tmp))?;
    sync_dir(parent)?;
    Ok(manifest)
}

/// Reads and checks a snapshot's manifest and state.
pub fn load(dir: &Path) -> Result<(Manifest, MachineState), SnapshotError> {
    let manifest = Manifest::read(dir)?;
    let payload = ray_snapshot::StateFile::read(
        &dir.join("state.bin"),
        ray_snapshot::StateFile::DEFAULT_LIMIT,
    )?;
    let state: MachineState =
        serde_json::from_slice(&payload).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    Ok((manifest, state))
}

/// Checks restored memory against the checksums of the runs the manifest lists.
pub fn verify_memory(dir: &Path, manifest: &Manifest, mem: &GuestMem) -> Result<(), SnapshotError> {
    // SAFETY: the restored VM has not started: nothing writes its memory.
    let slices = unsafe { crate::memory::host_slices(mem) };
    for run in &manifest.memory_runs {
        let bytes =
            guest_slice(&slices, run.gpa, run.len).ok_or_else(|| SnapshotError::Manifest {
                path: dir.join("manifest.json"),
                reason: format!(
                    "memory run at {:#x} ({} bytes) lies outside guest memory",
                    run.gpa, run.len
                ),
            })?;
        let got = crc32fast::hash(bytes);
        if got != run.crc32 {
            return Err(SnapshotError::Checksum {
                path: dir.join("memory.raw"),
                expected: run.crc32,
                got,
                location: format!(" in guest memory {:#x}..{:#x}", run.gpa, run.gpa + run.len),
            });
        }
    }
    Ok(())
}

/// A fingerprint of the CPU features KVM offers here, compared at restore. Only feature
/// leaves count: others (APIC IDs, cache topology) differ from one host CPU to the next.
pub fn cpu_fingerprint(kvm: &kvm_ioctls::Kvm) -> String {
    let Ok(cpuid) = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES) else {
        return "unknown".into();
    };
    let mut h = crc32fast::Hasher::new();
    for e in cpuid.as_slice() {
        let words: &[u32] = match (e.function, e.index) {
            (1, _) => &[e.ecx, e.edx],
            (7, 0) => &[e.ebx, e.ecx, e.edx],
            (0xd, 0 | 1) => &[e.eax],
            (0x8000_0001, _) => &[e.ecx, e.edx],
            _ => continue,
        };
        h.update(&e.function.to_le_bytes());
        for w in words {
            h.update(&w.to_le_bytes());
        }
    }
    format!("{:08x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ray-snap-{}-{name}", std::process::id()))
    }

    #[test]
    fn memory_file_is_sparse_by_gpa_and_maps_back() {
        use vm_memory::{Bytes, GuestAddress};
        let regions = [(GuestAddress(0), 4 << 20), (GuestAddress(8 << 20), 2 << 20)];
        let mem = crate::memory::create(&regions).unwrap();
        mem.write_obj(0x1111_u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0x2222_u64, GuestAddress((8 << 20) + 0x5008))
            .unwrap();
        let path = temp("memory.raw");
        let runs = write_memory(&mem, &path).unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!((runs[0].gpa, runs[0].len), (0x3000, 4096));
        use std::os::unix::fs::MetadataExt;
        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 10 << 20);
        assert!(
            md.blocks() * 512 <= 64 << 10,
            "zero pages must be holes: {} bytes",
            md.blocks() * 512
        );
        let back = crate::memory::from_file(&regions, &path).unwrap();
        assert_eq!(back.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0x1111);
        assert_eq!(
            back.read_obj::<u64>(GuestAddress((8 << 20) + 0x5008))
                .unwrap(),
            0x2222
        );
        // Copy-on-write: writes to the restored memory never reach the file.
        back.write_obj(0x3333_u64, GuestAddress(0x3000)).unwrap();
        let again = crate::memory::from_file(&regions, &path).unwrap();
        assert_eq!(again.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0x1111);
        let manifest_runs = Manifest {
            format_version: FORMAT_VERSION,
            id: "t".into(),
            vm_id: "t".into(),
            created_ms: 0,
            config: VmConfig {
                kernel: "k".into(),
                initrd: None,
                cmdline: String::new(),
                vcpus: 1,
                memory_bytes: 6 << 20,
            },
            hypervisor: "pvm".into(),
            cpu_fingerprint: String::new(),
            memory_bytes: 6 << 20,
            memory_allocated_bytes: 0,
            state_bytes: 0,
            state_crc32: 0,
            memory_runs: runs,
        };
        verify_memory(Path::new("/snap"), &manifest_runs, &again).unwrap();
        // A flipped byte in the file is found and located.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x99], 0x3001).unwrap();
        let flipped = crate::memory::from_file(&regions, &path).unwrap();
        let err = verify_memory(Path::new("/snap"), &manifest_runs, &flipped)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/snap/memory.raw is damaged") && err.contains("0x3000..0x4000"),
            "{err}"
        );
        fs::remove_file(path).unwrap();
    }
}
