//! What the VMM reads from an ELF kernel itself, before linux-loader copies it: where its
//! loadable segments go (so a kernel that would overwrite the boot tables or run past RAM is
//! refused with a reason) and whether it carries rayvisor's direct-SMP note.
//!
//! The file is untrusted: every offset and size is bounds-checked, and nothing is trusted
//! to be small.

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PHDR_SIZE: usize = 56;
/// More note bytes than any kernel carries: refuse rather than scan gigabytes.
const MAX_NOTES: u64 = 1 << 20;
/// Likewise for the program header table (a vmlinux has about ten entries).
const MAX_PHDRS: usize = 64 << 10;

/// One PT_LOAD segment: guest-physical start and size in memory (bss included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub memsz: u64,
}

impl Segment {
    pub fn end(&self) -> Option<u64> {
        self.paddr.checked_add(self.memsz)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// (name, type) of every note in the PT_NOTE segments.
    pub notes: Vec<(Vec<u8>, u32)>,
}

impl ElfInfo {
    pub fn has_note(&self, name: &[u8], kind: u32) -> bool {
        self.notes.iter().any(|(n, k)| n == name && *k == kind)
    }
}

fn u16_at(data: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(data: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(data: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads `len` bytes at a file offset, or None past the end.
type ReadAt<'a> = dyn FnMut(u64, usize) -> Option<Vec<u8>> + 'a;

/// Parses the program headers and notes of a 64-bit little-endian ELF in memory.
pub fn parse(data: &[u8]) -> Result<ElfInfo, String> {
    parse_with(&mut |off, len| {
        let off = usize::try_from(off).ok()?;
        data.get(off..off.checked_add(len)?).map(<[u8]>::to_vec)
    })
}

/// Parses an ELF file reading only its header, program headers and notes: a vmlinux is
/// tens of MiB, and the API validates a configuration with this.
pub fn parse_file(file: &std::fs::File) -> Result<ElfInfo, String> {
    use std::os::unix::fs::FileExt;
    parse_with(&mut |off, len| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).ok()?;
        Some(buf)
    })
}

/// The parser proper; the error is the reason the file is malformed.
fn parse_with(read: &mut ReadAt) -> Result<ElfInfo, String> {
    let ehdr = read(0, 64).ok_or("truncated ELF header")?;
    if ehdr[..4] != *b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    let field = |o: usize| u64_at(&ehdr, o).unwrap_or(0);
    let (entry, phoff) = (field(24), field(32));
    let phentsize = usize::from(u16_at(&ehdr, 54).unwrap_or(0));
    let phnum = usize::from(u16_at(&ehdr, 56).unwrap_or(0));
    if phentsize < PHDR_SIZE {
        return Err(format!(
            "program header entries of {phentsize} bytes (at least {PHDR_SIZE} expected)"
        ));
    }
    if phnum * phentsize > MAX_PHDRS {
        return Err(format!(
            "{phnum} program headers of {phentsize} bytes (at most {MAX_PHDRS} bytes)"
        ));
    }
    let table = read(phoff, phnum * phentsize)
        .ok_or_else(|| format!("the {phnum} program headers at {phoff:#x} lie past the end"))?;
    let mut info = ElfInfo {
        entry,
        ..Default::default()
    };
    for ph in table.chunks_exact(phentsize) {
        let field = |o: usize| u64_at(ph, o).unwrap_or(0);
        match u32_at(ph, 0).unwrap_or(0) {
            PT_LOAD => info.segments.push(Segment {
                paddr: field(24),
                memsz: field(40),
            }),
            PT_NOTE => {
                let (off, size) = (field(8), field(32));
                if size > MAX_NOTES {
                    return Err(format!(
                        "a note segment of {size} bytes (at most {MAX_NOTES})"
                    ));
                }
                let notes = read(off, size as usize).ok_or_else(|| {
                    format!("the note segment at file offset {off:#x} lies past the end")
                })?;
                parse_notes(&notes, &mut info.notes)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

fn parse_notes(notes: &[u8], out: &mut Vec<(Vec<u8>, u32)>) -> Result<(), String> {
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let word = |o: usize| u32_at(notes, o).unwrap_or(0) as usize;
        let (namesz, descsz, kind) = (word(at), word(at + 4), word(at + 8) as u32);
        let name_at = at + 12;
        let next = namesz
            .checked_next_multiple_of(4)
            .and_then(|n| n.checked_add(name_at))
            .and_then(|d| d.checked_add(descsz.checked_next_multiple_of(4)?))
            .filter(|&next| next <= notes.len())
            .ok_or_else(|| "note runs past its segment".to_string())?;
        out.push((notes[name_at..name_at + namesz].to_vec(), kind));
        at = next;
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal 64-bit ELF executable with one PT_LOAD segment of `code` at `paddr`,
    /// entered 4 bytes in. `bss` extra bytes of memory follow the file contents.
    pub fn tiny_elf(paddr: u64, code: &[u8], bss: u64) -> Vec<u8> {
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
        e[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        e[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes()); // vaddr
        e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes()); // paddr
        e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + bss).to_le_bytes());
        e[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    /// `tiny_elf` plus a PT_NOTE segment holding one note of `name`/`kind`.
    pub fn noted_elf(paddr: u64, name: &[u8], kind: u32) -> Vec<u8> {
        let mut e = tiny_elf(paddr, b"RAYVISOR", 0);
        let note_off = e.len() as u64;
        e.extend_from_slice(&(name.len() as u32).to_le_bytes());
        e.extend_from_slice(&4u32.to_le_bytes());
        e.extend_from_slice(&kind.to_le_bytes());
        e.extend_from_slice(name);
        e.resize(e.len().next_multiple_of(4), 0);
        e.extend_from_slice(&1u32.to_le_bytes());
        let note_len = e.len() as u64 - note_off;
        let mut ph = vec![0u8; PHDR_SIZE];
        ph[..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&note_off.to_le_bytes());
        ph[32..40].copy_from_slice(&note_len.to_le_bytes());
        let ph_off = e.len() as u64;
        e.extend_from_slice(&ph);
        let load: Vec<u8> = e[0x40..0x78].to_vec();
        e.extend_from_slice(&load);
        e[32..40].copy_from_slice(&ph_off.to_le_bytes());
        e[56..58].copy_from_slice(&2u16.to_le_bytes());
        e
    }

    #[test]
    fn segments_and_entry_are_read() {
        let info = parse(&tiny_elf(0x20_0000, b"RAYVISOR", 0x3000)).unwrap();
        assert_eq!(info.entry, 0x20_0004);
        assert_eq!(
            info.segments,
            vec![Segment {
                paddr: 0x20_0000,
                memsz: 0x3008
            }]
        );
        assert!(info.notes.is_empty());
    }

    #[test]
    fn a_file_parses_as_its_bytes_do() {
        let bytes = noted_elf(0x20_0000, b"rayvisor\0", 9);
        let path = std::env::temp_dir().join(format!("ray-elf-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let from_file = parse_file(&std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(from_file, parse(&bytes).unwrap());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn notes_are_found_only_where_they_are() {
        let info = parse(&noted_elf(0x20_0000, b"rayvisor\0", 0x5241_5901)).unwrap();
        assert!(info.has_note(b"rayvisor\0", 0x5241_5901));
        assert!(!info.has_note(b"other\0", 0x5241_5901));
        assert!(!info.has_note(b"rayvisor\0", 1));
        assert_eq!(info.segments.len(), 1);
    }

    #[test]
    fn malformed_files_are_errors_not_panics() {
        let good = noted_elf(0x20_0000, b"rayvisor\0", 7);
        // A note claiming to be longer than its segment.
        let mut long_note = good.clone();
        let note_off = tiny_elf(0x20_0000, b"RAYVISOR", 0).len();
        long_note[note_off + 4..note_off + 8].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(parse(&long_note).unwrap_err(), "note runs past its segment");
        // Program headers pointing past the end of the file.
        let mut far = good.clone();
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&far).unwrap_err().contains("past the end"));
        let mut few = good.clone();
        few[54..56].copy_from_slice(&8u16.to_le_bytes());
        assert!(parse(&few).unwrap_err().contains("entries of 8 bytes"));
        let mut many = good.clone();
        many[54..56].copy_from_slice(&u16::MAX.to_le_bytes());
        many[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(parse(&many).unwrap_err().contains("at most 65536 bytes"));
        // Every truncation of a valid file is an error or a shorter parse, never a panic.
        for len in 0..good.len() {
            let _ = parse(&good[..len]);
        }
        assert_eq!(parse(b"MZ\0\0").unwrap_err(), "truncated ELF header");
        assert_eq!(parse(&[b'M'; 64]).unwrap_err(), "no ELF magic");
    }
}
