//! Loading the kernel (ELF or bzImage), the initrd and the command line.
use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use ray_guest_abi::{NOTE_DIRECT_SMP, NOTE_NAME};

use super::layout::{self, CMDLINE, CMDLINE_MAX, HIMEM};
use super::BootError;
use crate::memory::GuestMem;

/// Which boot protocol image the kernel file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An ELF (vmlinux, rayvisor's guest): entered at its ELF entry in 64-bit mode.
    Elf,
    /// A bzImage: its protected-mode part at 1 MiB, entered at the 64-bit entry (+0x200).
    BzImage,
}

const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
const PAGE: u64 = 4096;

pub struct Loaded {
    pub kind: KernelKind,
    /// The kernel carries rayvisor's direct-SMP note: start every vCPU at the entry.
    pub direct_smp: bool,
    pub entry: GuestAddress,
    pub end: u64,
    pub header: Option<setup_header>,
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn kernel_kind(path: &Path) -> Result<KernelKind, BootError> {
    let mut head = [0u8; 0x206];
    let mut f = File::open(path).map_err(|e| BootError::open("kernel", path, e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| BootError::open("kernel", path, e))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(KernelKind::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(KernelKind::BzImage)
    } else {
        Err(BootError::NotAKernel(path.to_path_buf()))
    }
}

pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<Loaded, BootError> {
    let kind = kernel_kind(path)?;
    let mut f = File::open(path).map_err(|e| BootError::open("kernel", path, e))?;
    let bad = |e: linux_loader::loader::Error| BootError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match kind {
        KernelKind::Elf => {
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
            Ok(Loaded {
                kind,
                direct_smp: elf_has_note(path, NOTE_NAME, NOTE_DIRECT_SMP)?,
                entry: r.kernel_load,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM))).map_err(bad)?;
            Ok(Loaded {
                kind,
                direct_smp: false,
                entry: GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY),
                end: r.kernel_end,
                header: r.setup_header,
            })
        }
    }
}

/// Whether the ELF at `path` has a note of `name`/`kind` in a PT_NOTE segment. The file is
/// untrusted: every offset and size is bounds-checked, and oversized headers are refused.
pub fn elf_has_note(path: &Path, name: &[u8], kind: u32) -> Result<bool, BootError> {
    const PT_NOTE: u32 = 4;
    const MAX_NOTES: u64 = 1 << 20;
    let data = std::fs::read(path).map_err(|e| BootError::open("kernel", path, e))?;
    let bad = |what: &str| BootError::Load {
        path: path.to_path_buf(),
        reason: format!("malformed ELF: {what}"),
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let phoff = u64_at(32).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = usize::from(u16_at(54).ok_or_else(|| bad("truncated header"))?);
    let phnum = usize::from(u16_at(56).ok_or_else(|| bad("truncated header"))?);
    if phentsize < 56 {
        return Err(bad("program header entries smaller than 56 bytes"));
    }
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflows"))?;
        if u32_at(ph).ok_or_else(|| bad("program headers past the end of the file"))? != PT_NOTE {
            continue;
        }
        let off = u64_at(ph + 8).ok_or_else(|| bad("truncated program header"))?;
        let size = u64_at(ph + 32).ok_or_else(|| bad("truncated program header"))?;
        if size > MAX_NOTES {
            return Err(bad("note segment larger than 1 MiB"));
        }
        let notes = data
            .get(off as usize..(off + size) as usize)
            .ok_or_else(|| bad("note segment past the end of the file"))?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let word = |o: usize| u32::from_le_bytes(notes[o..o + 4].try_into().expect("4 bytes"));
            let (namesz, descsz, ty) = (word(at) as usize, word(at + 4) as usize, word(at + 8));
            let name_at = at + 12;
            let desc_at = name_at + namesz.next_multiple_of(4);
            let next = desc_at
                .checked_add(descsz.next_multiple_of(4))
                .ok_or_else(|| bad("note size overflows"))?;
            if next > notes.len() {
                return Err(bad("note runs past its segment"));
            }
            if ty == kind && &notes[name_at..name_at + namesz] == name {
                return Ok(true);
            }
            at = next;
        }
    }
    Ok(false)
}

/// Puts the initrd page-aligned at the top of low RAM (below `max_addr` and the MMIO hole).
pub fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    mem_bytes: u64,
    kernel_end: u64,
    max_addr: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(|e| BootError::open("initrd", path, e))?;
    let size = f
        .metadata()
        .map_err(|e| BootError::open("initrd", path, e))?
        .len();
    let top = layout::low_ram_end(mem_bytes).min(max_addr.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    match addr {
        Some(addr) if addr >= kernel_end.next_multiple_of(PAGE) => {
            mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
                .map_err(|e| BootError::Load {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?;
            Ok((addr, size))
        }
        _ => Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            room: top.saturating_sub(kernel_end),
        }),
    }
}

/// Checks a command line: it must fit the 4 KiB area with its NUL and contain no NUL.
pub fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if let Some(at) = cmdline.find('\0') {
        return Err(BootError::CmdlineNul(at));
    }
    Ok(())
}

pub fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<usize, BootError> {
    check_cmdline(cmdline)?;
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(|_| BootError::Write {
            what: "command line",
            addr: CMDLINE,
        })?;
    Ok(cmdline.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ray-loader-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A minimal 64-bit ELF executable with one PT_LOAD segment of `code` at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 0x78];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little-endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&(paddr + 4).to_le_bytes()); // entry
        e[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
        e[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // vaddr
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // paddr
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn elf_segment_lands_at_its_paddr_and_entry_is_returned() {
        let mem = crate::memory::create(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let path = temp("elf", &tiny_elf(0x20_0000, b"RAYVISOR"));
        let loaded = load_kernel(&mem, &path).unwrap();
        assert_eq!(loaded.kind, KernelKind::Elf);
        assert_eq!(loaded.entry, GuestAddress(0x20_0004));
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&got, b"RAYVISOR");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_direct_smp_note_is_found_only_where_it_is() {
        let plain = temp("plain-elf", &tiny_elf(0x20_0000, b"RAYVISOR"));
        assert!(!elf_has_note(&plain, NOTE_NAME, NOTE_DIRECT_SMP).unwrap());
        // Same ELF plus a PT_NOTE segment holding the rayvisor note.
        let mut e = tiny_elf(0x20_0000, b"RAYVISOR");
        let note_off = e.len() as u64;
        e.extend_from_slice(&9u32.to_le_bytes());
        e.extend_from_slice(&4u32.to_le_bytes());
        e.extend_from_slice(&NOTE_DIRECT_SMP.to_le_bytes());
        e.extend_from_slice(b"rayvisor\0\0\0\0");
        e.extend_from_slice(&1u32.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&note_off.to_le_bytes());
        ph[32..40].copy_from_slice(&28u64.to_le_bytes());
        let ph_off = e.len() as u64;
        e.extend_from_slice(&ph);
        // Point the header at two program headers: copy the PT_LOAD next to the PT_NOTE.
        let load: Vec<u8> = e[0x40..0x78].to_vec();
        e.extend_from_slice(&load);
        e[32..40].copy_from_slice(&ph_off.to_le_bytes());
        e[56..58].copy_from_slice(&2u16.to_le_bytes());
        let noted = temp("noted-elf", &e);
        assert!(elf_has_note(&noted, NOTE_NAME, NOTE_DIRECT_SMP).unwrap());
        assert!(!elf_has_note(&noted, b"other\0", NOTE_DIRECT_SMP).unwrap());
        // A note claiming to be longer than its segment is an error, not a crash.
        let mut broken = e.clone();
        let at = note_off as usize;
        broken[at + 4..at + 8].copy_from_slice(&4096u32.to_le_bytes());
        let broken = temp("broken-elf", &broken);
        let err = elf_has_note(&broken, NOTE_NAME, NOTE_DIRECT_SMP).unwrap_err();
        assert!(
            err.to_string().contains("note runs past its segment"),
            "{err}"
        );
        for p in [plain, noted, broken] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn missing_and_foreign_files_are_named() {
        let mem = crate::memory::create(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let path = temp(
            "text",
            b"just some text, long enough to be read as a header",
        );
        let err = load_kernel(&mem, &path).err().unwrap();
        assert!(
            err.to_string().contains("neither an ELF nor a bzImage"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn cmdline_limits() {
        assert!(check_cmdline("console=ttyS0").is_ok());
        let long = "x".repeat(CMDLINE_MAX);
        assert_eq!(
            check_cmdline(&long).unwrap_err().to_string(),
            "the kernel command line has 4096 bytes; at most 4095 fit"
        );
        assert!(check_cmdline("a\0b")
            .unwrap_err()
            .to_string()
            .contains("byte 1"));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let mem = crate::memory::create(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let path = temp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &path, 64 << 20, 0x20_0000, u64::MAX).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr + size > (64 << 20) - 8192);
        let err = load_initrd(&mem, &path, 64 << 20, (64 << 20) - 4096, u64::MAX).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
