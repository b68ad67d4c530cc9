//! The contract between the rayvisor VMM and rayvisor's own guest kernel.
//!
//! The guest is an ordinary Linux 64-bit-boot-protocol ELF: any VMM that boots a Linux
//! `vmlinux` boots it. What a rayvisor VMM knows on top of that is written here, in one
//! place, so both sides are compiled against the same numbers:
//!
//! * The guest image is linked at [`IMAGE_BASE`]; its first page is the **heartbeat page**
//!   ([`Heartbeat`]), so the VMM finds it at a fixed guest-physical address without a
//!   single exit or hypercall.
//! * The guest keeps the heartbeat page current from its main loop (no exits): a counter,
//!   its kvmclock time, per-vCPU counters and workload statistics. Pause, snapshot and
//!   migration downtime are measured from the gap in `time_ns`.
//! * Serial input is announced by the VMM through [`Heartbeat::input_doorbell`], so the
//!   guest polls the UART (a costly exit on PVM) only when there is something to read.
//! * With [`VMM_FEATURE_PV_CONSOLE`] the console is paravirtual: a line of output is one
//!   exit (an `outl` of its length, the bytes in the heartbeat page's second half) and a
//!   drain of input one exit (`rep insb`), instead of one or two exits per byte on COM1.
//!
//! This crate is `no_std` and has no dependencies: the guest links it too.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod acpi_mcfg;
pub mod acpi_numa;
pub mod display;
pub mod input;
pub mod text;

/// Guest-physical (and guest-virtual: the guest maps memory 1:1) address the guest ELF is
/// linked at. The heartbeat page is the first page of the image.
pub const IMAGE_BASE: u64 = 0x10_0000;

/// Guest-physical address of the heartbeat page.
pub const HEARTBEAT_GPA: u64 = IMAGE_BASE;

/// `Heartbeat::magic` once the guest has initialised the page ("RAYHBT01", little-endian).
pub const HEARTBEAT_MAGIC: u64 = u64::from_le_bytes(*b"RAYHBT01");

/// Layout version of [`Heartbeat`].
pub const HEARTBEAT_VERSION: u32 = 1;

/// Most vCPUs the guest kernel supports (one per-CPU slot each in the heartbeat page).
pub const MAX_CPUS: usize = 64;

/// Kernel command-line key: `ray.poll_ms=N` makes the guest poll the UART every N ms even
/// without a doorbell (for VMMs that do not ring it). `0` = doorbell only. Default 10.
pub const CMDLINE_POLL_MS: &str = "ray.poll_ms=";

/// The heartbeat page. Every field is a naturally aligned `u64` (or pair of `u32`) so each
/// side can read and write it with single volatile accesses.
///
/// Writers: the guest writes everything except `input_doorbell` and `shutdown_request`.
/// The VMM sets `input_doorbell` to 1 after it queued serial input; the guest clears it
/// before draining the UART. The VMM sets `shutdown_request` to 1 for a graceful stop.
///
/// `seq` is a sequence lock around the (`counter`, `time_ns`) pair: the guest makes it odd,
/// updates both, then makes it even. A reader that sees the same even `seq` before and after
/// reading has a consistent pair.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    /// [`HEARTBEAT_MAGIC`] once initialised.
    pub magic: u64,
    /// [`HEARTBEAT_VERSION`].
    pub version: u32,
    /// Number of vCPUs that came online.
    pub cpus_online: u32,
    /// Sequence lock for `counter`/`time_ns` (see the type's documentation).
    pub seq: u64,
    /// Main-loop iterations of the boot CPU.
    pub counter: u64,
    /// kvmclock time (ns since the guest clock's origin) at the last `counter` update.
    pub time_ns: u64,
    /// 1 once the shell printed `ready`.
    pub ready: u64,
    /// Native loop rate measured at boot, in iterations per second (PVM's emulator manages
    /// ~1e5/s, native execution ~1e9/s).
    pub loop_rate: u64,
    /// 1 if the guest found itself on PVM and registered its VIF area.
    pub pvm: u64,
    /// Bytes the `dirty` workload wrote since boot.
    pub dirty_bytes: u64,
    /// Current `dirty` target rate in bytes/s (0 = stopped).
    pub dirty_rate: u64,
    /// Lines handled by the shell.
    pub commands: u64,
    /// Set to 1 by the VMM when serial input is waiting; cleared by the guest.
    pub input_doorbell: u64,
    /// Ticks printed by the `tick` command since boot.
    pub ticks: u64,
    /// Set to 1 by the VMM to ask for a clean power-off (graceful stop); the guest then
    /// prints `poweroff` and powers off exactly as the `poweroff` command does.
    pub shutdown_request: u64,
    /// What the VMM offers the guest ([`VMM_FEATURE_IDLE_PORT`],
    /// [`VMM_FEATURE_PV_CONSOLE`]), written by the VMM
    /// before the first vCPU starts; zero from a VMM that offers nothing.
    pub vmm_features: u64,
    /// How the guest idles, written by the guest before `ready`: [`GUEST_IDLE_HLT`] tells
    /// the VMM it may raise [`WAKE_VECTOR`] on the boot CPU; anything else, that it must not.
    pub guest_idle: u64,
    /// Guest-physical address of the [`display::DisplayTable`], written by the VMM before
    /// the first vCPU starts; zero when the VM has no display.
    pub display_table: u64,
    /// Reserved; zero.
    pub reserved: [u64; 14],
    /// Per-vCPU loop counters (index = CPU number, 0 = boot CPU).
    pub cpu_counter: [u64; MAX_CPUS],
    /// Per-vCPU kvmclock time of the last `cpu_counter` update.
    pub cpu_time_ns: [u64; MAX_CPUS],
}

/// Byte offsets of the heartbeat fields, for the VMM's volatile reads.
pub mod offset {
    use super::Heartbeat;
    use core::mem::offset_of;
    pub const MAGIC: u64 = offset_of!(Heartbeat, magic) as u64;
    pub const CPUS_ONLINE: u64 = offset_of!(Heartbeat, cpus_online) as u64;
    pub const SEQ: u64 = offset_of!(Heartbeat, seq) as u64;
    pub const COUNTER: u64 = offset_of!(Heartbeat, counter) as u64;
    pub const TIME_NS: u64 = offset_of!(Heartbeat, time_ns) as u64;
    pub const READY: u64 = offset_of!(Heartbeat, ready) as u64;
    pub const LOOP_RATE: u64 = offset_of!(Heartbeat, loop_rate) as u64;
    pub const PVM: u64 = offset_of!(Heartbeat, pvm) as u64;
    pub const DIRTY_BYTES: u64 = offset_of!(Heartbeat, dirty_bytes) as u64;
    pub const DIRTY_RATE: u64 = offset_of!(Heartbeat, dirty_rate) as u64;
    pub const COMMANDS: u64 = offset_of!(Heartbeat, commands) as u64;
    pub const INPUT_DOORBELL: u64 = offset_of!(Heartbeat, input_doorbell) as u64;
    pub const TICKS: u64 = offset_of!(Heartbeat, ticks) as u64;
    pub const SHUTDOWN_REQUEST: u64 = offset_of!(Heartbeat, shutdown_request) as u64;
    pub const VMM_FEATURES: u64 = offset_of!(Heartbeat, vmm_features) as u64;
    pub const GUEST_IDLE: u64 = offset_of!(Heartbeat, guest_idle) as u64;
    pub const DISPLAY_TABLE: u64 = offset_of!(Heartbeat, display_table) as u64;
    pub const CPU_COUNTER: u64 = offset_of!(Heartbeat, cpu_counter) as u64;
    pub const CPU_TIME_NS: u64 = offset_of!(Heartbeat, cpu_time_ns) as u64;
}

const _: () = assert!(core::mem::size_of::<Heartbeat>() <= 4096);
// The rest of the page, from [`PV_CONSOLE_OUT_OFFSET`] on, is the paravirtual console's
// output buffer; the struct must stay clear of it (asserted below the constant).

/// ELF note owner of rayvisor's guest notes (`"rayvisor\0"`, 9 bytes).
pub const NOTE_NAME: &[u8] = b"rayvisor\0";
/// Note type saying: start every vCPU at the ELF entry in long mode (no INIT/SIPI); the
/// kernel tells its CPUs apart by APIC ID. Its 4-byte descriptor is the ABI version (1).
/// A kernel without it (Linux) gets only its boot CPU started, as on a PC.
pub const NOTE_DIRECT_SMP: u32 = 0x5241_5901;

/// I/O port the guest writes [`POWEROFF_VALUE`] to (16-bit) for a clean power-off: the
/// PM1a control block the VMM's ACPI FADT also names (SLP_TYP=5 | SLP_EN).
pub const POWEROFF_PORT: u16 = 0x604;
/// Value written to [`POWEROFF_PORT`].
pub const POWEROFF_VALUE: u16 = 0x3400;

/// [`Heartbeat::vmm_features`] bit: the VMM handles [`IDLE_PORT`].
pub const VMM_FEATURE_IDLE_PORT: u64 = 1 << 0;

/// [`Heartbeat::vmm_features`] bit: the VMM raises [`WAKE_VECTOR`] on the boot CPU (an MSI
/// through the in-kernel APIC) when it rings a doorbell of the heartbeat page (console
/// input, shutdown request) and when the vCPUs run again after a pause, a restore or a
/// migration, so a guest may sleep in `hlt` between its own timer deadlines. Raised only
/// for a guest that set [`Heartbeat::guest_idle`] to [`GUEST_IDLE_HLT`].
pub const VMM_FEATURE_WAKE_IRQ: u64 = 1 << 2;

/// The vector of the VMM's wake interrupt ([`VMM_FEATURE_WAKE_IRQ`]).
pub const WAKE_VECTOR: u8 = 0x42;

/// [`Heartbeat::guest_idle`]: the guest sleeps in `hlt` and handles [`WAKE_VECTOR`].
pub const GUEST_IDLE_HLT: u64 = 1;

/// [`Heartbeat::vmm_features`] bit: the VMM handles the paravirtual console
/// ([`PV_CONSOLE_IN_PORT`], [`PV_CONSOLE_OUT_PORT`]).
pub const VMM_FEATURE_PV_CONSOLE: u64 = 1 << 1;

/// Paravirtual console input: a `rep insb` of N bytes from this port is one exit; the VMM
/// fills the N bytes with waiting console input (the same bytes COM1 would deliver, in
/// order) followed by zeros. A NUL byte ends the input, so NUL bytes in the console input
/// are dropped on this path. Only read when the VMM announced [`VMM_FEATURE_PV_CONSOLE`].
pub const PV_CONSOLE_IN_PORT: u16 = 0x613;
/// Paravirtual console output: a 32-bit write of a length L (at most
/// [`PV_CONSOLE_OUT_LEN`]) prints the first L bytes of the output buffer at
/// [`PV_CONSOLE_OUT_GPA`] in one exit. A longer length is refused (nothing printed).
pub const PV_CONSOLE_OUT_PORT: u16 = 0x614;
/// Offset of the paravirtual console's output buffer in the heartbeat page: its unused
/// second half. The guest (boot CPU only) writes it; the VMM only reads it.
pub const PV_CONSOLE_OUT_OFFSET: u64 = 0x800;
/// Guest-physical address of the paravirtual console's output buffer.
pub const PV_CONSOLE_OUT_GPA: u64 = HEARTBEAT_GPA + PV_CONSOLE_OUT_OFFSET;
/// Size of the paravirtual console's output buffer: up to the end of the heartbeat page.
pub const PV_CONSOLE_OUT_LEN: usize = 4096 - PV_CONSOLE_OUT_OFFSET as usize;

const _: () = assert!(core::mem::size_of::<Heartbeat>() <= PV_CONSOLE_OUT_OFFSET as usize);

/// I/O port an idle vCPU writes a duration in microseconds to (32-bit): the VMM takes the
/// vCPU off the host CPU for at most that long (capped at [`IDLE_MAX_US`]) and returns
/// early when it needs the vCPU (pause, snapshot). The guest's replacement for HLT, which
/// needs a timer interrupt to wake from. Only written when the VMM announced
/// [`VMM_FEATURE_IDLE_PORT`]: elsewhere each write would be a wasted exit.
pub const IDLE_PORT: u16 = 0x610;
/// Longest idle the VMM honours per write, µs.
pub const IDLE_MAX_US: u32 = 1000;

/// Kernel command-line key: how an idle guest waits. `ray.idle=hlt` (the default when the
/// VMM offers [`VMM_FEATURE_WAKE_IRQ`]) sleeps in `hlt` until its next timer deadline or an
/// interrupt; `ray.idle=port` idles through [`IDLE_PORT`] in short slices (when offered);
/// `ray.idle=spin` keeps spinning (heartbeat to the nanosecond, one host CPU per vCPU).
pub const CMDLINE_IDLE: &str = "ray.idle=";

/// Checksum used by the guest's `sum` command, computed the same way by host-side tests:
/// FNV-1a over little-endian 64-bit words (a trailing partial word is zero-padded).
pub fn sum_words(words: impl Iterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        h ^= w;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
