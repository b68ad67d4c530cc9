//! Reading the ACPI tables that describe NUMA (SRAT: which CPUs and memory belong to which
//! proximity domain; SLIT: distances between domains), for rayvisor's guest `numa`
//! command and for the VMM's tests of the tables it writes. Byte slices in, values out:
//! no allocation, no unsafe.

/// One enabled SRAT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SratEntry {
    /// A CPU (by local APIC ID, xAPIC or x2APIC entry) and its proximity domain.
    Cpu { apic_id: u32, domain: u32 },
    /// A guest-physical range and its proximity domain.
    Memory { domain: u32, base: u64, len: u64 },
}

/// Size of a system description table's header.
pub const HEADER_LEN: usize = 36;

fn u32_at(t: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(t.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(t: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(t.get(at..at + 8)?.try_into().ok()?))
}

/// The length a table's header claims (bytes 4..8), to know how much to read.
pub fn table_len(header: &[u8]) -> Option<usize> {
    u32_at(header, 4).map(|l| l as usize)
}

/// Whether `table` starts with `signature`, is as long as its header says and its bytes
/// sum to zero.
pub fn table_ok(table: &[u8], signature: &[u8; 4]) -> bool {
    table.len() >= HEADER_LEN
        && &table[..4] == signature
        && table_len(table) == Some(table.len())
        && table.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
}

/// The table addresses an XSDT lists.
pub fn xsdt_entries(xsdt: &[u8]) -> impl Iterator<Item = u64> + '_ {
    xsdt.get(HEADER_LEN..)
        .unwrap_or(&[])
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
}

/// The enabled entries of an SRAT (whose structures start after 12 reserved bytes);
/// stops at the first malformed structure.
pub fn srat_entries(srat: &[u8]) -> impl Iterator<Item = SratEntry> + '_ {
    let mut at = HEADER_LEN + 12;
    core::iter::from_fn(move || loop {
        let kind = *srat.get(at)?;
        let len = usize::from(*srat.get(at + 1)?);
        let e = srat.get(at..at + len)?;
        if len < 2 {
            return None;
        }
        at += len;
        let entry = match (kind, len) {
            // Processor Local APIC affinity: domain bits 7:0 at 2, 31:8 at 9..12.
            (0, 16) if e[4] & 1 == 1 => Some(SratEntry::Cpu {
                apic_id: u32::from(e[3]),
                domain: u32::from(e[2])
                    | u32::from(e[9]) << 8
                    | u32::from(e[10]) << 16
                    | u32::from(e[11]) << 24,
            }),
            (1, 40) if u32_at(e, 28)? & 1 == 1 => Some(SratEntry::Memory {
                domain: u32_at(e, 2)?,
                base: u64_at(e, 8)?,
                len: u64_at(e, 16)?,
            }),
            // Processor Local x2APIC affinity.
            (2, 24) if u32_at(e, 12)? & 1 == 1 => Some(SratEntry::Cpu {
                apic_id: u32_at(e, 8)?,
                domain: u32_at(e, 4)?,
            }),
            _ => None,
        };
        if entry.is_some() {
            return entry;
        }
    })
}

/// How many localities (proximity domains) a SLIT describes.
pub fn slit_localities(slit: &[u8]) -> u64 {
    u64_at(slit, HEADER_LEN).unwrap_or(0)
}

/// The SLIT's distance from domain `from` to domain `to`.
pub fn slit_distance(slit: &[u8], from: u64, to: u64) -> Option<u8> {
    let n = slit_localities(slit);
    if from >= n || to >= n {
        return None;
    }
    let at = (HEADER_LEN as u64 + 8).checked_add(from.checked_mul(n)?.checked_add(to)?)?;
    slit.get(usize::try_from(at).ok()?).copied()
}
